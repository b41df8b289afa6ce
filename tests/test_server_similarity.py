"""SERE's expert similarity measured inside the SGLang workers (``sgl-budget similarity --server``).

One stock SGLang server (CPU, fp32, ``--moe-calibration``) serves the embedded model. On the same calibration
windows and the same sampled tokens (the client draws them with the transformers path's generator), the
server's workers run every expert on the captured expert inputs with their own weights and accumulate the
statistics; the resulting file equals the transformers path's within fp32 noise, with the same critical-expert
rankings, for every method. Malformed similarity fields are a 400, as is the field on a server launched without
``--moe-calibration``. With ``SGL_BUDGET_TEST_TP2=1`` a ``--tp 2`` server (expert weights sharded along the
intermediate size: partial sums reduced across the ranks) and a ``--tp 2 --ep-size 2`` one (each rank holds half
of the experts) give the same file.
"""

from __future__ import annotations

import os
import time

import pytest

if os.environ.get("SGL_BUDGET_REQUIRE_SGLANG"):
    import sglang  # noqa: F401
    import transformers  # noqa: F401
pytest.importorskip("sglang", reason="install the sglang extra: pip install -e '.[sglang]'")
pytest.importorskip("transformers", reason="install the hf extra")

import torch  # noqa: E402

from sgl_budget.cli import default_model_dir, main  # noqa: E402
from sgl_budget.engines.hf import spec_of  # noqa: E402
from sgl_budget.engines.hf.data import load_model  # noqa: E402
from sgl_budget.engines.hf.similarity import expert_similarity  # noqa: E402
from sgl_budget.engines.sglang.calibration import CalibrationRefused, check_request, parse  # noqa: E402
from sgl_budget.engines.sglang.client import ServerClient, ServerError  # noqa: E402
from sgl_budget.engines.sglang.server import HTTPError, Server  # noqa: E402
from sgl_budget.engines.sglang.server_similarity import similarity_server  # noqa: E402
from sgl_budget.similarity import load_similarity  # noqa: E402
from sgl_budget.text import read_text, token_windows  # noqa: E402

MODEL = default_model_dir()
CALIB = MODEL.parent.parent / "data" / "brown" / "calib.txt.xz"
WINDOWS, SEQ_LEN, TOKENS, BATCH = 8, 64, 256, 4
CKA_TOKENS = 64  # linear CKA's H x H cross-covariances cost both paths ~tokens x 0.1 s here
SERVER_ENV = {"TRITON_INTERPRET": None}
ATOL = 1e-4


@pytest.fixture(scope="module")
def hf():
    torch.set_num_threads(1)
    model, tok = load_model(MODEL)
    return model, tok, token_windows(tok, read_text(CALIB), SEQ_LEN, WINDOWS)


@pytest.fixture(scope="module")
def server(calibration_server):
    return calibration_server  # conftest: the server the calibration tests share


_HF: dict = {}


def _tokens(method: str) -> int:
    return CKA_TOKENS if method == "cka" else TOKENS


def _transformers(hf, method: str):
    if method not in _HF:
        model, _, windows = hf
        _HF[method] = expert_similarity(model, spec_of(model), windows, method=method, tokens=_tokens(method),
                                        batch_size=BATCH)
    return _HF[method]


def _assert_same(got, want, exact_ranking: bool = True) -> float:
    """Matrices within fp32 noise; the same critical ranking. Linear CKA's matrix is symmetric only up to
    rounding (``||X_a^T X_b||`` and ``||X_b^T X_a||`` are summed in different orders), so two mutually most
    similar experts tie on their best similarity and either may rank first, in either path: for it the
    server's ranking must be a ranking of the transformers path's values up to such ties."""
    assert list(got.matrices) == list(want.matrices)
    worst = 0.0
    for l in want.matrices:
        diff = float((got.matrices[l] - want.matrices[l]).abs().max())
        worst = max(worst, diff)
        assert diff < ATOL, (l, diff)
        if exact_ranking:
            assert torch.equal(got.critical[l], want.critical[l]), l
        else:
            off = want.matrices[l].clone()
            off.fill_diagonal_(float("-inf"))
            best = off.max(dim=1).values[got.critical[l]]
            assert bool((best.diff() >= -1e-6).all()), l
    return worst


def test_cli_file_equals_transformers(server, hf, tmp_path, capsys) -> None:
    """``similarity --server`` writes the transformers path's file (frobenius, SERE's default)."""
    out = tmp_path / "server.sim.safetensors"
    t0 = time.perf_counter()
    assert main(["similarity", "--server", server.url, "--calib", str(CALIB), "--windows", str(WINDOWS), "--seq-len",
                 str(SEQ_LEN), "--tokens", str(TOKENS), "--batch-size", str(BATCH), "--out", str(out)]) == 0
    took = time.perf_counter() - t0
    assert f"wrote {out}: 8 layers, method frobenius" in capsys.readouterr().out
    got, want = load_similarity(out), _transformers(hf, "frobenius")
    worst = _assert_same(got, want)
    assert got.method == "frobenius" and not got.synthetic and "SGLang server" in got.source
    print(f"frobenius: max |server - transformers| = {worst:.2e} ({took:.1f} s through the server)")


@pytest.mark.parametrize("method", ["cosine", "cka"])
def test_other_methods_equal_transformers(server, hf, method) -> None:
    model, _, windows = hf
    got = similarity_server(ServerClient(server.url), spec_of(model), windows, method=method,
                            tokens=_tokens(method), batch_size=BATCH)
    worst = _assert_same(got, _transformers(hf, method), exact_ranking=method != "cka")
    print(f"{method}: max |server - transformers| = {worst:.2e}")


def test_bad_similarity_fields_are_refused(server) -> None:
    """Checked before anything runs (HTTP 400): a layer that is not an MoE layer, a finishing request with
    positions, an unknown method; a finish for a session never started is an error in the report."""
    bad = [{"session": "s", "positions": {"99": [0]}},
           {"session": "s", "positions": {"1": [0]}, "finish": True},
           {"session": "s", "method": "euclid"},
           {"session": "s", "positions": {"1": [0, 0]}}]
    for sim in bad:
        with pytest.raises(HTTPError) as e:
            server.generate([5, 6, 7], 1, custom_params={"moe_calibration": {"similarity": sim}})
        assert e.value.status == 400 and "similarity" in e.value.body, sim
    with pytest.raises(ServerError, match="no similarity session"):
        ServerClient(server.url).similarity([[5, 6]], "never-started", "frobenius", finish=True)


def test_refused_without_calibration_mode(monkeypatch) -> None:
    """A launch without --moe-calibration refuses the field (SGLang answers the ValueError with HTTP 400; the
    stock server's refusal of moe_calibration is tested end to end in test_serving)."""
    monkeypatch.delenv("SGLBUDGET_MOE_CALIBRATION", raising=False)
    field = {"moe_calibration": {"similarity": {"session": "s", "positions": {"1": [0]}}}}
    with pytest.raises(CalibrationRefused, match="--moe-calibration"):
        check_request(field, None)
    assert parse(field["moe_calibration"]).similarity.positions == {1: (0,)}


@pytest.mark.skipif(os.environ.get("SGL_BUDGET_TEST_TP2") != "1", reason="set SGL_BUDGET_TEST_TP2=1 (one more server)")
@pytest.mark.parametrize("parallel", [["--tp", "2", "--ep-size", "2"]], ids=["tp2-ep2"])  # --tp 2: CI, see
# tests/test_server_calibration.py
def test_tensor_and_expert_parallel_give_the_same_file(hf, parallel) -> None:
    model, _, windows = hf
    with Server(MODEL, extra_args=["--moe-calibration", *parallel], env=SERVER_ENV) as s:
        got = similarity_server(ServerClient(s.url), spec_of(model), windows, tokens=TOKENS, batch_size=BATCH)
    worst = _assert_same(got, _transformers(hf, "frobenius"))
    print(f"{' '.join(parallel)}: max |server - transformers| = {worst:.2e}")
