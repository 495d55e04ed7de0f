"""Double-Adapter wiring: zero-init equals the frozen backbone, the feed-forward output is kept."""

from __future__ import annotations

import pytest
import torch

from hffm.config import load_config
from hffm.data import TASK_LABELS, build_global_test, build_tokenizer
from hffm.model import AdaptedOutput, DoubleAdapter, build_backbone, build_model, head_name


def _labels(cfg):
    return {t: len(TASK_LABELS[t]) for t in cfg.tasks}


def _batch(cfg, n=8):
    td = build_global_test(cfg, "art", build_tokenizer())
    b = td.batch(torch.arange(n))
    b.pop("labels")
    return b


def _pooled(backbone, batch):
    torch.manual_seed(0)  # ViLT permutes patches with the global RNG; fix it for both sides
    return backbone(**batch).pooler_output


def test_module_names_follow_position(small_cfg):
    m = build_model(small_cfg, build_tokenizer().vocab_size, _labels(small_cfg))
    assert m.module_names() == ["adapter.0", "adapter.1", "head.art", "head.gqa"]
    frozen = [n for n, p in m.named_parameters() if not p.requires_grad]
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert all("adapter" in n or n.startswith("trainable.") for n in trainable)
    assert not any("adapter" in n for n in frozen)
    assert any("attention" in n for n in frozen)


def test_zero_init_adapters_compute_exactly_the_backbone(small_cfg):
    tok = build_tokenizer()
    plain = build_backbone(small_cfg, tok.vocab_size)
    adapted = build_model(small_cfg, tok.vocab_size, _labels(small_cfg))
    batch = _pooled_batch = _batch(small_cfg)
    with torch.no_grad():
        a = _pooled(plain, _pooled_batch)
        torch.manual_seed(0)
        b = adapted.pooled(batch)
    assert torch.equal(a, b)


def test_nonzero_adapters_change_the_output(small_cfg):
    tok = build_tokenizer()
    plain = build_backbone(small_cfg, tok.vocab_size)
    adapted = build_model(small_cfg, tok.vocab_size, _labels(small_cfg))
    with torch.no_grad():
        adapted.module("adapter.0").a.up.weight.normal_()
        batch = _batch(small_cfg)
        a = _pooled(plain, batch)
        torch.manual_seed(0)
        b = adapted.pooled(batch)
    assert not torch.allclose(a, b)


def test_adapted_output_keeps_feed_forward_output():
    """out = FFN(h) + A1(FFN(h)) + A2(FFN(h)) + residual; the seed code dropped FFN(h)."""
    torch.manual_seed(0)
    dense = torch.nn.Linear(12, 8)

    class Orig(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = dense
            self.dropout = torch.nn.Dropout(0.0)

    ad = DoubleAdapter(8, 4)
    for p in ad.parameters():
        torch.nn.init.normal_(p)
    layer = AdaptedOutput(Orig(), ad)
    h, residual = torch.randn(3, 5, 12), torch.randn(3, 5, 8)
    ffn = dense(h)
    expected = ffn + ad.a(ffn) + ad.b(ffn) + residual
    assert torch.allclose(layer(h, residual), expected, atol=1e-6)
    # and it is not the seed code's wiring (adapter output + residual, FFN output lost)
    assert not torch.allclose(layer(h, residual), ad(ffn) + residual, atol=1e-3)


def test_heads_have_task_label_spaces(small_cfg):
    m = build_model(small_cfg, build_tokenizer().vocab_size, _labels(small_cfg))
    batch = _batch(small_cfg, 4)
    for task in small_cfg.tasks:
        assert m(batch, task).shape == (4, len(TASK_LABELS[task]))
        assert m.module(head_name(task)) is not None


def test_from_pretrained_local_checkpoint(tmp_path, small_cfg):
    """The real loading path: a checkpoint saved to a directory loads with from_pretrained."""
    tok = build_tokenizer()
    tiny = build_backbone(small_cfg, tok.vocab_size)
    tiny.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    cfg = load_config(None, [f"model.backbone={tmp_path / 'ckpt'}", "model.bottleneck=16", "model.head_hidden=32"])
    loaded = build_model(cfg, tok.vocab_size, _labels(cfg))
    assert loaded.backbone.config.hidden_size == small_cfg.model.hidden_size
    assert loaded.module_names()[: small_cfg.model.num_layers] == ["adapter.0", "adapter.1"]
    batch = _batch(small_cfg)
    with torch.no_grad():
        a = _pooled(tiny, batch)
        torch.manual_seed(0)
        b = loaded.pooled(batch)
    assert torch.allclose(a, b, atol=1e-6)


def test_missing_checkpoint_dir_is_a_clear_error(tmp_path):
    import pytest

    cfg = load_config(None, [f"model.backbone={tmp_path / 'nope'}"])
    with pytest.raises(FileNotFoundError, match="model.backbone"):
        build_backbone(cfg, 30)


def test_prompts_and_modality_adapters_are_modules_of_their_own(small_cfg):
    """model.prompt_tokens and model.modality_adapters: named modules like the others; the modality
    adapters start as the identity (the model computes what it did without them), a task's prompt changes
    that task's answers only, and a task's loss trains that task's prompt alone."""
    from hffm.topology import Topology

    cfg = small_cfg.model_copy(
        update={"model": small_cfg.model.model_copy(update={"prompt_tokens": 3, "modality_adapters": True})}
    )
    vocab = build_tokenizer().vocab_size
    m = build_model(cfg, vocab, _labels(cfg))
    names = ["adapter.0", "adapter.1", "modality.image", "modality.text", "head.art", "head.gqa", "prompt.art",
             "prompt.gqa"]  # fmt: skip
    assert m.module_names() == names
    assert Topology.from_config(cfg, 2).modules_for("cloud") == names
    assert m.module_state("prompt.art")["tokens"].shape == (3, cfg.model.hidden_size)
    batch = _batch(cfg)
    plain_cfg = small_cfg.model_copy(update={"model": small_cfg.model.model_copy(update={"prompt_tokens": 3})})
    plain = build_model(plain_cfg, vocab, _labels(cfg))
    torch.manual_seed(0)
    a = m(batch, "art")
    torch.manual_seed(0)
    b = plain(batch, "art")
    assert torch.allclose(a, b, atol=1e-5)  # zero-initialised up-projections: the identity
    with torch.no_grad():
        m.module("prompt.gqa").tokens.add_(torch.randn(3, cfg.model.hidden_size))  # another task's: no change
    torch.manual_seed(0)
    assert torch.allclose(m(batch, "art"), a, atol=1e-5)
    with torch.no_grad():
        m.module("prompt.art").tokens.add_(torch.randn(3, cfg.model.hidden_size))  # (a constant: LayerNorm's)
    torch.manual_seed(0)
    assert not torch.allclose(m(batch, "art"), a, atol=1e-3)
    m.zero_grad()
    m(batch, "art").sum().backward()
    grads = {n: any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.module(n).parameters()) for n in names}
    assert grads["prompt.art"] and grads["modality.image"] and grads["modality.text"] and grads["head.art"]
    assert not grads["prompt.gqa"] and not grads["head.gqa"]
    assert not any("trainable" in k for k in m.backbone.state_dict())  # the backbone's own state only


def test_etf_head_is_a_fixed_frame_that_is_never_sent(small_cfg):
    """model.head_classifier=etf (FedETF): each head scores the normalised output of its learned projection
    against a fixed simplex ETF (unit vertices at pairwise cosine -1/(K-1)), the same frame on every node,
    outside the module's state (never trained, aggregated or sent); logits are those cosines / temperature."""
    import pytest

    from hffm.model import ETFHead

    cfg = small_cfg.model_copy(
        update={"model": small_cfg.model.model_copy(update={"head_classifier": "etf", "etf_temperature": 0.25})}
    )
    vocab = build_tokenizer().vocab_size
    m, other = build_model(cfg, vocab, _labels(cfg)), build_model(cfg, vocab, _labels(cfg))
    for task in cfg.tasks:
        head = m.module(head_name(task))
        assert isinstance(head, ETFHead)
        k = len(TASK_LABELS[task])
        frame = head.frame
        assert frame.shape == (k, cfg.model.head_hidden)
        gram = frame @ frame.T
        expected = torch.full((k, k), -1.0 / (k - 1)).fill_diagonal_(1.0)
        assert torch.allclose(gram, expected, atol=1e-5)
        assert torch.equal(frame, other.module(head_name(task)).frame)  # another node builds the same frame
        state = m.module_state(head_name(task))
        assert "frame" not in state and set(state) == {k for k, _ in head.named_parameters()}
        assert not any(p is frame for p in m.trainable_parameters([head_name(task)]))
    # the two tasks' frames differ (each from its own seed)
    assert not torch.equal(m.module("head.art").frame[:2], m.module("head.gqa").frame[:2])
    batch = _batch(cfg, 4)
    torch.manual_seed(0)
    logits = m(batch, "art")
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(m.module("head.art").net(m.pooled(batch, "art")), dim=-1)
    assert torch.allclose(logits, z @ m.module("head.art").frame.T / 0.25, atol=1e-6)
    assert float(logits.detach().abs().max()) <= 1 / 0.25 + 1e-5  # a cosine over the temperature
    # a trained head's state loads into another node's model, whose frame stays its own (the same)
    with torch.no_grad():
        m.module("head.art").net[0].weight.add_(1.0)
    other.load_module_state("head.art", m.module_state("head.art"))
    torch.manual_seed(0)
    expected_logits = m(batch, "art")
    torch.manual_seed(0)
    assert torch.allclose(other(batch, "art"), expected_logits, atol=1e-6)
    # a task with more answers than the projection has dimensions: an error naming the fields
    narrow = cfg.model_copy(update={"model": cfg.model.model_copy(update={"head_hidden": 2})})
    with pytest.raises(ValueError, match="model.head_classifier=etf.*model.head_hidden"):
        build_model(narrow, vocab, _labels(narrow))


def _recorded_dtypes(model):
    """Record the dtype each Double-Adapter's first up-projection computes in."""
    seen = []
    for name in model.module_names():
        if name.startswith("adapter."):
            model.module(name).a.up.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_reduced_precision_computes_the_backbone_in_it_and_keeps_modules_and_features_fp32(small_cfg, precision, dtype):
    """runtime.precision: the backbone and its adapters compute under torch.autocast in bf16 or fp16, the
    pooled features come out fp32 (heads and statistics stay fp32) and near the fp32 model's; the trainable
    parameters stay fp32. fp32 runs no autocast at all."""
    tok = build_tokenizer()
    full = build_model(small_cfg, tok.vocab_size, _labels(small_cfg))
    half = build_model(
        small_cfg.model_copy(update={"runtime": small_cfg.runtime.model_copy(update={"precision": precision})}),
        tok.vocab_size,
        _labels(small_cfg),
    )
    half.load_state_dict(full.state_dict())
    with torch.no_grad():
        for m in (full, half):
            m.module("adapter.0").a.up.weight.normal_(generator=torch.Generator().manual_seed(1))
    seen_full, seen_half = _recorded_dtypes(full), _recorded_dtypes(half)
    batch = _batch(small_cfg)
    with torch.no_grad():
        torch.manual_seed(0)
        a = full.pooled(batch, "art")
        torch.manual_seed(0)
        b = half.pooled(batch, "art")
    assert set(seen_full) == {torch.float32} and set(seen_half) == {dtype}
    assert a.dtype == b.dtype == torch.float32
    assert not torch.equal(a, b) and torch.allclose(a, b, rtol=0.05, atol=0.05), (a - b).abs().max()
    assert all(p.dtype == torch.float32 for p in half.parameters())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_trains_and_a_gradient_hook_sees_true_gradients(small_cfg, precision):
    """Local training under runtime.precision: the modules move and stay fp32 and finite, and the loss falls
    over epochs. With fp16 the loss is scaled for the backward pass (GradScaler): a gradient hook
    (``on_grad``) still reads unscaled gradients, of the fp32 run's size, not 65,536 times larger."""
    from hffm.data import build_device_data
    from hffm.topology import split_table
    from hffm.training import train_local

    tok = build_tokenizer()
    cfg = small_cfg.model_copy(update={"train": small_cfg.train.model_copy(update={"local_epochs": 4})})
    topo = split_table(cfg)
    dev = sorted(topo.device_map)[0]
    data = build_device_data(cfg, dev, topo.holders_by_task(), tok, topo.device_map[dev].tasks).train

    def trained(p: str):
        c = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"precision": p})})
        model = build_model(c, tok.vocab_size, _labels(c))
        start = {n: {k: v.clone() for k, v in model.module_state(n).items()} for n in model.module_names()}
        norms = []

        def hook(_task):
            norms.append(float(model.module("adapter.0").a.down.weight.grad.norm()))

        stats = [
            train_local(model, data, model.module_names(), c.train, "cpu", seed=3, on_grad=hook if i == 0 else None)
            for i in range(2)
        ]
        return model, start, norms, stats

    full, _, full_norms, _ = trained("fp32")
    model, start, norms, stats = trained(precision)
    for n in model.module_names():
        for k, v in model.module_state(n).items():
            assert v.dtype == torch.float32 and bool(torch.isfinite(v).all()), (n, k)
    assert any(not torch.equal(model.module_state(n)[k], start[n][k]) for n in start for k in start[n])
    assert stats[1].loss < stats[0].loss, [s.loss for s in stats]
    ratio = sorted(a / b for a, b in zip(norms, full_norms, strict=True) if b > 0)
    assert 0.5 < ratio[len(ratio) // 2] < 2.0, ratio  # the median step's gradient: the fp32 run's size


def test_precision_is_checked_where_it_is_read(small_cfg, monkeypatch):
    """An unknown precision is a config error naming the field; fp16 on a CPU (no fast kernels) and bf16 on a
    GPU without it are refused before anything runs, naming the field (and the GPU)."""
    from hffm.config import ConfigError, check_precision
    from hffm.model import HFFMModel

    with pytest.raises(ConfigError, match="runtime.precision"):
        load_config(None, ["runtime.precision=fp8"])
    assert load_config(None, ["runtime.precision=bf16"]).runtime.precision == "bf16"
    with pytest.raises(ValueError, match="runtime.precision: 'fp8'"):
        HFFMModel(torch.nn.Module(), torch.nn.ModuleDict(), precision="fp8")
    assert check_precision("bf16", "cpu") == "bf16" and check_precision("fp32", "cpu") == "fp32"
    with pytest.raises(ConfigError, match="runtime.precision: fp16 needs a CUDA device, not cpu"):
        check_precision("fp16", "cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100-SXM2-16GB")
    with pytest.raises(ConfigError, match=r"runtime.precision: bf16 is not supported by cuda:0 \(Tesla V100"):
        check_precision("bf16", "cuda:0")
    assert check_precision("fp16", "cuda:0") == "fp16"
