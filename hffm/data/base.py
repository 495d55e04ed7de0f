"""What every data source shares: a task's samples as tensors (``TaskData``), images held or loaded
lazily, the non-IID Dirichlet split, offline word-level tokenizers and the data error type."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class DataError(ValueError):
    """A data set is missing, malformed or inconsistent with the config; the message names the file
    (and the entry) at fault."""


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------
class ImageStore:
    """Pixel tensors of a task's samples by sample index: ``get(idx) -> (pixel_values, pixel_mask)``."""

    def __len__(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def get(self, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError


class TensorImages(ImageStore):
    """Images already in memory, all of one size (the synthetic set: rendered at start)."""

    def __init__(self, pixel_values: torch.Tensor) -> None:
        self.pixel_values = pixel_values

    def __len__(self) -> int:
        return int(self.pixel_values.shape[0])

    def get(self, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        pv = self.pixel_values[torch.as_tensor(idx, dtype=torch.long)]
        return pv, torch.ones(pv.shape[0], pv.shape[2], pv.shape[3], dtype=torch.long)


class ImageCache:
    """A bounded LRU of prepared images (3, H, W) by file path, shared by a process's devices (many
    questions ask about one image). Thread-safe."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str, load: Callable[[str], torch.Tensor]) -> torch.Tensor:
        with self._lock:
            hit = self._items.get(path)
            if hit is not None:
                self._items.move_to_end(path)
                return hit
        img = load(path)  # outside the lock: decoding is the slow part
        with self._lock:
            self._items[path] = img
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return img


class LazyImages(ImageStore):
    """Images read from disk when a batch needs them (through a shared cache), never the whole set in
    memory. Images of different sizes in one batch are zero-padded to the largest, with a pixel mask
    (what ViLT's processor does)."""

    def __init__(self, paths: Sequence[str], load: Callable[[str], torch.Tensor], cache: ImageCache) -> None:
        self.paths = list(paths)
        self.load = load
        self.cache = cache

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        imgs = [self.cache.get(self.paths[int(i)], self.load) for i in idx]
        h = max(int(im.shape[1]) for im in imgs)
        w = max(int(im.shape[2]) for im in imgs)
        if all(im.shape[1] == h and im.shape[2] == w for im in imgs):
            return torch.stack(imgs), torch.ones(len(imgs), h, w, dtype=torch.long)
        pv = torch.zeros(len(imgs), 3, h, w)
        mask = torch.zeros(len(imgs), h, w, dtype=torch.long)
        for k, im in enumerate(imgs):
            pv[k, :, : im.shape[1], : im.shape[2]] = im
            mask[k, : im.shape[1], : im.shape[2]] = 1
        return pv, mask


# --------------------------------------------------------------------------------------------
# Samples of one task
# --------------------------------------------------------------------------------------------
@dataclass
class TaskData:
    """One task's samples: questions tokenised up front (small), images from an ``ImageStore``.

    ``answers`` is the task's answer vocabulary (label i is ``answers[i]``). ``scores`` (VQA v2) gives,
    per sample, the VQA accuracy each answer earns (min(#annotators who gave it / 3, 1)); without it a
    prediction scores 1 when it equals the label. A test sample whose answer lies outside the
    vocabulary has label -1: it can only score through ``scores``."""

    task: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    images: ImageStore
    labels: torch.Tensor
    answers: list[str] = field(default_factory=list)
    scores: list[dict[int, float]] | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, idx: torch.Tensor, device: str = "cpu") -> dict[str, torch.Tensor]:
        pv, mask = self.images.get(idx.tolist())
        return {
            "input_ids": self.input_ids[idx].to(device),
            "attention_mask": self.attention_mask[idx].to(device),
            "pixel_values": pv.to(device),
            "pixel_mask": mask.to(device),
            "labels": self.labels[idx].to(device),
        }

    def score(self, idx: torch.Tensor, pred: torch.Tensor) -> tuple[int, float | None]:
        """(exact matches, summed VQA accuracy or None) of predictions ``pred`` for samples ``idx``."""
        correct = int((pred.cpu() == self.labels[idx]).sum())
        if self.scores is None:
            return correct, None
        return correct, float(sum(self.scores[int(i)].get(int(p), 0.0) for i, p in zip(idx, pred.cpu(), strict=True)))

    def label_counts(self) -> list[int]:
        lab = self.labels[self.labels >= 0]
        return torch.bincount(lab, minlength=len(self.answers)).tolist()


@dataclass
class DeviceData:
    train: dict[str, TaskData]
    test: dict[str, TaskData]

    def train_samples(self) -> dict[str, int]:
        return {t: len(d) for t, d in self.train.items()}


def tokenize(tokenizer, questions: list[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not questions:
        return torch.zeros(0, max_len, dtype=torch.long), torch.zeros(0, max_len, dtype=torch.long)
    enc = tokenizer(questions, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


# --------------------------------------------------------------------------------------------
# Non-IID split
# --------------------------------------------------------------------------------------------
def dirichlet_split(
    labels: np.ndarray, n_parts: int, alpha: float, rng: np.random.Generator, min_size: int = 1
) -> list[np.ndarray]:
    """Split sample indices over ``n_parts`` with a Dirichlet(alpha) over each label's share.

    Redraws (bounded) until every part holds at least ``min_size`` samples, the usual practice for
    small alpha. With many parts that can be hopeless (Dirichlet(0.1) over 40 devices), so the last
    draw is then repaired: a part short of ``min_size`` takes samples, preferably of labels it
    already holds, from the largest part. Raises when the pool is too small."""
    if n_parts < 1:
        raise ValueError("n_parts must be >= 1")
    if len(labels) < n_parts * min_size:
        raise ValueError(f"{len(labels)} samples cannot give {n_parts} parts of >= {min_size}")
    classes = np.unique(labels)
    parts: list[list[int]] = []
    for _ in range(100):
        parts = [[] for _ in range(n_parts)]
        for c in classes:
            idx = np.flatnonzero(labels == c)
            idx = idx[rng.permutation(len(idx))]
            props = rng.dirichlet(np.full(n_parts, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for p, piece in enumerate(np.split(idx, cuts)):
                parts[p].extend(piece.tolist())
        if min(len(p) for p in parts) >= min_size:
            break
    else:
        for small in range(n_parts):
            while len(parts[small]) < min_size:
                big = max(range(n_parts), key=lambda k: len(parts[k]))
                have = {int(labels[i]) for i in parts[small]}
                pick = [j for j, i in enumerate(parts[big]) if int(labels[i]) in have] or list(range(len(parts[big])))
                j = pick[int(rng.integers(len(pick)))]
                parts[small].append(parts[big].pop(j))
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


# --------------------------------------------------------------------------------------------
# Tokenizers built offline
# --------------------------------------------------------------------------------------------
def word_level_tokenizer(words: Sequence[str], lowercase: bool = False):
    """A word-level ``PreTrainedTokenizerFast`` over ``words`` (plus BERT's special tokens), built
    without any download: ``[CLS] question [SEP]``, unknown words as ``[UNK]``."""
    from tokenizers import Tokenizer, normalizers
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + [w for w in words if w not in SPECIAL])}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="[UNK]"))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = Whitespace()
    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
