"""Readers of real VQA data sets from local files: each turns its split files into ``Record``s (one per
question, images by reference) and opens one image on demand. No download, no image read here except
``open_image``; the errors name the file and the entry at fault.

- ``easy-vqa``: the easy-VQA package's files (pip ``easy-vqa``); tasks are its question families,
  told by the answer: ``shape``, ``color``, ``yesno``.
- ``vqa-v2``: the official questions + annotations JSONs and COCO image directory; tasks are the
  annotations' ``answer_type`` (``yes/no`` -> ``yesno``, ``number``, ``other``); each question keeps
  its ten human answers for VQA accuracy.
- ``gqa``: GQA's balanced questions JSON (``{question_id: {imageId, question, answer, types}}``);
  tasks are ``types.structural``.
- ``hf-disk``: a ``datasets`` DatasetDict saved with ``save_to_disk``; columns named in config.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hffm.data.base import DataError
from hffm.ids import EASY_VQA_TASKS

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Record:
    """One question of a real data set."""

    qid: str  # the entry's id in its file (question_id, or the row)
    question: str
    image: str  # a file path, or a source-specific reference (hf-disk: "<split>/<row>")
    answer: str
    task: str
    human_answers: tuple[str, ...] = ()  # VQA v2: the ten annotators' answers (VQA accuracy)


class Source:
    """A real data set: ``records(split)`` in file order, ``open_image(ref)``, ``where(split)`` (the file
    to name in errors). ``explicit_answers``: a vocabulary given in advance (None: top-K of training)."""

    name = ""
    top_k = 1 << 30
    explicit_answers: list[str] | None = None

    def records(self, split: str) -> list[Record]:  # pragma: no cover - interface
        raise NotImplementedError

    def where(self, split: str) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def open_image(self, ref: str):
        """A PIL image (RGB) for ``ref``; ``DataError`` naming the file when it is missing or unreadable."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(ref) as im:
                return im.convert("RGB")
        except FileNotFoundError:
            raise DataError(f"{ref}: no such image file") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            raise DataError(f"{ref}: unreadable image ({err})") from None


def _read_json(path: str, what: str) -> Any:
    if not path:
        raise DataError(f"{what}: not set")
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what}: {path}: no such file")
    try:
        with p.open("rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None


def _field(entry: Any, key: str, path: str, where: str, kind: type = str) -> Any:
    if not isinstance(entry, dict) or key not in entry:
        raise DataError(f"{path}: {where}: missing {key!r}")
    value = entry[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise DataError(f"{path}: {where}: {key!r} is not a {kind.__name__} ({value!r})")
    return value


def _image_dir(path: str, what: str) -> str:
    if not path:
        raise DataError(f"{what}: not set")
    if not os.path.isdir(path):
        raise DataError(f"{what}: {path}: no such directory")
    return path


def normalize_answer(a: str) -> str:
    """Answers compared as VQA's evaluation does in the main: lower case, outer spaces and a final
    period dropped."""
    return a.strip().lower().rstrip(".").strip()


# --------------------------------------------------------------------------------------------
class EasyVQA(Source):
    name = "easy-vqa"

    def __init__(self) -> None:
        try:
            import easy_vqa
        except ImportError:
            raise DataError("data.source: easy-vqa needs the easy-vqa package: pip install 'hffm[easy-vqa]'") from None
        self.ev = easy_vqa
        self._family = {a: task for task, answers in EASY_VQA_TASKS.items() for a in answers}

    def where(self, split: str) -> str:
        return os.path.join(os.path.dirname(self.ev.__file__), "data", split, "questions.json")

    def records(self, split: str) -> list[Record]:
        questions, answers, image_ids = (
            self.ev.get_train_questions() if split == "train" else self.ev.get_test_questions()
        )
        paths = self.ev.get_train_image_paths() if split == "train" else self.ev.get_test_image_paths()
        out = []
        for i, (q, a, img) in enumerate(zip(questions, answers, image_ids, strict=True)):
            task = self._family.get(a)
            if task is None:
                raise DataError(f"{self.where(split)}: entry {i}: answer {a!r} is in no task's vocabulary")
            if img not in paths:
                raise DataError(f"{self.where(split)}: entry {i}: image {img} has no file")
            out.append(Record(str(i), q, paths[img], a, task))
        return out


class VQAv2(Source):
    name = "vqa-v2"
    TYPES = {"yes/no": "yesno", "number": "number", "other": "other"}

    def __init__(self, cfg) -> None:  # cfg: hffm.config.VQAv2Config
        self.cfg = cfg
        self.top_k = cfg.top_k

    def _files(self, split: str) -> tuple[str, str, str, str]:
        c = self.cfg
        if split == "train":
            return c.train_questions, c.train_annotations, c.train_images, c.train_image_pattern
        return c.test_questions, c.test_annotations, c.test_images, c.test_image_pattern

    def where(self, split: str) -> str:
        return self._files(split)[0]

    def records(self, split: str) -> list[Record]:
        qfile, afile, images, pattern = self._files(split)
        key = f"data.vqa_v2.{split}_"
        qs = _read_json(qfile, key + "questions")
        ann = _read_json(afile, key + "annotations")
        images = _image_dir(images, key + "images")
        if not isinstance(qs, dict) or not isinstance(qs.get("questions"), list):
            raise DataError(f"{qfile}: expected an object with a 'questions' list")
        if not isinstance(ann, dict) or not isinstance(ann.get("annotations"), list):
            raise DataError(f"{afile}: expected an object with an 'annotations' list")
        by_q: dict[int, dict] = {}
        for i, a in enumerate(ann["annotations"]):
            qid = _field(a, "question_id", afile, f"annotation {i}", int)
            by_q[qid] = a
        out = []
        for i, q in enumerate(qs["questions"]):
            qid = _field(q, "question_id", qfile, f"question {i}", int)
            where = f"question_id {qid}"
            text = _field(q, "question", qfile, where)
            image_id = _field(q, "image_id", qfile, where, int)
            a = by_q.get(qid)
            if a is None:
                raise DataError(f"{afile}: no annotation for question_id {qid} (of {qfile})")
            atype = _field(a, "answer_type", afile, where)
            mc = normalize_answer(_field(a, "multiple_choice_answer", afile, where))
            humans = _field(a, "answers", afile, where, list)
            human = tuple(normalize_answer(_field(h, "answer", afile, f"{where} answers")) for h in humans)
            if self.cfg.tasks_by == "none":
                task = "vqa"
            elif atype in self.TYPES:
                task = self.TYPES[atype]
            else:
                raise DataError(f"{afile}: {where}: answer_type {atype!r} is not one of {list(self.TYPES)}")
            try:
                name = pattern.format(image_id=image_id)
            except (KeyError, IndexError, ValueError) as err:
                raise DataError(f"data.vqa_v2.{split}_image_pattern: {pattern!r}: {err}") from None
            out.append(Record(str(qid), text, os.path.join(images, name), mc, task, human))
        return out


class GQA(Source):
    name = "gqa"

    def __init__(self, cfg) -> None:  # cfg: hffm.config.GQAConfig
        self.cfg = cfg
        self.top_k = cfg.top_k

    def where(self, split: str) -> str:
        return self.cfg.train_questions if split == "train" else self.cfg.test_questions

    def records(self, split: str) -> list[Record]:
        qfile = self.where(split)
        qs = _read_json(qfile, f"data.gqa.{split}_questions")
        images = _image_dir(self.cfg.images, "data.gqa.images")
        if not isinstance(qs, dict):
            raise DataError(f"{qfile}: expected an object keyed by question id")
        out = []
        for qid, q in qs.items():
            where = f"question {qid}"
            text = _field(q, "question", qfile, where)
            answer = normalize_answer(_field(q, "answer", qfile, where))
            image_id = _field(q, "imageId", qfile, where)
            if self.cfg.tasks_by == "none":
                task = "gqa"
            else:
                types = _field(q, "types", qfile, where, dict)
                task = _field(types, "structural", qfile, where + " types")
            out.append(
                Record(
                    str(qid), text, os.path.join(images, self.cfg.image_pattern.format(image_id=image_id)), answer, task
                )
            )
        return out


class HFDisk(Source):
    name = "hf-disk"

    def __init__(self, cfg) -> None:  # cfg: hffm.config.HFDiskConfig
        self.cfg = cfg
        try:
            from datasets import load_from_disk
        except ImportError:
            raise DataError("data.source: hf-disk needs the datasets package: pip install 'hffm[datasets]'") from None
        if not cfg.path:
            raise DataError("data.hf_disk.path: not set")
        if not os.path.isdir(cfg.path):
            raise DataError(f"data.hf_disk.path: {cfg.path}: no such directory")
        try:
            self.dd = load_from_disk(cfg.path)
        except (FileNotFoundError, ValueError, OSError) as err:
            raise DataError(f"data.hf_disk.path: {cfg.path}: not a save_to_disk directory ({err})") from None
        if not hasattr(self.dd, "keys"):
            raise DataError(f"data.hf_disk.path: {cfg.path}: a single Dataset; save a DatasetDict with its splits")
        self.explicit_answers = [normalize_answer(a) for a in cfg.answers] if cfg.answers else None

    def _split(self, split: str):
        name = self.cfg.train_split if split == "train" else self.cfg.test_split
        if name not in self.dd:
            raise DataError(f"data.hf_disk.{split}_split: {self.cfg.path} has no split {name!r} (has {list(self.dd)})")
        return name, self.dd[name]

    def where(self, split: str) -> str:
        return f"{self.cfg.path} [{self._split(split)[0]}]"

    def records(self, split: str) -> list[Record]:
        name, ds = self._split(split)
        c = self.cfg
        for key in ("image_column", "question_column", "answer_column", "task_column"):
            col = getattr(c, key)
            if col is not None and col not in ds.column_names:
                raise DataError(f"data.hf_disk.{key}: {self.where(split)} has no column {col!r} ({ds.column_names})")
        questions, answers = ds[c.question_column], ds[c.answer_column]
        tasks = ds[c.task_column] if c.task_column else ["vqa"] * len(ds)
        out = []
        for row, (q, a, t) in enumerate(zip(questions, answers, tasks, strict=True)):
            if not isinstance(q, str) or not isinstance(a, str) or not isinstance(t, str):
                raise DataError(f"{self.where(split)}: row {row}: question, answer and task must be strings")
            out.append(Record(str(row), q, f"{name}/{row}", normalize_answer(a), t))
        return out

    def open_image(self, ref: str):
        name, row = ref.rsplit("/", 1)
        value = self.dd[name][int(row)][self.cfg.image_column]
        if isinstance(value, str):
            return super().open_image(value)
        if isinstance(value, dict) and value.get("path") and not value.get("bytes"):
            return super().open_image(value["path"])
        if hasattr(value, "convert"):
            return value.convert("RGB")
        raise DataError(f"{self.cfg.path} [{name}]: row {row}: column {self.cfg.image_column!r} holds no image")


def open_source(data_cfg) -> Source:
    """The reader of ``data.source`` (not ``synthetic``)."""
    if data_cfg.source == "easy-vqa":
        return EasyVQA()
    if data_cfg.source == "vqa-v2":
        return VQAv2(data_cfg.vqa_v2)
    if data_cfg.source == "gqa":
        return GQA(data_cfg.gqa)
    if data_cfg.source == "hf-disk":
        return HFDisk(data_cfg.hf_disk)
    raise ValueError(f"data.source {data_cfg.source!r} has no file reader")


def answer_counts(records: list[Record]) -> dict[str, Counter]:
    counts: dict[str, Counter] = {}
    for r in records:
        counts.setdefault(r.task, Counter())[r.answer] += 1
    return counts
