"""Calibration requests (``custom_params.moe_calibration``), checked without a server: any JSON a client sends is
either a :class:`Calibration` or a clear refusal (HTTP 400 in the server), and request policy text is compiled
with only the launch's files — the end-to-end behaviour is in tests/test_server_calibration.py."""

from __future__ import annotations

import pytest

pytest.importorskip("sglang", reason="install the sglang extra: pip install -e '.[sglang]'")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from sgl_budget.cli import bundled_dir, default_model_dir  # noqa: E402
from sgl_budget.engines.sglang import calibration as C  # noqa: E402
from sgl_budget.errors import PolicyError  # noqa: E402
from sgl_budget.lang.inline import compile_request_policy, launch_files  # noqa: E402
from sgl_budget.spec import load_spec  # noqa: E402

BROWN = bundled_dir() / "brown-moe"
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=4), max_leaves=12)
fields = st.fixed_dictionaries({}, optional={
    "policy": st.text(max_size=40) | json_values, "report": st.booleans() | json_values,
    "group": st.fixed_dictionaries({}, optional={"id": st.text(max_size=10) | json_values,
                                                 "rows": st.integers(-2, 5000) | json_values,
                                                 "lockstep": st.booleans() | json_values}) | json_values})


@settings(max_examples=200, deadline=None)
@given(fields | json_values)
def test_any_json_is_a_calibration_or_a_clear_refusal(value) -> None:
    try:
        cal = C.parse(value)
    except C.CalibrationRefused as e:
        assert str(e).startswith(C.CALIBRATION_KEY)
        return
    assert isinstance(cal, C.Calibration)
    assert cal.group is None or (isinstance(cal.group, str) and 1 <= cal.rows <= C.MAX_GROUP_ROWS)


def test_refused_without_the_flag(monkeypatch) -> None:
    monkeypatch.delenv(C.ENV_CALIBRATION, raising=False)
    with pytest.raises(C.CalibrationRefused, match="--moe-calibration"):
        C.check_request({C.CALIBRATION_KEY: {"report": True}}, None)
    C.check_request({"moe_policy": "stock"}, "stock")  # other requests are not calibration's business


def test_request_policies_name_only_launch_files(tmp_path) -> None:
    spec = load_spec(str(default_model_dir()))
    files = launch_files([BROWN / "alloc-moe-sere-50.policy"])
    assert set(files) == {"profiles/brown-moe.sens.yaml", "profiles/brown-moe.sim.safetensors",
                          str((BROWN / "profiles" / "brown-moe.sens.yaml").resolve()),
                          str((BROWN / "profiles" / "brown-moe.sim.safetensors").resolve())}
    ok = (BROWN / "alloc-moe-sere-50.policy").read_text()
    assert compile_request_policy(ok, spec, files).name == "alloc-moe-sere-50"
    secret = tmp_path / "x.sim.safetensors"
    secret.write_bytes(b"not opened")
    bad = ok.replace("profiles/brown-moe.sim.safetensors", str(secret))
    with pytest.raises(PolicyError) as e:
        compile_request_policy(bad, spec, files)
    assert "not a file this server loaded at launch" in e.value.format() and e.value.file == "<request>"
    with pytest.raises(PolicyError, match="characters"):
        compile_request_policy("#" * 70000, spec, files)


def test_cache_scope_separates_calibration_routing() -> None:
    a = C.calibration_scope({C.CALIBRATION_KEY: {"policy": "p", "group": {"id": "g1", "rows": 4, "lockstep": True}}})
    b = C.calibration_scope({C.CALIBRATION_KEY: {"policy": "p", "group": {"id": "g2", "rows": 4, "lockstep": True}}})
    c = C.calibration_scope({C.CALIBRATION_KEY: {"policy": "p", "group": {"id": "g1", "rows": 4}}})
    assert a == b and a != c and C.calibration_scope({"moe_policy": "x"}) is None
