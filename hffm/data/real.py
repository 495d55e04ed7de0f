"""A real data set prepared for a run: each task's answer vocabulary, its training pool (split over
devices by the same Dirichlet machinery as the synthetic set) and its test pool, images by reference.

Deterministic from the config: every process that prepares the same config gets the same vocabularies,
pools and partitions, so no data moves. A device's partition depends only on the starting membership
and the seed; a device that joins later draws its own (seeded by its id) from the pool, so nobody
else's partition changes. Each device reads only its partition's images, lazily.
"""

from __future__ import annotations

import json
import re
import zlib
from collections import Counter
from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch

from hffm.data.base import DataError, DeviceData, ImageCache, LazyImages, TaskData, dirichlet_split, tokenize
from hffm.data.sources import Record, Source, answer_counts, open_source

_WORD = re.compile(r"\w+|[^\w\s]+")  # what the tokenizers' Whitespace pre-tokenizer splits on
MAX_WORDS = 30000


def _task_seed(task: str) -> int:
    return zlib.crc32(task.encode())


def _subset(n: int, cap: int, seed: int, salt: int, task: str) -> np.ndarray:
    """A seeded subset of ``range(n)`` of at most ``cap`` indices, in file order."""
    if n <= cap:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([seed, salt, _task_seed(task)])
    return np.sort(rng.choice(n, size=cap, replace=False)).astype(np.int64)


def _weighted_draw(labels: np.ndarray, mix: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` distinct indices of ``labels`` (or all of them) drawn so their labels follow ``mix``."""
    counts = np.bincount(labels[labels >= 0], minlength=len(mix)).astype(np.float64)
    w = np.zeros(len(labels))
    ok = labels >= 0
    w[ok] = mix[labels[ok]] / np.maximum(counts[labels[ok]], 1)
    w += 1e-12  # never fails for want of support: a label outside the mix comes only once the mix runs out
    n = min(n, len(labels))
    return np.sort(rng.choice(len(labels), size=n, replace=False, p=w / w.sum())).astype(np.int64)


class RealData:
    """One source, prepared for ``tasks``: ``answers[task]``, ``train[task]`` / ``test[task]`` (Records of
    the pools) and their labels (-1: a test answer outside the vocabulary)."""

    def __init__(self, data_cfg, tasks: tuple[str, ...], seed: int, source: Source | None = None) -> None:
        self.cfg = data_cfg
        self.seed = seed
        self.source = src = source or open_source(data_cfg)
        train_all, test_all = src.records("train"), src.records("test")
        counts = answer_counts(train_all)
        self.answers: dict[str, list[str]] = {}
        self.train: dict[str, list[Record]] = {}
        self.test: dict[str, list[Record]] = {}
        self.train_labels: dict[str, np.ndarray] = {}
        self.test_labels: dict[str, np.ndarray] = {}
        self.dropped: dict[str, int] = {}  # training questions outside a top-K vocabulary
        self.splits: dict[tuple[str, tuple[str, ...]], dict[str, np.ndarray]] = {}  # (task, holders) -> partitions
        for task in tasks:
            if task not in counts:
                raise DataError(
                    f"{src.where('train')}: no training questions of task {task!r} (its tasks: {sorted(counts)}); "
                    "set `tasks` to a subset"
                )
            if src.explicit_answers is not None:
                answers = list(src.explicit_answers)
            else:
                ranked = sorted(counts[task].items(), key=lambda kv: (-kv[1], kv[0]))
                answers = [a for a, _ in ranked[: src.top_k]]
            index = {a: i for i, a in enumerate(answers)}
            tr = [r for r in train_all if r.task == task]
            te = [r for r in test_all if r.task == task]
            if src.explicit_answers is not None:
                for split, recs in (("train", tr), ("test", te)):
                    bad = next((r for r in recs if r.answer not in index), None)
                    if bad is not None:
                        raise DataError(
                            f"{src.where(split)}: entry {bad.qid}: answer {bad.answer!r} is not in the vocabulary "
                            f"({len(answers)} answers)"
                        )
            kept = [r for r in tr if r.answer in index]
            self.dropped[task] = len(tr) - len(kept)
            if not te:
                raise DataError(f"{src.where('test')}: no test questions of task {task!r}")
            pick = _subset(len(kept), data_cfg.train_per_task, seed, 505, task)
            self.train[task] = [kept[i] for i in pick]
            cap = max(data_cfg.global_test_per_task, data_cfg.local_test_per_device)
            self.test[task] = [te[i] for i in _subset(len(te), cap, seed, 606, task)]
            self.answers[task] = answers
            self.train_labels[task] = np.asarray([index[r.answer] for r in self.train[task]], dtype=np.int64)
            self.test_labels[task] = np.asarray([index.get(r.answer, -1) for r in self.test[task]], dtype=np.int64)
            for arr in (self.train_labels[task], self.test_labels[task]):
                arr.setflags(write=False)

    # -- what every process derives the same way ------------------------------------------------------
    def vocabulary(self) -> list[str]:
        """Words of the training questions (lower case), the most frequent ``MAX_WORDS``, sorted: the
        tiny backbone's offline tokenizer."""
        c: Counter = Counter()
        for recs in self.train.values():
            for r in recs:
                c.update(_WORD.findall(r.question.lower()))
        return sorted(w for w, _ in c.most_common(MAX_WORDS))

    def image_refs(self) -> list[tuple[str, str, str]]:
        """(image ref, entry id, file to name) of every image the run may use, each image once."""
        seen: dict[str, tuple[str, str, str]] = {}
        for split, pools in (("train", self.train), ("test", self.test)):
            for recs in pools.values():
                for r in recs:
                    seen.setdefault(r.image, (r.image, r.qid, self.source.where(split)))
        return list(seen.values())

    def check_images(self, load: Callable[[str], object]) -> int:
        """Open every image the run may use; ``DataError`` naming the first that fails and its entry."""
        refs = self.image_refs()
        for ref, qid, where in refs:
            try:
                load(ref)
            except DataError as err:
                raise DataError(f"{err} (entry {qid} of {where})") from None
        return len(refs)

    # -- partitions -------------------------------------------------------------------------------
    def partition(self, task: str, holders: tuple[str, ...], device: str) -> np.ndarray:
        """Training-pool indices of ``device``: its Dirichlet share when it is in ``holders`` (the starting
        membership), else a draw of its own (a joiner: its own label mix, seeded by its id)."""
        if device in holders:
            return _split(self, task, holders)[device]
        labels = self.train_labels[task]
        h = zlib.crc32(device.encode())
        rng = np.random.default_rng([self.seed, 404, h, _task_seed(task)])
        n = max(self.cfg.min_samples_per_device, len(labels) // max(1, len(holders)))
        mix = rng.dirichlet(np.full(len(self.answers[task]), self.cfg.alpha))
        return _weighted_draw(labels, mix, n, rng)

    def local_test(self, task: str, train_idx: np.ndarray, device: str) -> np.ndarray:
        """Test-pool indices of a device's local test: its training label mix, drawn from the test pool."""
        counts = np.bincount(self.train_labels[task][train_idx], minlength=len(self.answers[task])).astype(float)
        rng = np.random.default_rng([self.seed, 303, zlib.crc32(device.encode()), _task_seed(task)])
        return _weighted_draw(self.test_labels[task], counts / counts.sum(), self.cfg.local_test_per_device, rng)

    def task_data(
        self, task: str, split: str, idx: np.ndarray, tokenizer, max_len: int, load: Callable, cache: ImageCache
    ) -> TaskData:
        recs = [(self.train if split == "train" else self.test)[task][int(i)] for i in idx]
        labels = (self.train_labels if split == "train" else self.test_labels)[task][idx]
        input_ids, attention_mask = tokenize(tokenizer, [r.question for r in recs], max_len)
        scores = None
        if any(r.human_answers for r in recs):
            index = {a: i for i, a in enumerate(self.answers[task])}
            scores = []
            for r in recs:
                c = Counter(a for a in r.human_answers if a in index)
                scores.append({index[a]: min(n / 3.0, 1.0) for a, n in c.items()})
        return TaskData(
            task=task,
            input_ids=input_ids,
            attention_mask=attention_mask,
            images=LazyImages([r.image for r in recs], load, cache),
            labels=torch.as_tensor(np.asarray(labels), dtype=torch.long),
            answers=list(self.answers[task]),
            scores=scores,
        )


def _split(rd: RealData, task: str, holders: tuple[str, ...]) -> dict[str, np.ndarray]:
    # once per prepared data set: every device of a process needs the same split
    key = (task, holders)
    if key not in rd.splits:
        rng = np.random.default_rng([rd.seed, 202, _task_seed(task)])
        labels = rd.train_labels[task]
        try:
            parts = dirichlet_split(labels, len(holders), rd.cfg.alpha, rng, rd.cfg.min_samples_per_device)
        except ValueError as err:
            raise DataError(f"task {task!r}: {err} (data.min_samples_per_device, data.train_per_task)") from None
        for p in parts:
            p.setflags(write=False)
        rd.splits[key] = dict(zip(holders, parts, strict=True))
    return rd.splits[key]


@lru_cache(maxsize=4)
def _prepared(data_json: str, tasks: tuple[str, ...], seed: int) -> RealData:
    from hffm.config import DataConfig

    return RealData(DataConfig.model_validate(json.loads(data_json)), tasks, seed)


def prepared(cfg) -> RealData:
    """The run's real data set, prepared once per process."""
    return _prepared(cfg.data.model_dump_json(), tuple(cfg.tasks), cfg.seed)


def real_device_data(
    cfg, device_id: str, holders_by_task: dict[str, list[str]], tokenizer, tasks, load, cache
) -> DeviceData:
    rd = prepared(cfg)
    train, test = {}, {}
    for task, holders in holders_by_task.items():
        if device_id not in holders and task not in tasks:
            continue
        idx = rd.partition(task, tuple(holders), device_id)
        train[task] = rd.task_data(task, "train", idx, tokenizer, cfg.model.max_text_len, load, cache)
        test[task] = rd.task_data(
            task, "test", rd.local_test(task, idx, device_id), tokenizer, cfg.model.max_text_len, load, cache
        )
    return DeviceData(train, test)
