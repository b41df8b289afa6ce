"""The sgl-budget command line: every command on good input, and bad input ends in a clean message + exit 2."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sgl_budget.cli import main

ROOT = Path(__file__).resolve().parent.parent
POLICIES = sorted((ROOT / "policies").glob("*.policy"))
TRACE = ROOT / "policies" / "traces" / "deepseek-v2-lite.synthetic.trace.safetensors"
PROFILE = ROOT / "policies" / "profiles" / "deepseek-v2-lite.synthetic.sens.yaml"


def test_check_all_bundled_policies(capsys) -> None:
    assert len(POLICIES) >= 6
    assert main(["check", *map(str, POLICIES), "--model-spec", "deepseek-v2-lite"]) == 0
    out = capsys.readouterr().out
    assert out.count("ok: ") == len(POLICIES)


def test_check_reports_bad_policy_compiler_style(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.policy"
    bad.write_text('policy "b" {\n  budget 150%\n}\n')
    assert main(["check", str(bad), str(POLICIES[0]), "--model-spec", "deepseek-v2-lite"]) == 2
    cap = capsys.readouterr()
    assert f"{bad}:2:10: error: budget 150% is above the model's top-k" in cap.err
    assert "^~~~" in cap.err and "help:" in cap.err and "ok: " in cap.out


def test_check_against_hf_config(tmp_path, capsys) -> None:
    cfg = {"model_type": "qwen3_moe", "num_hidden_layers": 4, "num_experts": 16, "num_experts_per_tok": 4,
           "hidden_size": 64, "moe_intermediate_size": 32, "norm_topk_prob": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    pol = tmp_path / "p.policy"
    pol.write_text('policy "p" { budget 50%\n layers { layer 0: k = 4 } }')
    assert main(["check", str(pol), "--model-spec", str(tmp_path)]) == 0
    pol.write_text('policy "p" { layers { layer 7: k = 4 } }')
    assert main(["check", str(pol), "--model-spec", str(tmp_path / "config.json")]) == 2
    assert "layer 7 is out of range" in capsys.readouterr().err


def test_explain_text_and_json(capsys) -> None:
    pol = str(ROOT / "policies" / "alloc-moe-sere-decode.policy")
    assert main(["explain", pol, "--model-spec", "deepseek-v2-lite"]) == 0
    out = capsys.readouterr().out
    assert "situation 1" in out and "decode (batch >= 8)" in out
    assert main(["explain", pol, "--model-spec", "deepseek-v2-lite", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["policy"] == "alloc-moe-sere-decode" and len(d["situations"]) == 2
    ks = [s["layers"]["1"]["k"] for s in d["situations"]]
    assert all(1 <= k <= 6 for k in ks)


def test_allocate_prints_and_writes_plan(tmp_path, capsys) -> None:
    out = tmp_path / "plan.policy"
    assert main(["allocate", "--profile", str(PROFILE), "--budget", "50%", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Alloc-L plan" in printed
    planned = {int(m[0]): int(m[1]) for m in re.findall(r"│\s+(\d+) │ (\d) │", printed)}
    assert len(planned) == 26 and sum(planned.values()) <= 3 * 26
    # the written file is a ready policy: it loads for the profile's model and routes the planned k per layer
    text = out.read_text()
    assert text.startswith("# Alloc-L plan written by: sgl-budget allocate --profile") and 'policy "plan"' in text
    from sgl_budget.lang import load_policy
    from sgl_budget.lang.ir import RouteContext
    from sgl_budget.routing import compile_routers
    from sgl_budget.spec import load_spec

    ir = load_policy(out, load_spec("deepseek-v2-lite"))
    routers = compile_routers(ir)
    assert {l: r.plan(RouteContext("decode", 16, 16)).k for l, r in routers.items()} == planned
    assert main(["check", str(out), "--model-spec", "deepseek-v2-lite"]) == 0
    assert main(["allocate", "--profile", str(PROFILE), "--budget", "2.0", "--min-k", "2", "--max-k", "3"]) == 0
    assert main(["allocate", "--profile", str(PROFILE), "--budget", "10%", "--min-k", "2"]) == 2
    assert "cannot allocate" in capsys.readouterr().err


@pytest.mark.parametrize("budget,msg", [("0%", "must lie in (0%, 100%]"), ("9", "must lie in (0, top_k=6]"),
                                        ("half", "neither a percentage")])
def test_allocate_bad_budget(budget, msg, capsys) -> None:
    assert main(["allocate", "--profile", str(PROFILE), "--budget", budget]) == 2
    assert msg in capsys.readouterr().err


def test_replay_table_json_and_plot(tmp_path, capsys) -> None:
    png = tmp_path / "r.png"
    args = ["replay", str(POLICIES[0]), str(ROOT / "policies" / "sere.policy"), "--trace", str(TRACE),
            "--batch-size", "8", "--max-batches", "10"]
    assert main([*args, "--plot", str(png), "--layers"]) == 0
    out = capsys.readouterr().out
    assert "SYNTHETIC" in out and "stock top-k" in out and "sere" in out and "per layer" in out
    assert png.stat().st_size > 10_000
    assert main([*args, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["synthetic"] is True and d["num_batches"] == 10 and len(d["policies"]) == 2
    assert "mass retained (of stock)" in out and "est. MoE decode time" in out
    assert d["stock"]["mass_retained"] == 1.0 and 0 < d["policies"][0]["mass_retained"] < 1
    assert main(["replay", str(POLICIES[0]), "--trace", str(TRACE), "--phase", "prefill", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "est. MoE prefill time" in out and "decode time" not in out


def test_replay_errors_are_clean(tmp_path, capsys) -> None:
    assert main(["replay", str(POLICIES[0]), "--trace", str(tmp_path / "none.safetensors")]) == 2
    assert "no such trace file" in capsys.readouterr().err
    assert main(["replay", str(POLICIES[0]), "--trace", str(TRACE), "--batch-size", "5000",
                 "--phase", "prefill"]) == 2
    assert "cannot replay" in capsys.readouterr().err
    assert main(["replay", str(POLICIES[0]), "--trace", str(TRACE), "--batch-size", "0"]) == 2


def test_trace_synth_and_info(tmp_path, capsys) -> None:
    out = tmp_path / "t.safetensors"
    assert main(["trace", "synth", "--model-spec", "qwen3-30b-a3b", "--out", str(out), "--sequences", "2",
                 "--seq-len", "4", "--dtype", "bfloat16"]) == 0
    assert "SYNTHETIC" in capsys.readouterr().out
    assert main(["trace", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "SYNTHETIC (not recorded from a model) trace of qwen3-30b-a3b" in text
    assert "MoE layers: 48 (0..47), 128 experts, top-8" in text and "8 in 2 sequences" in text
    assert len(text.splitlines()) < 10  # a summary, not one layer id per line
    assert main(["trace", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["synthetic"] is True and info["num_tokens"] == 8 and info["num_experts"] == 128


def test_unknown_preset_is_clean(capsys) -> None:
    assert main(["check", str(POLICIES[0]), "--model-spec", "gpt-17"]) == 2
    assert "error:" in capsys.readouterr().err


def test_demo_synthetic_replays_the_synthetic_trace(tmp_path, capsys) -> None:
    assert main(["demo", "--out", str(tmp_path), "--synthetic"]) == 0
    out = capsys.readouterr().out
    assert "SYNTHETIC" in out and (tmp_path / "replay.png").exists()
    for p in POLICIES:
        assert p.stem in out


def test_demo_with_a_mistyped_model_is_an_error(tmp_path, capsys) -> None:
    assert main(["demo", "--out", str(tmp_path), "--model", str(ROOT / "models" / "brown-mo")]) == 2
    cap = capsys.readouterr()
    assert "brown-mo: does not exist" in cap.err and "SYNTHETIC" not in cap.out
    assert not (tmp_path / "replay.png").exists()
    (tmp_path / "empty").mkdir()
    assert main(["demo", "--out", str(tmp_path), "--model", str(tmp_path / "empty")]) == 2
    assert "not a model directory" in capsys.readouterr().err


def test_demo_options_have_help(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--out OUT directory for quality.png" in out and "--batch-size BATCH_SIZE sequences decoded" in out


def test_allocate_summary_is_not_wrapped(capsys) -> None:
    assert main(["allocate", "--profile", str(PROFILE), "--budget", "50%"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Alloc-L plan: budget 50% = 78 activations/token over 26 MoE layers"
    summary = [l for l in lines if l.startswith("mean k ")]
    assert len(summary) == 1 and summary[0].endswith("seed=0")


def test_bad_policy_in_a_fresh_process_has_no_traceback(tmp_path) -> None:
    bad = tmp_path / "bad.policy"
    bad.write_text('policy "b" {\n  layers { k = 9 }\n}\n')
    r = subprocess.run([sys.executable, "-m", "sgl_budget.cli", "check", str(bad), "--model-spec", "mixtral-8x7b"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and f"{bad}:2:16: error: k 9 is out of range" in r.stderr


def test_cli_package_imports_one_way():
    """The command line is a package whose imports go one way: shared pieces (errors, output, loaders) never
    import a command module, and command modules import only shared pieces (demo may reuse model and replay)."""
    import ast

    import sgl_budget.cli as cli_pkg

    root = Path(cli_pkg.__file__).parent
    shared = {"errors", "output", "loaders"}
    allowed = {name: set(shared) for name in ("policy", "replay", "server", "serve_demo")}
    allowed["model"] = shared | {"server"}  # eval/profile --server hand over to the server module
    allowed.update({"errors": set(), "output": set(), "loaders": {"errors"}, "demo": shared | {"model", "replay"}})
    for path in sorted(root.glob("*.py")):
        if path.stem in ("__init__", "__main__"):
            continue
        assert path.stem in allowed, f"{path.name}: a new CLI module: place it in the import order above"
        used = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                used |= {node.module} if node.module else {a.name for a in node.names}
        assert used <= allowed[path.stem], f"{path.name} imports {sorted(used - allowed[path.stem])}"
