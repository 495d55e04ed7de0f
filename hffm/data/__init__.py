"""Data: the source named by ``data.source`` (synthetic by default, or a real VQA data set on local
disk), its tasks and answer vocabularies, each device's non-IID partition, the test sets, the tokenizer
and the image preparation that match the backbone.

- ``synthetic`` (hffm.data.synthetic): generated shapes, no files: the zero-download default.
- ``easy-vqa``, ``vqa-v2``, ``gqa``, ``hf-disk`` (hffm.data.sources, hffm.data.real): files read
  lazily; a missing file, an unreadable image, an answer outside a given vocabulary or malformed JSON
  is a ``DataError`` naming the file and the entry, raised by ``preflight`` before any process starts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from hffm.data.base import (  # noqa: F401 - the package's public names
    DataError,
    DeviceData,
    ImageCache,
    TaskData,
    dirichlet_split,
    word_level_tokenizer,
)
from hffm.data.synthetic import (  # noqa: F401
    COLORS,
    WORDS,
    build_tokenizer,
    joiner_partition,
    make_task_data,
    render_sample,
    split_for_task,
    task_pool_labels,
)
from hffm.data.synthetic import build_device_data as _synthetic_device_data
from hffm.data.synthetic import build_global_test as _synthetic_global_test
from hffm.ids import EASY_VQA_TASKS, TASK_LABELS

log = logging.getLogger("hffm.data")


def is_real(cfg) -> bool:
    return cfg.data.source != "synthetic"


def task_answers(cfg) -> dict[str, list[str]]:
    """Each task's answer vocabulary (a head's outputs, in order). Real sources with a top-K vocabulary
    read their training questions (not images) to know it."""
    if cfg.data.source == "synthetic":
        return {t: list(TASK_LABELS[t]) for t in cfg.tasks}
    if cfg.data.source == "easy-vqa":
        return {t: list(EASY_VQA_TASKS[t]) for t in cfg.tasks}
    from hffm.data.real import prepared

    return {t: list(a) for t, a in prepared(cfg).answers.items()}


def task_labels(cfg) -> dict[str, int]:
    """Each task's number of answers: the size of its head."""
    return {t: len(a) for t, a in task_answers(cfg).items()}


# --------------------------------------------------------------------------------------------
# Tokenizer and images, matched to the backbone
# --------------------------------------------------------------------------------------------
@lru_cache(maxsize=4)
def _checkpoint_processor(backbone: str):
    """(tokenizer or None, image processor or None) saved in a checkpoint directory (``ViltProcessor``
    when both are there, else whichever is)."""
    from transformers import AutoImageProcessor, AutoTokenizer, ViltProcessor

    try:
        p = ViltProcessor.from_pretrained(backbone, local_files_only=True)
        return p.tokenizer, p.image_processor
    except (OSError, ValueError, TypeError):
        pass
    tok = proc = None
    try:
        tok = AutoTokenizer.from_pretrained(backbone, local_files_only=True)
    except (OSError, ValueError, TypeError):
        pass
    if (Path(backbone) / "preprocessor_config.json").is_file():
        proc = AutoImageProcessor.from_pretrained(backbone, local_files_only=True)
    return tok, proc


def load_tokenizer(cfg):
    """The tiny backbone: the synthetic vocabulary's word-level tokenizer, or for a real source one over
    its training questions' words (built offline, identical in every process). A checkpoint directory:
    its own tokenizer (a real source requires one; the synthetic set falls back to its own)."""
    if cfg.model.backbone == "tiny":
        if not is_real(cfg):
            return build_tokenizer()
        return _real_tiny_tokenizer(cfg.data.model_dump_json(), tuple(cfg.tasks), cfg.seed)
    tok, _ = _checkpoint_processor(cfg.model.backbone)
    if tok is not None:
        return tok
    if is_real(cfg):
        raise DataError(
            f"model.backbone: {cfg.model.backbone} has no tokenizer; real questions need the checkpoint's own "
            "(save it beside the model: ViltProcessor.save_pretrained)"
        )
    return build_tokenizer()


@lru_cache(maxsize=2)
def _real_tiny_tokenizer(data_json: str, tasks: tuple[str, ...], seed: int):
    from hffm.data.real import _prepared

    return word_level_tokenizer(_prepared(data_json, tasks, seed).vocabulary(), lowercase=True)


def image_loader(cfg) -> Callable[[str], torch.Tensor]:
    """ref -> prepared image (3, H, W): the checkpoint's own image processor when it ships one, else a
    resize to the backbone's image size and ViLT's normalisation ((x - 0.5) / 0.5)."""
    from hffm.data.real import prepared

    source = prepared(cfg).source
    proc = None
    size = cfg.model.image_size
    if cfg.model.backbone != "tiny":
        _, proc = _checkpoint_processor(cfg.model.backbone)
        if proc is None:
            from transformers import ViltConfig

            size = ViltConfig.from_pretrained(cfg.model.backbone, local_files_only=True).image_size
            log.warning("%s ships no image processor: images resized to %d px", cfg.model.backbone, size)

    def load(ref: str) -> torch.Tensor:
        img = source.open_image(ref)
        if proc is not None:
            return proc(images=img, return_tensors="pt")["pixel_values"][0]
        from PIL import Image

        arr = np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
        return (torch.from_numpy(arr).permute(2, 0, 1).contiguous() - 0.5) / 0.5

    return load


_CACHE_LOCK = threading.Lock()
_CACHES: dict[int, ImageCache] = {}


def image_cache(cfg) -> ImageCache:
    """The process's cache of prepared images (shared by its devices)."""
    with _CACHE_LOCK:
        return _CACHES.setdefault(cfg.data.image_cache, ImageCache(cfg.data.image_cache))


# --------------------------------------------------------------------------------------------
# What devices hold
# --------------------------------------------------------------------------------------------
def build_device_data(
    cfg, device_id: str, holders_by_task: dict[str, list[str]], tokenizer, tasks: tuple[str, ...] = ()
) -> DeviceData:
    """This device's training partition and local test split. ``holders_by_task`` is the starting
    membership (the config's): its devices share each task's pool by a Dirichlet split, and a membership
    change never reshuffles it. A device outside it holding ``tasks`` (a joiner) draws its own samples."""
    if not is_real(cfg):
        return _synthetic_device_data(cfg, device_id, holders_by_task, tokenizer, tasks)
    from hffm.data.real import real_device_data

    return real_device_data(cfg, device_id, holders_by_task, tokenizer, tasks, image_loader(cfg), image_cache(cfg))


def partition_counts(cfg, holders_by_task: dict[str, list[str]]) -> dict[str, dict[str, list[int]]]:
    """task -> device -> its training samples per answer (``task_answers`` order): the split
    ``build_device_data`` makes for the starting membership ``holders_by_task``, from the labels alone (no
    image is read, nothing is tokenized). What a federation's non-IID data looks like before it runs."""
    out: dict[str, dict[str, list[int]]] = {}
    answers = task_answers(cfg)
    for task, holders in holders_by_task.items():
        k = len(answers[task])
        if not is_real(cfg):
            labels = task_pool_labels(task, cfg.data.train_per_task, cfg.seed)
            parts = split_for_task(task, holders, cfg.data, cfg.seed)
            out[task] = {d: np.bincount(labels[parts[d]], minlength=k).tolist() for d in holders}
            continue
        from hffm.data.real import prepared

        rd = prepared(cfg)
        labels = rd.train_labels[task]
        out[task] = {
            d: np.bincount(labels[rd.partition(task, tuple(holders), d)], minlength=k).tolist() for d in holders
        }
    return out


def skew_summary(counts: dict[str, list[int]]) -> dict[str, float | int]:
    """One task's split at a glance: ``devices``; ``single_answer`` (devices whose samples all carry one
    answer: their local loss is met by a constant output, they teach the shared modules nothing that
    tells answers apart); ``median_top_share`` (over devices, the share of a device's samples that carry
    its most common answer); ``median_answers`` (answers a device holds at all); ``minority_share`` (the
    share of the task's samples that are not of their own device's most common answer: what local
    training can tell apart; 0 when every device holds one answer) against ``pool_minority_share`` (the
    same of the pool as one holder: what centralised training has)."""
    rows = [np.asarray(c) for c in counts.values() if sum(c) > 0]
    total = sum(int(r.sum()) for r in rows)
    single = [r for r in rows if int((r > 0).sum()) == 1]
    pool = sum(rows) if rows else np.zeros(1)
    return {
        "devices": len(rows),
        "single_answer": len(single),
        "median_top_share": float(np.median([r.max() / r.sum() for r in rows])) if rows else 0.0,
        "median_answers": float(np.median([(r > 0).sum() for r in rows])) if rows else 0.0,
        "minority_share": sum(int(r.sum() - r.max()) for r in rows) / total if total else 0.0,
        "pool_minority_share": 1.0 - int(pool.max()) / total if total else 0.0,
    }


def build_global_test(cfg, task: str, tokenizer) -> TaskData:
    """The task's global test set: uniform over the synthetic labels; a real source's test pool."""
    if not is_real(cfg):
        return _synthetic_global_test(cfg, task, tokenizer)
    from hffm.data.real import prepared

    rd = prepared(cfg)
    idx = np.arange(min(len(rd.test[task]), cfg.data.global_test_per_task))
    return rd.task_data(task, "test", idx, tokenizer, cfg.model.max_text_len, image_loader(cfg), image_cache(cfg))


def preflight(cfg) -> str:
    """Everything about the data that can fail, checked before any process starts: the files, every
    entry, every image the run uses (``data.check_images``), the tokenizer. One line describing it, or
    ``DataError`` naming the file and the entry."""
    if not is_real(cfg):
        return f"synthetic data: tasks {', '.join(cfg.tasks)} (generated, {cfg.data.train_per_task} per task)"
    from hffm.data.real import prepared

    rd = prepared(cfg)
    load_tokenizer(cfg)
    checked = rd.check_images(image_loader(cfg)) if cfg.data.check_images else 0
    parts = [
        f"{t} ({len(rd.train[t])} train, {len(rd.test[t])} test, {len(rd.answers[t])} answers"
        + (f", {rd.dropped[t]} dropped outside the top {len(rd.answers[t])}" if rd.dropped[t] else "")
        + ")"
        for t in cfg.tasks
    ]
    return f"{cfg.data.source} data: " + "; ".join(parts) + (f"; {checked} images checked" if checked else "")
