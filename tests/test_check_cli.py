"""`sgl-budget check`: engine-aware by default, gcc/JSON output, the pre-commit hook, and no torch import."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from sgl_budget.cli import main

ROOT = Path(__file__).resolve().parent.parent
GOOD = ROOT / "policies" / "alloc-t-half.policy"
WIDE = 'policy "wide" {\n  tokens {\n    reallocate by score\n    max_k 10\n  }\n}\n'
TWO_BAD = 'policy "b" {\n  budget 150%\n  layers { layer 0: k = 2 }\n}\n'


def test_check_refuses_what_sglang_refuses_by_default(tmp_path, capsys) -> None:
    pol = tmp_path / "wide.policy"
    pol.write_text(WIDE)
    assert main(["check", str(pol), "--model-spec", "deepseek-v2-lite"]) == 2
    err = capsys.readouterr().err
    assert f"{pol}:4:11: error: tokens max_k 10" in err and "SGLang" in err and "--engine hf" in err
    assert main(["check", str(pol), "--model-spec", "deepseek-v2-lite", "--engine", "hf"]) == 0
    assert "servable by the transformers adapter" in capsys.readouterr().out


def test_check_says_which_engine_it_checked_for(capsys) -> None:
    assert main(["check", str(GOOD), "--model-spec", "deepseek-v2-lite"]) == 0
    assert "servable by SGLang" in capsys.readouterr().out


def test_launcher_uses_the_same_rule(tmp_path) -> None:
    import pytest

    from sgl_budget.engines.sglang.settings import validate
    from sgl_budget.errors import PolicyError
    from sgl_budget.spec import PRESETS

    pol = tmp_path / "wide.policy"
    pol.write_text(WIDE)
    with pytest.raises(PolicyError, match="sized for the model's top-6") as ei:
        validate(pol, PRESETS["deepseek-v2-lite"])
    assert ei.value.line == 4


def test_k_hint_does_not_recommend_what_the_engine_refuses(tmp_path, capsys) -> None:
    pol = tmp_path / "k7.policy"
    pol.write_text('policy "k" {\n  layers { k = 7 }\n}\n')
    assert main(["check", str(pol), "--model-spec", "deepseek-v2-lite"]) == 2
    err = capsys.readouterr().err
    assert "k 7 is out of range" in err and "max_k" not in err


def test_gcc_format_one_line_per_error(tmp_path, capsys) -> None:
    pol = tmp_path / "bad.policy"
    pol.write_text(TWO_BAD)
    assert main(["check", str(pol), "--model-spec", "deepseek-v2-lite", "--format", "gcc"]) == 2
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{pol}:2:10: error: budget 150% is above the model's top-k")
    assert lines[1].startswith(f"{pol}:3:18: error: layer 0 is not an MoE layer")


def test_json_lists_every_error(tmp_path, capsys) -> None:
    pol = tmp_path / "bad.policy"
    pol.write_text(TWO_BAD)
    assert main(["check", str(pol), str(GOOD), "--model-spec", "deepseek-v2-lite", "--json"]) == 2
    d = json.loads(capsys.readouterr().out)
    assert d["engine"] == "sglang"
    assert [(e["file"], e["line"], e["column"]) for e in d["errors"]] == [(str(pol), 2, 10), (str(pol), 3, 18)]
    assert all(set(e) == {"file", "line", "column", "message", "hint"} for e in d["errors"])
    assert [f["ok"] for f in d["files"]] == [False, True]


def test_text_output_counts_errors(tmp_path, capsys) -> None:
    pol = tmp_path / "bad.policy"
    pol.write_text(TWO_BAD)
    assert main(["check", str(pol), "--model-spec", "deepseek-v2-lite"]) == 2
    err = capsys.readouterr().err
    assert err.index(":2:10:") < err.index(":3:18:") and "2 errors" in err


def test_pre_commit_hook_runs_check(tmp_path) -> None:
    hooks = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    hook = next(h for h in hooks if h["id"] == "sgl-budget-check")
    assert hook["language"] == "python" and hook["files"] == r"\.policy$"
    entry = shlex.split(hook["entry"])
    assert entry[0] == "sgl-budget"
    cmd = [sys.executable, "-m", "sgl_budget.cli", *entry[1:], "--model-spec", "deepseek-v2-lite"]
    bad = tmp_path / "bad.policy"
    bad.write_text(TWO_BAD)
    ok = subprocess.run([*cmd, str(GOOD)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    r = subprocess.run([*cmd, str(GOOD), str(bad)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and f"{bad}:2:10: error:" in r.stdout


def test_check_path_does_not_import_torch() -> None:
    code = ("import sys\nfrom sgl_budget.cli import main\n"
            f"rc = main(['check', {str(GOOD)!r}, '--model-spec', 'deepseek-v2-lite', '--format', 'gcc', "
            f"'--moe-named-policy', 'half={GOOD}'])\n"
            "from sgl_budget.lang import compile_policy, load_policy\nfrom sgl_budget.lang.limits import check_engine\n"
            "assert rc == 0, rc\nassert 'torch' not in sys.modules, 'the check path imported torch'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


BROWN = ROOT / "policies" / "brown-moe"
MODEL = ROOT / "models" / "brown-moe"


def test_check_a_launch_as_the_server_does(tmp_path, capsys) -> None:
    """``--moe-policy`` / ``--moe-named-policy`` on check: the names and files a per-request launch would be refused
    for, all at once, before any model loads; a good launch lists what requests may pick."""
    args = ["check", "--model-spec", str(MODEL), "--moe-policy", str(BROWN / "uniform-50.policy")]
    assert main([*args, "--moe-named-policy", f"fast={BROWN / 'uniform-25.policy'}"]) == 0
    assert "ok: the launch serves default, stock, fast per request (default: default)" in capsys.readouterr().out
    bad = tmp_path / "bad.policy"
    bad.write_text('policy "bad" {\n  budget 50%\n  tokens { reallocate by score; min_k 3; max_k 2 }\n}\n')
    flags = [f"stock={BROWN / 'uniform-25.policy'}", f"fast={BROWN / 'uniform-25.policy'}",
             f"fast={BROWN / 'alloc-l-50.policy'}", "two words=x.policy", f"worse={bad}", "nopath"]
    named = [a for f in flags for a in ("--moe-named-policy", f)]
    assert main([*args, *named, "--json"]) == 2
    d = json.loads(capsys.readouterr().out)
    assert d["launch"] == {"ok": False, "names": None} and d["files"] == []
    msgs = [e["message"] for e in d["errors"]]
    assert len(msgs) == 5 and "the policy name 'stock' is reserved" in msgs[0] and "given twice" in msgs[1]
    assert "invalid policy name 'two words'" in msgs[2] and "expected NAME=PATH" in msgs[3]
    assert (d["errors"][4]["file"], d["errors"][4]["line"], d["errors"][4]["column"]) == (str(bad), 3, 33)
    assert main([*args, *named]) == 2  # text: the same report as the launcher's, then the count
    assert "aborting due to 5 errors" in capsys.readouterr().err


def test_check_needs_something_to_check(capsys) -> None:
    assert main(["check", "--model-spec", "deepseek-v2-lite"]) == 2
    assert "give policy files, or a launch's --moe-policy / --moe-named-policy flags" in capsys.readouterr().err
