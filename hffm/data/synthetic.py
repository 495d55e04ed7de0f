"""The synthetic multi-task VQA set (``data.source: synthetic``, the zero-download default),
deterministic by seed, and its non-IID split over devices.

Two tasks with different questions and label spaces:
- ``art`` (an attribute task, after AQUA): one shape on a textured canvas; "what color is the
  shape ?" / "what shape is it ?" -> {red, green, blue, yellow, circle, square, triangle}.
- ``gqa`` (a multi-object task, after GQA's count and verify questions): one to three objects on
  a grid; "how many shapes are there ?" / "is there a C shape ?" -> {one, two, three, yes, no}.

Every sample is rendered from its own generator seeded by (seed, task, index), so any node can
build any sample without data moving. Each task's training pool has uniform labels; its samples are
split over the devices holding the task by a Dirichlet(alpha) over each label's share. A device's
local test split follows its own label mix; the global test set of a task is uniform.
The tokenizer is a word-level ``PreTrainedTokenizerFast`` built offline from the question vocabulary.
"""

from __future__ import annotations

import zlib
from functools import lru_cache

import numpy as np
import torch

from hffm.data.base import DeviceData, TaskData, TensorImages, dirichlet_split, tokenize, word_level_tokenizer
from hffm.ids import COUNT_WORDS, SHAPES, TASK_LABELS

COLORS: dict[str, tuple[float, float, float]] = {  # the names and their order: hffm.ids.COLORS
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.9, 0.1),
}
WORDS = sorted(
    {
        *"what color is the shape it ? how many shapes are there a".split(),
        *COLORS,
        *SHAPES,
    }
)
# ViLT/BERT-style normalisation of pixel values.
_MEAN, _STD = 0.5, 0.5


@lru_cache(maxsize=1)
def build_tokenizer():
    """A word-level tokenizer over the synthetic vocabulary, built without any download."""
    return word_level_tokenizer(WORDS)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------
def _shape_mask(shape: str, size: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if shape == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if shape == "square":
        return (np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85)
    # triangle pointing up: inside when below the apex lines and above the base
    top, base = cy - r, cy + r * 0.8
    half = (yy - top) / (base - top) * r
    return (yy >= top) & (yy <= base) & (np.abs(xx - cx) <= half)


def _canvas(rng: np.random.Generator, size: int) -> np.ndarray:
    bg = rng.uniform(0.0, 0.35, size=3).astype(np.float32)
    img = np.broadcast_to(bg[:, None, None], (3, size, size)).copy()
    img += rng.normal(0, 0.04, size=img.shape).astype(np.float32)
    return img


def _paint(img: np.ndarray, mask: np.ndarray, color: str, rng: np.random.Generator) -> None:
    c = np.asarray(COLORS[color], dtype=np.float32) + rng.normal(0, 0.04, 3).astype(np.float32)
    img[:, mask] = c[:, None]


def render_sample(task: str, label: int, seed: int, index: int, size: int) -> tuple[np.ndarray, str]:
    """(image CHW float32 in [0,1], question) for one sample whose answer is ``label``."""
    rng = np.random.default_rng([seed, 0 if task == "art" else 1, index])
    answer = TASK_LABELS[task][label]
    img = _canvas(rng, size)
    colors = list(COLORS)
    if task == "art":
        if answer in COLORS:
            color, shape = answer, SHAPES[rng.integers(len(SHAPES))]
            question = "what color is the shape ?"
        else:
            color, shape = colors[rng.integers(len(colors))], answer
            question = "what shape is it ?"
        r = rng.uniform(0.22, 0.34) * size
        cy, cx = rng.uniform(r, size - r, size=2)
        _paint(img, _shape_mask(shape, size, cy, cx, r), color, rng)
    elif task == "gqa":
        # Several objects on a 3x3 grid of cells (no overlap); count or verify existence.
        cells = rng.permutation(9)
        if answer in COUNT_WORDS:
            n = COUNT_WORDS.index(answer) + 1
            cols = [colors[rng.integers(len(colors))] for _ in range(n)]
            question = "how many shapes are there ?"
        else:
            n = 2
            idx = rng.choice(len(colors), size=3, replace=False)
            cols = [colors[idx[0]], colors[idx[1]]]
            asked = cols[rng.integers(2)] if answer == "yes" else colors[idx[2]]
            question = f"is there a {asked} shape ?"
        cell = size / 3
        r = rng.uniform(0.3, 0.4) * cell
        for k in range(n):
            row, col = divmod(int(cells[k]), 3)
            cy = (row + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
            cx = (col + 0.5) * cell + rng.uniform(-0.08, 0.08) * cell
            _paint(img, _shape_mask(SHAPES[rng.integers(len(SHAPES))], size, cy, cx, r), cols[k], rng)
    else:
        raise ValueError(f"unknown task {task!r}")
    return np.clip(img, 0.0, 1.0), question


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------
def make_task_data(
    task: str, labels: np.ndarray, indices: np.ndarray, seed: int, image_size: int, max_text_len: int, tokenizer
) -> TaskData:
    imgs, questions = [], []
    for lab, idx in zip(labels.tolist(), indices.tolist(), strict=True):
        img, q = render_sample(task, int(lab), seed, int(idx), image_size)
        imgs.append(img)
        questions.append(q)
    input_ids, attention_mask = tokenize(tokenizer, questions, max_text_len)
    pix = torch.from_numpy(np.stack(imgs)) if imgs else torch.zeros(0, 3, image_size, image_size)
    return TaskData(
        task=task,
        input_ids=input_ids,
        attention_mask=attention_mask,
        images=TensorImages((pix - _MEAN) / _STD),
        labels=torch.as_tensor(labels, dtype=torch.long),
        answers=list(TASK_LABELS[task]),
    )


def task_pool_labels(task: str, n: int, seed: int) -> np.ndarray:
    """Uniform labels of a task's training pool (sample i has answer labels[i])."""
    rng = np.random.default_rng([seed, 101, 0 if task == "art" else 1])
    n_labels = len(TASK_LABELS[task])
    labels = np.arange(n) % n_labels
    return labels[rng.permutation(n)]


def split_for_task(task: str, holders: list[str], cfg_data, seed: int) -> dict[str, np.ndarray]:
    """Pool sample indices of ``task`` for each device in ``holders`` (deterministic)."""
    return _split(task, tuple(holders), cfg_data.alpha, cfg_data.train_per_task, cfg_data.min_samples_per_device, seed)


@lru_cache(maxsize=16)
def _split(
    task: str, holders: tuple[str, ...], alpha: float, n: int, min_size: int, seed: int
) -> dict[str, np.ndarray]:
    # cached: every device of a process needs the same split (once per process, not once per device)
    labels = task_pool_labels(task, n, seed)
    rng = np.random.default_rng([seed, 202, 0 if task == "art" else 1])
    parts = dirichlet_split(labels, len(holders), alpha, rng, min_size)
    for p in parts:
        p.setflags(write=False)  # shared between callers
    return dict(zip(holders, parts, strict=True))


# A device that was not in the starting membership draws its own samples from an index range of its
# own, far past the pool and the test sets: nobody else's partition changes when it joins.
_JOINER_BASE = 1 << 40


def joiner_partition(task: str, device_id: str, n: int, alpha: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels, sample indices) of a device that joined after the start: ``n`` samples whose label mix
    is a Dirichlet(alpha) draw of its own, indices in a range derived from its id (disjoint from the
    pool, the test sets and, up to a 32-bit id hash, every other joiner)."""
    h = zlib.crc32(device_id.encode())
    rng = np.random.default_rng([seed, 404, h, 0 if task == "art" else 1])
    n_labels = len(TASK_LABELS[task])
    labels = rng.choice(n_labels, size=n, p=rng.dirichlet(np.full(n_labels, alpha)))
    return labels, _JOINER_BASE + (h << 24) + np.arange(n, dtype=np.int64)


def build_device_data(
    cfg, device_id: str, holders_by_task: dict[str, list[str]], tokenizer, tasks: tuple[str, ...] = ()
) -> DeviceData:
    """This device's train split and local test split. ``holders_by_task`` is the starting membership
    (the config's): its devices share each task's pool by a Dirichlet split, and a membership change
    never reshuffles it. A device outside it holding ``tasks`` (a joiner) draws its own samples."""
    train, test = {}, {}
    for task, holders in holders_by_task.items():
        if device_id not in holders:
            if task in tasks:
                n = max(cfg.data.min_samples_per_device, cfg.data.train_per_task // max(1, len(holders)))
                labels, idx = joiner_partition(task, device_id, n, cfg.data.alpha, cfg.seed)
                train[task] = make_task_data(
                    task, labels, idx, cfg.seed, cfg.model.image_size, cfg.model.max_text_len, tokenizer
                )
                test[task] = make_task_data(
                    task,
                    labels[: cfg.data.local_test_per_device],
                    idx[-1] + 1 + np.arange(min(n, cfg.data.local_test_per_device)),
                    cfg.seed,
                    cfg.model.image_size,
                    cfg.model.max_text_len,
                    tokenizer,
                )
            continue
        labels = task_pool_labels(task, cfg.data.train_per_task, cfg.seed)
        idx = split_for_task(task, holders, cfg.data, cfg.seed)[device_id]
        train[task] = make_task_data(
            task, labels[idx], idx, cfg.seed, cfg.model.image_size, cfg.model.max_text_len, tokenizer
        )
        # Local test: same label mix as the device's train split, fresh samples (indices past the pool).
        counts = np.bincount(labels[idx], minlength=len(TASK_LABELS[task])).astype(np.float64)
        rng = np.random.default_rng([cfg.seed, 303, holders.index(device_id), 0 if task == "art" else 1])
        n = cfg.data.local_test_per_device
        test_labels = rng.choice(len(counts), size=n, p=counts / counts.sum())
        base = cfg.data.train_per_task + cfg.data.global_test_per_task + holders.index(device_id) * n
        test[task] = make_task_data(
            task,
            test_labels,
            np.arange(base, base + n),
            cfg.seed,
            cfg.model.image_size,
            cfg.model.max_text_len,
            tokenizer,
        )
    return DeviceData(train, test)


def build_global_test(cfg, task: str, tokenizer) -> TaskData:
    n = cfg.data.global_test_per_task
    labels = np.arange(n) % len(TASK_LABELS[task])
    idx = np.arange(cfg.data.train_per_task, cfg.data.train_per_task + n)
    return make_task_data(task, labels, idx, cfg.seed, cfg.model.image_size, cfg.model.max_text_len, tokenizer)
