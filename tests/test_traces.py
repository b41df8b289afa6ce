"""Trace format: round trips, validation errors by message, synthetic generator, batching."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from sgl_budget.spec import PRESETS
from sgl_budget.traces import (
    TraceError, decode_batches, decode_index, load_trace, prefill_batches, stack_decode_batches, synthetic_trace,
    write_trace,
)

from conftest import TINY_SIGMOID, TINY_SOFTMAX


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_round_trip(tmp_path, dtype) -> None:
    t = synthetic_trace(TINY_SOFTMAX, num_sequences=3, seq_len=5, seed=1)
    t.token_ids = torch.arange(15)
    p = write_trace(t, tmp_path / "t.safetensors", dtype=dtype)
    u = load_trace(p)
    assert u.spec == t.spec and u.sequences == t.sequences and u.synthetic and "SYNTHETIC" in u.source
    assert torch.equal(u.phase, t.phase) and torch.equal(u.token_ids, t.token_ids)
    for l in t.layers:
        assert u.router_logits[l].dtype == dtype
        assert torch.equal(u.router_logits[l], t.router_logits[l].to(dtype))


def test_sigmoid_trace_keeps_correction_bias(tmp_path) -> None:
    t = synthetic_trace(TINY_SIGMOID, num_sequences=2, seq_len=4)
    u = load_trace(write_trace(t, tmp_path / "s.safetensors"))
    assert set(u.correction_bias) == set(TINY_SIGMOID.moe_layers)
    assert torch.equal(u.correction_bias[1], t.correction_bias[1].float())


def test_deepseek_v3_preset_trace(tmp_path) -> None:
    spec = PRESETS["deepseek-v3"]
    t = synthetic_trace(spec, num_sequences=1, seq_len=4)
    u = load_trace(write_trace(t, tmp_path / "v3.safetensors"))
    assert len(u.layers) == spec.num_moe_layers and u.correction_bias is not None


def _meta(spec, **over):
    m = {"format": "sgl-budget-trace/1", "model_spec": spec.to_dict(), "layers": list(spec.moe_layers),
         "sequences": [[0, 4]], "source": "test", "synthetic": False}
    m.update(over)
    return {"sgl_budget.trace": json.dumps(m)}


def _tensors(spec, n=4, e=None):
    e = e or spec.num_experts
    out = {f"layer.{l}.router_logits": torch.zeros(n, e, dtype=torch.float16) for l in spec.moe_layers}
    out["phase"] = torch.ones(n, dtype=torch.uint8)
    return out


BAD = [
    ("no metadata", lambda s: (_tensors(s), None), "no 'sgl_budget.trace' metadata"),
    ("bad json", lambda s: (_tensors(s), {"sgl_budget.trace": "{nope"}), "metadata is not valid JSON"),
    ("wrong format", lambda s: (_tensors(s), _meta(s, format="other/9")), "unsupported trace format 'other/9'"),
    ("no layers key", lambda s: (_tensors(s), {"sgl_budget.trace": json.dumps(
        {"format": "sgl-budget-trace/1", "model_spec": s.to_dict(), "sequences": [[0, 4]]})}), "metadata lacks 'layers'"),
    ("bad spec", lambda s: (_tensors(s), _meta(s, model_spec={"name": "x"})), "bad model_spec in metadata"),
    ("missing layer tensor", lambda s: ({k: v for k, v in _tensors(s).items() if not k.startswith("layer.2.")},
                                        _meta(s)), "no router logits for them"),
    ("wrong expert count", lambda s: (_tensors(s, e=8), _meta(s)), "expected [N, 16]"),
    ("token count mismatch", lambda s: ({**_tensors(s), "layer.2.router_logits": torch.zeros(3, 16)}, _meta(s)),
     "has 3 tokens but phase has 4"),
    ("non-finite", lambda s: ({**_tensors(s), "layer.1.router_logits": torch.full((4, 16), float("nan"))}, _meta(s)),
     "NaN or infinite"),
    ("bad sequences", lambda s: (_tensors(s), _meta(s, sequences=[[0, 2], [3, 4]])), "contiguous ranges"),
    ("short sequences", lambda s: (_tensors(s), _meta(s, sequences=[[0, 3]])), "sequences cover 3 tokens"),
    ("bad phase", lambda s: ({**_tensors(s), "phase": torch.full((4,), 7, dtype=torch.uint8)}, _meta(s)),
     "phase values must be 0 (prefill) or 1 (decode)"),
    ("no phase", lambda s: ({k: v for k, v in _tensors(s).items() if k != "phase"}, _meta(s)), "no 'phase' tensor"),
    ("non-MoE layer", lambda s: ({**_tensors(s), "layer.0.router_logits": torch.zeros(4, 16)},
                                 _meta(s, layers=[0, 1, 2])), "not MoE layers"),
    ("stray tensor", lambda s: ({**_tensors(s), "layer.9.router_logits": torch.zeros(4, 16)}, _meta(s)),
     "unexpected tensors"),
    ("int logits", lambda s: ({**_tensors(s), "layer.1.router_logits": torch.zeros(4, 16, dtype=torch.int32)},
                              _meta(s)), "has dtype torch.int32"),
    ("long phase", lambda s: ({**_tensors(s), "phase": torch.ones(5, dtype=torch.uint8)}, _meta(s)),
     "has 4 tokens but phase has 5"),
    ("int64 phase", lambda s: ({**_tensors(s), "phase": torch.ones(4, dtype=torch.int64)}, _meta(s)),
     "phase must be a 1-D uint8 tensor"),
    ("duplicate layer", lambda s: (_tensors(s), _meta(s, layers=[1, 1, 2])), "lists a layer twice"),
    ("token_ids length", lambda s: ({**_tensors(s), "token_ids": torch.arange(3)}, _meta(s)),
     "token_ids must be an int64 [4] tensor"),
    ("bias on softmax spec", lambda s: ({**_tensors(s), "layer.1.correction_bias": torch.zeros(16)}, _meta(s)),
     "has no correction bias"),
    ("sequences not pairs", lambda s: (_tensors(s), _meta(s, sequences=[[0, 4, 9]])), "[start, end] pairs"),
]


def _bias_tensors(spec, drop=None, shape=None):
    out = _tensors(spec)
    for l in spec.moe_layers:
        if l != drop:
            out[f"layer.{l}.correction_bias"] = torch.zeros(shape or spec.num_experts)
    return out


BAD_SIGMOID = [
    ("bias missing", lambda s: (_bias_tensors(s, drop=2), _meta(s)), "needs layer.{i}.correction_bias"),
    ("bias shape", lambda s: (_bias_tensors(s, shape=8), _meta(s)),
     "layer.1.correction_bias must be a finite float32 [16] tensor"),
    ("bias fp16", lambda s: ({**_bias_tensors(s), "layer.2.correction_bias": torch.zeros(16, dtype=torch.float16)},
                             _meta(s)), "not torch.float16"),
]


@pytest.mark.parametrize("name,make,message", BAD_SIGMOID, ids=[b[0] for b in BAD_SIGMOID])
def test_malformed_sigmoid_trace(tmp_path, name, make, message) -> None:
    tensors, meta = make(TINY_SIGMOID)
    p = tmp_path / "bad.safetensors"
    save_file(tensors, str(p), metadata=meta)
    with pytest.raises(TraceError) as ei:
        load_trace(p)
    assert message in str(ei.value) and str(p) in str(ei.value)


def test_write_rejects_bad_dtype(tmp_path) -> None:
    t = synthetic_trace(TINY_SOFTMAX, num_sequences=1, seq_len=4)
    with pytest.raises(TraceError, match="cannot store router logits as torch.int8"):
        write_trace(t, tmp_path / "x.safetensors", dtype=torch.int8)
    u = load_trace(write_trace(t, tmp_path / "y.safetensors", dtype="bf16"))
    assert u.router_logits[1].dtype == torch.bfloat16


@pytest.mark.parametrize("name,make,message", BAD, ids=[b[0] for b in BAD])
def test_malformed_trace(tmp_path, name, make, message) -> None:
    tensors, meta = make(TINY_SOFTMAX)
    p = tmp_path / "bad.safetensors"
    save_file(tensors, str(p), metadata=meta)
    with pytest.raises(TraceError) as ei:
        load_trace(p)
    assert message in str(ei.value) and str(p) in str(ei.value)


def test_not_a_trace_file(tmp_path) -> None:
    p = tmp_path / "x.safetensors"
    p.write_text("hello")
    with pytest.raises(TraceError, match="not a safetensors file"):
        load_trace(p)
    with pytest.raises(TraceError, match="no such trace file"):
        load_trace(tmp_path / "missing.safetensors")


def test_bias_required_for_sigmoid(tmp_path) -> None:
    t = synthetic_trace(TINY_SIGMOID, num_sequences=1, seq_len=4)
    t.correction_bias = None
    with pytest.raises(TraceError, match="needs layer"):
        write_trace(t, tmp_path / "x.safetensors")


def test_synthetic_is_deterministic_skewed_and_labelled() -> None:
    spec = PRESETS["deepseek-v2-lite"]
    a = synthetic_trace(spec, num_sequences=8, seq_len=32, seed=3)
    b = synthetic_trace(spec, num_sequences=8, seq_len=32, seed=3)
    c = synthetic_trace(spec, num_sequences=8, seq_len=32, seed=4)
    assert all(torch.equal(a.router_logits[l], b.router_logits[l]) for l in a.layers)
    assert not torch.equal(a.router_logits[1], c.router_logits[1])
    assert a.synthetic and a.source.startswith("SYNTHETIC")
    ids = a.router_logits[5].topk(spec.top_k, dim=-1).indices
    load = torch.bincount(ids.flatten(), minlength=spec.num_experts).float()
    assert load.max() / load.mean() > 2.5  # popular experts exist
    mass = a.router_logits[5].softmax(-1).topk(spec.top_k, dim=-1).values.sum(-1).mean()
    assert 0.4 < float(mass) < 0.75  # realistic top-6-of-64 softmax mass
    assert int((a.phase == 0).sum()) == 8 * 8  # first quarter of each sequence is prefill
    # neighbouring tokens share more experts than random pairs
    same = [(len(set(ids[i].tolist()) & set(ids[i + 1].tolist()))) for i in range(0, 255) if (i + 1) % 32]
    rand = [(len(set(ids[i].tolist()) & set(ids[(i * 37 + 101) % 256].tolist()))) for i in range(255)]
    assert sum(same) / len(same) > 1.5 * sum(rand) / len(rand)


def test_decode_batches_take_one_token_per_sequence() -> None:
    t = synthetic_trace(TINY_SOFTMAX, num_sequences=8, seq_len=5)
    idx = decode_index(t, 4)
    assert idx.shape == (8, 4)  # 2 groups x 4 decode steps (each sequence starts with 1 prefill token)
    assert idx[0].tolist() == [1, 6, 11, 16] and idx[1].tolist() == [2, 7, 12, 17]
    assert idx[4].tolist() == [21, 26, 31, 36]
    assert bool((t.phase[idx.flatten()] == 1).all())
    stacked = stack_decode_batches(t, 4, max_batches=3)
    assert stacked[1].shape == (3, 4, 16)
    batches = list(decode_batches(t, 4, max_batches=3))
    assert torch.equal(batches[2].layer_logits[2], stacked[2][2])


def test_decode_falls_back_to_consecutive_decode_tokens() -> None:
    t = synthetic_trace(TINY_SOFTMAX, num_sequences=2, seq_len=8)  # fewer sequences than the batch
    idx = decode_index(t, 4)
    assert idx.shape == (3, 4)
    assert bool((t.phase[idx.flatten()] == 1).all())


def test_prefill_batches() -> None:
    t = synthetic_trace(TINY_SOFTMAX, num_sequences=5, seq_len=3)
    bs = list(prefill_batches(t, 2))
    assert len(bs) == 2 and bs[0].token_index.tolist() == [0, 1, 2, 3, 4, 5]
    assert bs[1].layer_logits[1].shape == (6, 16)


def test_bundled_demo_trace_is_labelled_synthetic() -> None:
    from sgl_budget.cli import DEMO_TRACE, bundled_dir

    t = load_trace(bundled_dir() / "traces" / DEMO_TRACE)
    assert t.synthetic and "SYNTHETIC" in t.source and t.spec.name == "deepseek-v2-lite"
