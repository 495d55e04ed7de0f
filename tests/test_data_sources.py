"""Real data sources on fixtures the tests make in each official layout (VQA v2, GQA, a datasets
save_to_disk directory) and on the easy-VQA package: vocabularies, partitions, VQA accuracy, lazy
images, and every error naming its file and entry before any process starts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from hffm.config import load_config
from hffm.data import (
    DataError,
    build_device_data,
    build_global_test,
    load_tokenizer,
    preflight,
    task_answers,
)
from hffm.data.base import ImageCache, LazyImages
from hffm.topology import Topology

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 20)]


def _image(path: Path, k: int, size: tuple[int, int] = (24, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, COLOURS[k % len(COLOURS)]).save(path)


def _vqa_split(root: Path, split: str, n: int) -> dict[str, str]:
    """n questions over n // 2 images in the official VQA v2 layout; answer types cycle."""
    imgs = root / f"{split}2014"
    questions, annotations = [], []
    kinds = [("yes/no", ["yes", "no"]), ("number", ["2", "3", "4"]), ("other", ["red", "blue", "cat"])]
    for i in range(n):
        image_id = 100 + i // 2
        _image(imgs / f"COCO_{split}2014_{image_id:012d}.jpg", i)
        atype, answers = kinds[i % 3]
        mc = answers[(i // 3) % len(answers)]
        humans = [mc] * 7 + [answers[(i // 3 + 1) % len(answers)]] * 3
        questions.append({"image_id": image_id, "question": f"What about thing {i}?", "question_id": 1000 + i})
        annotations.append(
            {
                "question_id": 1000 + i,
                "image_id": image_id,
                "answer_type": atype,
                "multiple_choice_answer": mc,
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(humans)
                ],
            }
        )
    qf, af = root / f"v2_{split}_questions.json", root / f"v2_{split}_annotations.json"
    qf.write_text(json.dumps({"questions": questions}))
    af.write_text(json.dumps({"annotations": annotations}))
    return {"questions": str(qf), "annotations": str(af), "images": str(imgs)}


@pytest.fixture
def vqa_root(tmp_path):
    root = tmp_path / "vqa"
    tr, te = _vqa_split(root, "train", 60), _vqa_split(root, "val", 30)
    sets = [f"data.vqa_v2.train_{k}={v}" for k, v in tr.items()]
    sets += [f"data.vqa_v2.test_{k}={v}" for k, v in te.items()]
    return root, sets + ["data.source=vqa-v2"]


SMALL = [
    "topology.edges=1",
    "topology.devices_per_edge=3",
    "data.min_samples_per_device=2",
    "data.local_test_per_device=4",
    "data.global_test_per_task=8",
]


def test_vqa_v2_vocabulary_tasks_partition_and_vqa_accuracy(vqa_root):
    _, sets = vqa_root
    cfg = load_config(None, [*sets, *SMALL, "data.vqa_v2.top_k=2"])
    assert cfg.tasks == ["yesno", "number", "other"]
    answers = task_answers(cfg)
    assert answers["yesno"] == ["no", "yes"] or answers["yesno"] == ["yes", "no"]
    assert len(answers["number"]) == 2 and len(answers["other"]) == 2  # top-2 of three
    line = preflight(cfg)
    assert "dropped outside the top 2" in line and "images checked" in line
    tok = load_tokenizer(cfg)
    assert tok.unk_token_id not in tok("What about THING ?")["input_ids"]  # built from the questions' words
    topo = Topology.from_config(cfg, 4)
    holders = topo.holders_by_task()
    parts = [build_device_data(cfg, d.id, holders, tok) for d in topo.devices]
    for task in cfg.tasks:
        sizes = sum(len(p.train[task]) for p in parts)
        assert sizes == len(build_device_data(cfg, "device-0-0", holders, tok).train[task]) + sum(
            len(p.train[task]) for p in parts[1:]
        )
    # VQA accuracy: 7 annotators said the label, 3 another answer -> 1.0 for the label, 3/3 = 1.0 for the other
    test = build_global_test(cfg, "number", tok)
    assert test.scores is not None and len(test) == 8
    labels = test.labels
    ok = labels >= 0
    idx = torch.arange(len(test))[ok]
    correct, score = test.score(idx, labels[ok])
    assert correct == int(ok.sum()) and score == pytest.approx(float(ok.sum()))
    wrong = (labels[ok] + 1) % 2  # the other vocabulary answer: given by 3 annotators, or by none
    _, s2 = test.score(idx, wrong)
    assert 0 <= s2 <= float(ok.sum()) and s2 != score


def test_partitions_are_reproducible_and_a_joiner_changes_nobody(vqa_root):
    _, sets = vqa_root
    cfg = load_config(None, [*sets, *SMALL, "tasks=[other]"])
    topo = Topology.from_config(cfg, 4)
    tok = load_tokenizer(cfg)
    holders = topo.holders_by_task()

    def labels_of(dev):
        return {t: d.labels.tolist() for t, d in build_device_data(cfg, dev, holders, tok).train.items()}

    before = {d.id: labels_of(d.id) for d in topo.devices}
    joiner = build_device_data(cfg, "device-0-9", holders, tok, ("other",))
    assert len(joiner.train["other"]) >= cfg.data.min_samples_per_device
    assert {d.id: labels_of(d.id) for d in topo.devices} == before  # same split, every time, joiner or not
    other_seed = load_config(None, [*sets, *SMALL, "tasks=[other]", "seed=5"])
    from hffm.data.real import RealData

    a = RealData(cfg.data, ("other",), 0).partition("other", tuple(holders["other"]), "device-0-0")
    b = RealData(other_seed.data, ("other",), 5).partition("other", tuple(holders["other"]), "device-0-0")
    assert a.tolist() != b.tolist() or len(a) == len(RealData(cfg.data, ("other",), 0).train["other"])


def test_gqa_tasks_by_structural_type(tmp_path):
    root = tmp_path / "gqa"
    kinds = [("verify", "yes"), ("query", "table"), ("choose", "left"), ("verify", "no"), ("query", "chair")]
    for split, n in (("train", 40), ("val", 15)):
        qs = {}
        for i in range(n):
            kind, ans = kinds[i % len(kinds)]
            _image(root / "images" / f"n{i % 7}.jpg", i)
            qs[f"{split}{i}"] = {
                "imageId": f"n{i % 7}",
                "question": f"Is the object {i} there?",
                "answer": ans,
                "types": {"structural": kind, "semantic": "obj"},
            }
        (root / f"{split}_balanced_questions.json").write_text(json.dumps(qs))
    sets = [
        "data.source=gqa",
        f"data.gqa.train_questions={root / 'train_balanced_questions.json'}",
        f"data.gqa.test_questions={root / 'val_balanced_questions.json'}",
        f"data.gqa.images={root / 'images'}",
        *SMALL,
    ]
    with pytest.raises(DataError, match=r"no training questions of task 'logical'"):
        preflight(load_config(None, sets))  # the default: all five structural types
    cfg = load_config(None, [*sets, "tasks=[verify,query,choose]"])
    assert task_answers(cfg) == {"verify": ["no", "yes"], "query": ["chair", "table"], "choose": ["left"]}
    assert "verify (16 train" in preflight(cfg)


def _hf_disk(tmp_path: Path, answers_train: list[str]) -> Path:
    datasets = pytest.importorskip("datasets", reason="the hf-disk source needs `datasets` (hffm[datasets])")

    def split(n: int, answers: list[str]):
        return datasets.Dataset.from_dict(
            {
                "image": [Image.new("RGB", (20 + i % 3, 20), COLOURS[i % 4]) for i in range(n)],
                "question": [f"what colour {i}" for i in range(n)],
                "answer": [answers[i % len(answers)] for i in range(n)],
                "kind": ["colour" if i % 2 else "size" for i in range(n)],
            },
            features=datasets.Features(
                {
                    "image": datasets.Image(),
                    "question": datasets.Value("string"),
                    "answer": datasets.Value("string"),
                    "kind": datasets.Value("string"),
                }
            ),
        )

    path = tmp_path / "hf"
    datasets.DatasetDict({"train": split(30, answers_train), "test": split(12, ["red", "big"])}).save_to_disk(path)
    return path


def test_hf_disk_images_from_the_arrow_files_and_task_column(tmp_path):
    path = _hf_disk(tmp_path, ["red", "big", "blue"])
    sets = ["data.source=hf-disk", f"data.hf_disk.path={path}", "data.hf_disk.task_column=kind", *SMALL]
    with pytest.raises(Exception, match="tasks: list the tasks"):
        load_config(None, sets)
    cfg = load_config(None, [*sets, "tasks=[colour,size]"])
    assert "images checked" in preflight(cfg)
    tok = load_tokenizer(cfg)
    topo = Topology.from_config(cfg, 4)
    dd = build_device_data(cfg, "device-0-1", topo.holders_by_task(), tok)
    batch = dd.train["colour"].batch(torch.arange(len(dd.train["colour"])))
    assert batch["pixel_values"].shape[-2:] == (cfg.model.image_size, cfg.model.image_size)
    # a given vocabulary: an answer outside it is an error naming the row
    bad = load_config(None, [*sets, "tasks=[colour,size]", "data.hf_disk.answers=[red,big]"])
    with pytest.raises(DataError, match=r"\[train\]: entry \d+: answer 'blue' is not in the vocabulary"):
        preflight(bad)


def test_errors_name_the_file_and_the_entry(vqa_root, tmp_path):
    root, sets = vqa_root
    cfg = load_config(None, [*sets, *SMALL])
    assert preflight(cfg)
    from hffm.data.real import _prepared

    def fresh(extra=()):
        _prepared.cache_clear()
        return load_config(None, [*sets, *SMALL, *extra])

    # a missing image
    victim = root / "train2014" / "COCO_train2014_000000000100.jpg"
    victim.unlink()
    with pytest.raises(DataError, match=r"COCO_train2014_000000000100.jpg: no such image file \(entry 100[01] of "):
        preflight(fresh())
    # an unreadable image
    victim.write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match=r"COCO_train2014_000000000100.jpg: unreadable image"):
        preflight(fresh())
    _image(victim, 0)
    # malformed JSON
    qf = Path(dict(s.split("=", 1) for s in sets)["data.vqa_v2.train_questions"])
    good = qf.read_text()
    qf.write_text(good[:-10])
    with pytest.raises(DataError, match=rf"{qf}: not valid JSON"):
        preflight(fresh())
    # an entry without its question
    data = json.loads(good)
    del data["questions"][3]["question"]
    qf.write_text(json.dumps(data))
    with pytest.raises(DataError, match=rf"{qf}: question_id 1003: missing 'question'"):
        preflight(fresh())
    qf.write_text(good)
    # a question without annotation
    af = Path(dict(s.split("=", 1) for s in sets)["data.vqa_v2.train_annotations"])
    good_ann = af.read_text()
    ann = json.loads(good_ann)
    ann["annotations"] = ann["annotations"][1:]
    af.write_text(json.dumps(ann))
    with pytest.raises(DataError, match="no annotation for question_id 1000"):
        preflight(fresh())
    af.write_text(good_ann)
    # files not set or absent
    with pytest.raises(DataError, match="data.vqa_v2.test_images: /nowhere: no such directory"):
        preflight(fresh(["data.vqa_v2.test_images=/nowhere"]))
    _prepared.cache_clear()


def test_hffm_run_refuses_broken_data_before_starting_anything(vqa_root, tmp_path):
    from hffm_cli.main import app

    root, sets = vqa_root
    (root / "val2014" / "COCO_val2014_000000000101.jpg").unlink()
    from hffm.data.real import _prepared

    _prepared.cache_clear()
    out = tmp_path / "run"
    args = ["run", "--out", str(out)] + [a for s in [*sets, *SMALL] for a in ("--set", s)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1, r.output
    text = r.output.replace("\n", "")  # the console wraps long lines
    assert "data error:" in text and "COCO_val2014_000000000101.jpg: no such image file" in text
    assert not (out / "processes.json").exists() and not list((out / "logs").iterdir())
    _prepared.cache_clear()


def test_lazy_images_pad_mixed_sizes_and_the_cache_stays_bounded():
    loads = []

    def load(ref: str) -> torch.Tensor:
        loads.append(ref)
        h, w = (int(x) for x in ref.split("x"))
        return torch.ones(3, h, w)

    cache = ImageCache(2)
    imgs = LazyImages(["4x6", "5x3", "4x6"], load, cache)
    pv, mask = imgs.get([0, 1, 2])
    assert pv.shape == (3, 3, 5, 6) and mask.shape == (3, 5, 6)
    assert mask[0].sum() == 24 and mask[1].sum() == 15 and mask[1, :, 3:].sum() == 0
    assert loads == ["4x6", "5x3"]  # the repeated image came from the cache
    LazyImages(["1x1", "2x2", "3x3"], load, cache).get([0, 1, 2])
    assert len(cache._items) == 2


def test_easy_vqa_tasks_are_its_question_families():
    cfg = load_config(None, ["data.source=easy-vqa", *SMALL, "data.train_per_task=60"])
    assert cfg.tasks == ["shape", "color", "yesno"]
    line = preflight(cfg)
    assert "shape (60 train" in line
    tok = load_tokenizer(cfg)
    topo = Topology.from_config(cfg, 4)
    dd = build_device_data(cfg, "device-0-2", topo.holders_by_task(), tok)
    d = dd.train["color"]
    colours = set(task_answers(cfg)["color"])
    assert {d.answers[i] for i in d.labels.tolist()} <= colours
    qs = tok.batch_decode(d.input_ids, skip_special_tokens=True)
    assert all("color" in q or "colour" in q for q in qs)
    assert np.isfinite(d.batch(torch.arange(2))["pixel_values"].numpy()).all()


def save_full_size_checkpoint(path: Path, words: list[str]) -> Path:
    """The paper's backbone architecture (ViLT-B/32: hidden 768, 12 layers, 384 px) with random weights,
    and a ``ViltProcessor`` (a BERT WordPiece tokenizer over ``words``, ViLT's image processor) beside it:
    what ``save_pretrained`` of dandelin/vilt-b32-mlm looks like on disk, without the download."""
    from transformers import BertTokenizer, ViltConfig, ViltImageProcessor, ViltModel, ViltProcessor

    path.mkdir(parents=True)
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = BertTokenizer(str(vocab), do_lower_case=True)  # positional: transformers 4 (vocab_file) and 5 (vocab)
    assert len(tok) == 5 + len(words)
    config = ViltConfig(vocab_size=len(tok), max_position_embeddings=40)  # the defaults: ViLT-B/32 at 384 px
    assert (config.hidden_size, config.num_hidden_layers, config.image_size) == (768, 12, 384)
    torch.manual_seed(0)
    ViltModel(config).save_pretrained(path)
    ViltProcessor(image_processor=ViltImageProcessor(), tokenizer=tok).save_pretrained(path)
    return path


def test_full_size_checkpoint_and_its_processor_run_a_round_over_grpc(tmp_path):
    """model.backbone: a directory in the paper's architecture: the model with from_pretrained, the
    tokenizer and image processor (ViltProcessor) from the same directory, one short round on CPU
    through real services."""
    import io

    from rich.console import Console

    from hffm.data import image_loader
    from hffm.data.real import prepared
    from services.launcher import run

    sets = ["data.source=easy-vqa", "tasks=[shape]"]
    words = prepared(load_config(None, sets)).vocabulary()
    ckpt = save_full_size_checkpoint(tmp_path / "vilt-b32", words)
    cfg = load_config(
        None,
        [
            *sets,
            f"model.backbone={ckpt}",
            "method=star",
            "rounds=1",
            "topology.edges=1",
            "topology.devices_per_edge=1",
            "data.train_per_task=4",
            "data.min_samples_per_device=1",
            "data.local_test_per_device=2",
            "data.global_test_per_task=2",
            "train.batch_size=2",
            "runtime.round_timeout_s=300",
        ],
    )
    tok = load_tokenizer(cfg)
    assert type(tok).__name__.startswith("Bert") and tok.unk_token_id not in tok("what shape is present?")["input_ids"]
    assert image_loader(cfg)(prepared(cfg).train["shape"][0].image).shape == (3, 384, 384)  # the processor's size
    results = run(cfg, tmp_path / "run", Console(file=io.StringIO()), timeout_s=600)
    r = results["rounds"][-1]
    assert results["complete"] and r["train_samples"] == 4
    assert set(r["accuracy"]["shape"]) == {"local", "global"}
    # the modules moved are the paper-size Double-Adapters: 12 layers x 2 x (768x256 + 256 + 256x768 + 768) fp32
    adapters = sum(b for m, b in r["bytes_by_module"].items() if m.startswith("adapter."))
    assert adapters >= 2 * 12 * 2 * (2 * 768 * 256 + 256 + 768) * 4


def test_easy_vqa_federation_over_grpc(tmp_path):
    """A short hfm run of real services on easy-VQA: three heads (its question families) trained and
    aggregated, accuracy reported for each, the data partition reported at registration."""
    import io

    from rich.console import Console

    from services.launcher import run

    cfg = load_config(
        None,
        [
            "data.source=easy-vqa",
            "method=hfm",
            "rounds=2",
            "e_agg=2",
            "topology.edges=1",
            "topology.devices_per_edge=2",
            "data.train_per_task=48",
            "data.local_test_per_device=8",
            "data.global_test_per_task=16",
        ],
    )
    results = run(cfg, tmp_path / "run", Console(file=io.StringIO()), timeout_s=600)
    assert results["complete"] and [r["round"] for r in results["rounds"]] == [1, 2]
    last = results["rounds"][-1]
    assert set(last["accuracy"]) == {"shape", "color", "yesno"}
    assert all(0.0 <= v["global"] <= 1.0 for v in last["accuracy"].values())
    assert {m for m in last["bytes_by_module"] if m.startswith("head.")} == {"head.shape", "head.color", "head.yesno"}
    assert last["cloud_aggregation"] and last["train_samples"] == 3 * 48


def test_hffm_centralised_trains_the_modules_on_the_whole_pool(tmp_path):
    from hffm_cli.main import app

    sets = [
        "data.source=easy-vqa",
        "tasks=[color]",
        "rounds=2",
        "data.train_per_task=64",
        "data.global_test_per_task=32",
    ]
    r = CliRunner().invoke(app, ["centralised", "--out", str(tmp_path)] + [a for s in sets for a in ("--set", s)])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["method"] == "centralised" and [x["round"] for x in res["rounds"]] == [1, 2]
    assert all(x["train_samples"] == 64 for x in res["rounds"])  # one pass over the whole pool per round
    assert 0.0 <= res["rounds"][-1]["accuracy"]["color"]["global"] <= 1.0
    assert res["rounds"][1]["loss"] < res["rounds"][0]["loss"]
    bad = CliRunner().invoke(app, ["centralised", "--out", str(tmp_path), "--set", "data.source=vqa-v2"])
    assert bad.exit_code == 1 and "data.vqa_v2.train_questions: not set" in bad.output.replace("\n", "")


def test_a_node_reporting_more_than_it_tested_is_not_believed():
    """Scores come from the nodes: one that reports more correct answers (or more VQA accuracy) than
    questions, or a non-finite score, has that metric dropped; the rest of its report stands."""
    from services.common.convert import report_from_pb
    from services.rpc import pb

    def rep(*metrics):
        return report_from_pb(pb.RoundReport(node="device-0-0", round=1, metrics=list(metrics), train_samples=5))

    ok = pb.TaskMetric(task="number", split="global", correct=3, total=8, score=4.5)
    lies = [
        pb.TaskMetric(task="number", split="local", correct=9, total=8),
        pb.TaskMetric(task="number", split="local", correct=-1, total=8),
        pb.TaskMetric(task="number", split="local", correct=3, total=8, score=8.5),
        pb.TaskMetric(task="number", split="local", correct=3, total=8, score=float("nan")),
        pb.TaskMetric(task="number", split="local", correct=3, total=8, score=-0.5),
    ]
    for lie in lies:
        r = rep(ok, lie)
        assert [(s.split, s.correct, s.score) for s in r.scores] == [("global", 3, 4.5)] and r.train_samples == 5
    assert rep(ok).scores[0].accuracy == pytest.approx(4.5 / 8)


@pytest.mark.parametrize("source", ["synthetic", "vqa-v2"])
def test_partition_counts_are_the_split_the_devices_train_on(vqa_root, source):
    """``partition_counts`` (labels only) gives, device by device, the answer counts of the training
    data ``build_device_data`` hands that device, for the generated set and a real source."""
    from hffm.data import partition_counts

    _, sets = vqa_root
    cfg = load_config(None, [*(sets if source == "vqa-v2" else []), *SMALL, "data.alpha=0.3"])
    topo = Topology.from_config(cfg, 4)
    holders = topo.holders_by_task()
    tok = load_tokenizer(cfg)
    counts = partition_counts(cfg, holders)
    assert set(counts) == set(holders)
    for d in topo.devices:
        data = build_device_data(cfg, d.id, holders, tok)
        for task, td in data.train.items():
            assert counts[task][d.id] == list(td.label_counts()), (task, d.id)
            assert len(counts[task][d.id]) == len(task_answers(cfg)[task])


def test_skew_summary_against_hand_counts():
    from hffm.data import skew_summary

    s = skew_summary({"a": [10, 0], "b": [0, 4], "c": [3, 3], "empty": [0, 0]})
    assert s["devices"] == 3 and s["single_answer"] == 2  # a device with nothing is not counted
    assert s["minority_share"] == pytest.approx(3 / 20)  # only c holds samples beside its top answer
    assert s["pool_minority_share"] == pytest.approx(7 / 20)  # pooled: 13 of one answer, 7 of the other
    assert s["median_top_share"] == pytest.approx(1.0) and s["median_answers"] == 1
    iid = skew_summary({"a": [5, 5], "b": [5, 5]})
    assert iid["single_answer"] == 0 and iid["minority_share"] == iid["pool_minority_share"] == 0.5


def test_hffm_partition_prints_and_writes_the_split(tmp_path):
    from hffm_cli.main import app

    sets = ["topology.edges=2", "topology.devices_per_edge=3", "data.train_per_task=90"]
    out = tmp_path / "split.json"
    r = CliRunner().invoke(app, ["partition", "--json", str(out)] + [a for s in sets for a in ("--set", s)])
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    cfg = load_config(None, sets)
    assert set(rep["tasks"]) == set(cfg.tasks)
    for task, t in rep["tasks"].items():
        assert sum(sum(c) for c in t["devices"].values()) == 90  # the whole pool, split
        assert set(t["clusters"]) == {"edge-0", "edge-1"}
        assert [sum(x) for x in zip(*t["clusters"].values(), strict=True)] == [
            sum(x) for x in zip(*t["devices"].values(), strict=True)
        ]
        assert f"{task}: {t['summary']['devices']} devices" in r.output
    assert "device-1-2" in r.output
    short = CliRunner().invoke(app, ["partition", "--summary"] + [a for s in sets for a in ("--set", s)])
    assert short.exit_code == 0 and "device-1-2" not in short.output and "edge-1" in short.output
    bad = CliRunner().invoke(app, ["partition", "--set", "data.alpha=-1"])
    assert bad.exit_code == 2 and "data.alpha" in bad.output
    missing = CliRunner().invoke(app, ["partition", "--set", "data.source=vqa-v2"])
    assert missing.exit_code == 1 and "data.vqa_v2.train_questions: not set" in missing.output.replace("\n", "")
