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
FORK_MARK = "sgl-budget-test: patched sglang fork imported"
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
    with open(work / "python/sglang/srt/server_args.py", "a") as f:  # (after the series) a process that imports
        f.write(f"\nimport sys as _s\nprint({FORK_MARK!r}, file=_s.stderr)\n")  # this fork says so
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


@pytest.mark.parametrize("named", [False, True])
def test_patched_worker_installs_the_policy_hook(patched_sglang, tmp_path, named) -> None:
    """A worker of a launch with a default policy, or with named policies only, routes through the fork's hook."""
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
from sglang.srt.plugins import load_plugins
load_plugins()  # as every SGLang worker does: sgl_budget's plugin registers what the series does not build in
from sgl_budget.engines.sglang import routing
passes = []
original = routing.PolicyRouting.select_experts
routing.PolicyRouting.select_experts = lambda self, *a, **k: passes.append(1) or original(self, *a, **k)
from sglang.srt.layers.moe import topk as T
t = T.TopK(top_k=4, layer_id=1, renormalize=True)
out = t.forward_native(torch.zeros(5, 8), torch.randn(5, 16))
from sglang.srt.plugins.hook_registry import HookRegistry
wrapped = "sglang.srt.layers.moe.topk.select_experts" in HookRegistry._hooks
print(T._SELECT_EXPERTS_HOOK is not None, wrapped, len(passes), int((out.topk_weights > 0).sum()))
"""
    env = {"SGLBUDGET_MOE_SPEC": json.dumps(spec.to_dict())}
    if named:  # the default is then stock: 4 experts per token; the hook is installed all the same
        env["SGLBUDGET_MOE_NAMED_POLICIES"] = json.dumps([["k1", str(pol)]])
    else:
        env["SGLBUDGET_MOE_POLICY"] = str(pol)
    r = _run(patched_sglang, code, env)
    # the fork's hook is set, the plugin does not wrap select_experts as well, sgl_budget routes once per call
    assert r.stdout.split()[-4:] == ["True", "False", "1", "20" if named else "5"], r.stderr[-3000:]


def test_patched_fork_serves_per_request_policies_over_http(patched_sglang) -> None:
    """The fork as its users run it: the patched stock launcher (CPU), named policies only, requests over HTTP
    picking ``fast`` / ``default`` (= stock here) / an unknown name; outputs equal the transformers adapter's."""
    pytest.importorskip("transformers", reason="install the hf extra")
    from test_serving import BROWN, MODEL, SERVER_ENV, _ids, _reference
    from sgl_budget.engines.hf.data import load_model
    from sgl_budget.engines.sglang.server import HTTPError, Server

    hf = load_model(MODEL)
    fast = BROWN / "uniform-25.policy"
    env = {**SERVER_ENV, "PYTHONPATH": str(patched_sglang)}
    ids = _ids(hf[1], "Early in the spring the farmers")
    with Server(MODEL, extra_args=["--moe-named-policy", f"fast={fast}"], env=env) as server:
        for name, policy in (("fast", fast), ("default", None), ("stock", None)):
            got = server.post("/generate", {"input_ids": ids, "sampling_params": {
                "max_new_tokens": 12, "temperature": 0.0, "ignore_eos": True, "custom_params": {"moe_policy": name}}})
            assert got["output_ids"] == _reference(hf, policy, [ids])[0], name
        assert [p["name"] for p in server.get("/moe_policies")["policies"]] == ["default", "stock", "fast"]
        with pytest.raises(HTTPError, match="HTTP 400.*default, stock, fast"):
            server.post("/generate", {"input_ids": ids, "sampling_params": {
                "max_new_tokens": 2, "custom_params": {"moe_policy": "nope"}}})
        log = server.log()
    assert FORK_MARK in log and "Traceback" not in log, log[-3000:]  # the launcher and workers ran the fork
