"""record / profile / similarity / eval on a tiny real transformers MoE model (random weights, real text)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

if os.environ.get("SGL_BUDGET_REQUIRE_SGLANG"):
    import transformers  # noqa: F401
transformers = pytest.importorskip("transformers", reason="install the hf extra: pip install -e '.[hf]'")

from sgl_budget.alloc import load_profile  # noqa: E402
from sgl_budget.cli import main  # noqa: E402
from sgl_budget.lang import compile_policy  # noqa: E402
from sgl_budget.similarity import load_similarity  # noqa: E402
from sgl_budget.traces import load_trace  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "data" / "brown" / "calib.txt.xz"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A 3-layer Qwen3-MoE with 16 experts (top-4) and a byte-level BPE tokenizer, saved like a checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from sgl_budget.engines.hf.data import read_text

    d = tmp_path_factory.mktemp("tiny-moe")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(read_text(TEXT).split("\n\n")[:40], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(d)
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      intermediate_size=48, moe_intermediate_size=16, num_experts=16,
                                      num_experts_per_tok=4, norm_topk_prob=True, max_position_embeddings=128)
    model = transformers.Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    model.save_pretrained(d)
    return d


def test_record_profile_similarity_eval(tiny_model: Path, tmp_path: Path, capsys) -> None:
    m = str(tiny_model)
    trace = tmp_path / "t.trace.safetensors"
    assert main(["record", "--model", m, "--text", str(TEXT), "--windows", "4", "--seq-len", "12",
                 "--batch-size", "2", "--prefill-len", "4", "--out", str(trace)]) == 0
    t = load_trace(trace)
    assert not t.synthetic and t.num_tokens == 48 and int((t.phase == 1).sum()) == 32 and len(t.sequences) == 4

    prof = tmp_path / "p.sens.yaml"
    assert main(["profile", "--model", m, "--calib", str(TEXT), "--windows", "2", "--seq-len", "16",
                 "--out", str(prof)]) == 0
    p = load_profile(prof)
    assert sorted(p.loss) == [0, 1, 2] and all(sorted(row) == [1, 2, 3, 4] for row in p.loss.values())
    assert all(row[4] == 0.0 and row[1] > 0 for row in p.loss.values())
    assert "measured" in p.source

    sim = tmp_path / "s.sim.safetensors"
    assert main(["similarity", "--model", m, "--calib", str(TEXT), "--windows", "2", "--seq-len", "16",
                 "--tokens", "24", "--out", str(sim)]) == 0
    table = load_similarity(sim)
    assert not table.synthetic and table.method == "frobenius" and sorted(table.matrices) == [0, 1, 2]

    pol = tmp_path / "all.policy"
    pol.write_text('policy "alloc-moe-sere-50" {\n budget 50%\n layers { allocate dp from "p.sens.yaml" }\n'
                   ' tokens { reallocate by score; min_k 1; max_k 4 }\n'
                   ' reroute when decode { similarity "s.sim.safetensors"; primary top 1; min_similarity 0.3 }\n}\n')
    capsys.readouterr()
    png = tmp_path / "q.png"
    assert main(["eval", str(pol), "--model", m, "--text", str(TEXT), "--windows", "4", "--seq-len", "10",
                 "--batch-size", "4", "--json", "--plot", str(png)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in res] == ["full top-k", "alloc-moe-sere-50"]
    full, pol_r = res
    assert full["kl_to_full"] == 0 and full["activations_per_token"] == 4.0
    assert pol_r["activations_per_token"] <= 2.0 + 1e-9 and pol_r["kl_to_full"] > 0
    assert pol_r["unique_per_batch"] < full["unique_per_batch"]
    assert png.stat().st_size > 5000


def test_decode_and_prefill_agree_for_the_full_model(tiny_model: Path) -> None:
    """The lock-step KV-cache decode loop computes the same next-token distributions as a prefill."""
    from sgl_budget.engines.hf.data import load_model, read_text, token_windows
    from sgl_budget.engines.hf.evaluate import evaluate

    model, tok = load_model(tiny_model)
    w = token_windows(tok, read_text(TEXT), 10, 4)
    dec = evaluate(model, [], w, batch_size=2, mode="decode")[0]
    pre = evaluate(model, [], w, batch_size=4, mode="prefill")[0]
    assert abs(dec.perplexity - pre.perplexity) / pre.perplexity < 1e-2
    assert dec.unique_per_batch < pre.unique_per_batch  # 2 tokens per decode batch vs 40 per prefill


def test_eval_rejects_a_policy_for_another_model(tiny_model: Path, tmp_path: Path, capsys) -> None:
    pol = tmp_path / "big.policy"
    pol.write_text('policy "big" { layers { layer 9: k = 1 } }')
    assert main(["eval", str(pol), "--model", str(tiny_model), "--text", str(TEXT), "--windows", "1"]) == 2
    assert "layer 9 is out of range" in capsys.readouterr().err
    assert compile_policy('policy "ok" { budget 50% }', str(tiny_model)).spec.num_experts == 16


def _linear_calls(model, windows, policy=None) -> int:
    """``F.linear`` calls in one lock-step decode step of ``windows`` (per-expert loops call it per expert)."""
    from sgl_budget.engines.hf import apply_policy

    calls = 0
    real = torch.nn.functional.linear

    def counting(*a, **k):
        nonlocal calls
        calls += 1
        return real(*a, **k)

    torch.nn.functional.linear = counting
    try:
        with torch.no_grad():
            if policy is None:
                model(input_ids=windows[:, :1])
            else:
                with apply_policy(model, policy):
                    model(input_ids=windows[:, :1])
    finally:
        torch.nn.functional.linear = real
    return calls


def test_full_top_k_is_not_slower_than_a_policy(tiny_model: Path) -> None:
    """The baseline does no per-expert work a policy skips: its forward costs no more ops than a k=1 policy's."""
    from sgl_budget.engines.hf.data import load_model, read_text, token_windows

    model, tok = load_model(tiny_model)
    w = token_windows(tok, read_text(TEXT), 4, 16)
    k1 = compile_policy('policy "k1" { layers { k = 1 } }', str(tiny_model))
    assert _linear_calls(model, w) <= _linear_calls(model, w, k1)


def test_dense_experts_match_the_eager_loop(tiny_model: Path) -> None:
    """The vectorised experts give the eager loop's outputs, padding slots (index E, weight 0) included."""
    from sgl_budget.engines.hf.data import load_model
    from sgl_budget.engines.hf.experts import dense_experts_forward

    model, _ = load_model(tiny_model)
    experts = model.model.layers[0].mlp.experts
    torch.manual_seed(0)
    h = torch.randn(6, 32)
    ids = torch.stack([torch.randperm(16)[:4] for _ in range(6)])
    ids[0, 2:] = 16  # padding, as the adapter writes it
    w = torch.rand(6, 4).masked_fill(ids == 16, 0.0)
    eager = type(experts).forward.__wrapped__
    with torch.no_grad():
        assert torch.allclose(dense_experts_forward(experts, h, ids, w), eager(experts, h, ids, w), atol=1e-5)
        ids[:, :] = 16  # nothing routed
        assert not dense_experts_forward(experts, h, ids, w * 0).any()


def test_eval_shows_a_progress_bar_per_policy(tiny_model: Path, capsys) -> None:
    from sgl_budget.engines.hf.data import load_model, read_text, token_windows
    from sgl_budget.engines.hf.evaluate import evaluate

    model, tok = load_model(tiny_model)
    w = token_windows(tok, read_text(TEXT), 6, 2)
    k1 = compile_policy('policy "k1" { layers { k = 1 } }', str(tiny_model))
    evaluate(model, [k1], w, batch_size=2, show_progress=True)
    err = capsys.readouterr().err
    assert "full top-k" in err and "k1" in err and "tok" in err
    evaluate(model, [k1], w, batch_size=2)  # quiet by default (not a terminal, or --json)
    assert capsys.readouterr().err == ""
