"""The fork patch series applies cleanly to the pinned SGLang's sources and behaves like the plugin."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("SGL_BUDGET_REQUIRE_SGLANG"):
    import sglang  # noqa: F401
sglang = pytest.importorskip("sglang", reason="install the sglang extra: pip install -e '.[sglang]'")

ROOT = Path(__file__).resolve().parent.parent
PATCHES = sorted((ROOT / "patches").glob("*.patch"))
FILES = ("srt/server_args.py", "srt/layers/moe/topk.py")
GIT = ["git", "-c", "user.name=ci", "-c", "user.email=ci@example.invalid", "-c", "commit.gpgsign=false"]


@pytest.fixture(scope="module")
def patched_sglang(tmp_path_factory) -> Path:
    """A full copy of the installed sglang with the series applied by ``git am`` (upstream layout)."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    work = tmp_path_factory.mktemp("fork")
    pkg = Path(sglang.__file__).resolve().parent
    shutil.copytree(pkg, work / "python" / "sglang", ignore=shutil.ignore_patterns("__pycache__"))
    run = lambda *a: subprocess.run([*GIT, *a], cwd=work, check=True, capture_output=True, text=True)  # noqa: E731
    run("init", "-q")
    run("add", *[f"python/sglang/{f}" for f in FILES])
    run("commit", "-qm", f"sglang {sglang.__version__}")
    r = subprocess.run([*GIT, "am", "--3way", *map(str, PATCHES)], cwd=work, capture_output=True, text=True)
    assert r.returncode == 0, f"the patch series does not apply to sglang {sglang.__version__}:\n{r.stderr}"
    return work / "python"


def test_series_exists() -> None:
    assert len(PATCHES) == 3
    for p in PATCHES:
        assert p.read_text().startswith("From ")  # git format-patch output


def _run(python_path: Path, code: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SGLBUDGET_")}
    env["PYTHONPATH"] = str(python_path)
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)


def test_patched_launcher_lists_flags_once(patched_sglang) -> None:
    code = ("import sys, runpy; sys.argv = ['sglang.launch_server', '--help'];"
            "runpy.run_module('sglang.launch_server', run_name='__main__')")
    r = _run(patched_sglang, code)
    assert "--moe-policy PATH" in r.stdout, r.stderr[-2000:]
    listed = [line for line in r.stdout.splitlines() if line.strip().startswith("--moe-policy PATH")]
    assert len(listed) == 1  # the plugin stays out of a patched build (argparse would refuse a duplicate)
    import sglang as installed

    r2 = _run(patched_sglang, "import sglang.srt.server_args as s; print(s.__file__, s.SGL_BUDGET_PATCHED)")
    assert str(patched_sglang) in r2.stdout and r2.stdout.strip().endswith("True")
    assert installed.__file__ not in r2.stdout


def test_patched_select_experts_without_hook_is_stock(patched_sglang) -> None:
    code = """
import torch
from sglang.srt.runtime_context import get_context
from sglang.srt.server_args import ServerArgs
get_context().set_server_args(ServerArgs(model_path="dummy", device="cpu"))
from sglang.srt.layers.moe import topk as T
assert T._SELECT_EXPERTS_HOOK is None
t = T.TopK(top_k=4, layer_id=1, renormalize=True)
x = torch.randn(9, 16, generator=torch.Generator().manual_seed(0))
out = t.forward_native(torch.zeros(9, 8), x)
ref = torch.softmax(x, -1).topk(4)
print(torch.equal(out.topk_ids.long(), ref.indices),
      torch.allclose(out.topk_weights, ref.values / ref.values.sum(-1, keepdim=True)))
"""
    r = _run(patched_sglang, code)
    assert r.stdout.split()[-2:] == ["True", "True"], r.stderr[-3000:]


def test_patched_worker_installs_the_policy_hook(patched_sglang, tmp_path) -> None:
    import json

    from sgl_budget.spec import ModelSpec

    spec = ModelSpec(name="t", num_layers=2, moe_layers=(0, 1), num_experts=16, top_k=4, hidden_size=8,
                     moe_intermediate_size=8, norm_topk_prob=True)
    pol = tmp_path / "k1.policy"
    pol.write_text('policy "k1" { layers { k = 1 } }')
    code = """
import torch
from sglang.srt.runtime_context import get_context
from sglang.srt.server_args import ServerArgs
get_context().set_server_args(ServerArgs(model_path="dummy", device="cpu"))
from sglang.srt.layers.moe import topk as T
t = T.TopK(top_k=4, layer_id=1, renormalize=True)
out = t.forward_native(torch.zeros(5, 8), torch.randn(5, 16))
print(T._SELECT_EXPERTS_HOOK is not None, int((out.topk_weights > 0).sum()))
"""
    r = _run(patched_sglang, code, {"SGLBUDGET_MOE_POLICY": str(pol), "SGLBUDGET_MOE_SPEC": json.dumps(spec.to_dict())})
    assert r.stdout.split()[-2:] == ["True", "5"], r.stderr[-3000:]
