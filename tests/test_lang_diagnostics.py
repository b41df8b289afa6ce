"""Every independent error at once, in source order; statement separators; the fuzz classes of issue 11."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from sgl_budget.errors import PolicyError
from sgl_budget.lang import compile_policy, load_policy
from sgl_budget.spec import PRESETS

SPEC = PRESETS["deepseek-v2-lite"]  # MoE layers 1..26, 64 experts, top-6
POLICY_DIR = Path(__file__).resolve().parent.parent / "policies"
PROFILE = "profiles/deepseek-v2-lite.synthetic.sens.yaml"


def errors(text: str, base_dir: Path | str = ".") -> PolicyError:
    with pytest.raises(PolicyError) as ei:
        compile_policy(text, SPEC, file="x.policy", base_dir=base_dir)
    return ei.value


# -- multi-error diagnostics ------------------------------------------------------

def test_bad_profile_and_bad_similarity_both_reported_in_order() -> None:
    src = ('policy "p" {\n  budget 50%\n\n\n  layers { allocate dp from "missing.sens.yaml" }\n'
           + "\n" * 9 + '  reroute { similarity "missing.sim.safetensors"; primary top 1 }\n}\n')
    e = errors(src)
    assert [(d.line, d.message.split(":")[0]) for d in e.diagnostics] == [
        (5, "profile not found"), (15, "similarity file not found")]
    out = e.format()
    assert out.index("x.policy:5:") < out.index("x.policy:15:")
    assert out.rstrip().endswith("2 errors")


def test_two_bad_layers_both_reported() -> None:
    e = errors('policy "p" {\n  layers {\n    layer 0: k = 2\n    layer 25..27: k = 3\n  }\n}\n')
    msgs = [d.message for d in e.diagnostics]
    assert any("layer 0 is not an MoE layer" in m for m in msgs) and any("layer 27 is out of range" in m for m in msgs)
    assert [d.line for d in e.diagnostics] == [3, 4]


def test_min_k_above_max_k_does_not_hide_budget_overflow() -> None:
    e = errors('policy "p" {\n  budget 50%\n  layers { k = 4 }\n  tokens {\n    reallocate by score\n'
               "    min_k 4\n    max_k 2\n  }\n}\n")
    msgs = [d.message for d in e.diagnostics]
    assert any("min_k 4 is above max_k 2" in m for m in msgs)
    assert any("the layer plan uses 104 activations" in m for m in msgs)


def test_no_cascade_from_one_bad_statement() -> None:
    # one bad k: no 'never applies' or budget errors follow from it
    e = errors('policy "p" {\n  layers { k = 9 }\n  layers when decode { k = 2 }\n}\n')
    assert len(e.diagnostics) == 2  # the bad k, and the (independent) shadowed block
    e = errors('policy "p" {\n  layers when batch >= 2.5 { k = 3 }\n  layers { k = 2 }\n}\n')
    assert len(e.diagnostics) == 1 and "whole number" in e.message


def test_single_error_api_unchanged() -> None:
    e = errors('policy "p" {\n  budget 120%\n}\n')
    assert (e.line, e.column, e.file) == (2, 10, "x.policy") and e.hint
    assert len(e.diagnostics) == 1 and "errors" not in e.format()


# -- the silent clamp -------------------------------------------------------------

def test_max_k_below_layer_k_is_an_error_at_max_k() -> None:
    src = 'policy "p" { budget 50%; layers { allocate uniform }; tokens { reallocate by score; min_k 1; max_k 2 } }'
    e = errors(src)
    assert "max_k 2 is below layer" in e.message and "k = 3" in e.message
    assert (e.line, e.column) == (1, src.index("max_k 2") + 1)


def test_max_k_equal_to_layer_k_is_fine() -> None:
    compile_policy('policy "p" { budget 50%; layers { allocate uniform }; tokens { reallocate by score; max_k 3 } }',
                   SPEC)


# -- statement separators ------------------------------------------------------------

@pytest.mark.parametrize("src", [
    'policy "p" { layers { k = 3 k >= 1 } }',
    'policy "p" { budget 50% layers { allocate uniform } }',
    'policy "p" { tokens { reallocate by score min_k 1 } }',
])
def test_two_statements_on_one_line_need_a_semicolon(src: str) -> None:
    e = errors(src)
    assert "two statements on one line without `;`" in e.message and "`;`" in e.hint


@pytest.mark.parametrize("src", [
    'policy "p" { layers { k = 3; k >= 1 } }',
    'policy "p" {\n layers {\n  k = 3\n  k >= 1\n }\n}',
    'policy "p" { layers { k = 3 } tokens { reallocate by score } }',  # a closing brace ends a block
    'policy "p" { layers { k = 3 # comment\n k >= 1 } }',
])
def test_separated_statements_parse(src: str) -> None:
    compile_policy(src, SPEC)


def test_every_bundled_policy_is_valid() -> None:
    root = POLICY_DIR.parent
    for p in sorted(POLICY_DIR.glob("*.policy")):
        load_policy(p, SPEC)
    brown = root / "models" / "brown-moe"
    if (brown / "config.json").is_file():
        for p in sorted([*(POLICY_DIR / "brown-moe").rglob("*.policy"), *(root / "tests" / "policies").glob("*.policy")]):
            load_policy(p, str(brown))


# -- fuzz classes ----------------------------------------------------------------------

@pytest.mark.parametrize("stmt", ['reroute {{ similarity "{p}"; primary top 1 }}',
                                  'budget 50%; layers {{ allocate dp from "{p}" }}'])
def test_path_component_over_255_chars_is_a_policy_error(tmp_path, stmt: str) -> None:
    long = "a" * 300 + "/x.yaml"
    e = errors('policy "p" {\n  ' + stmt.format(p=long) + "\n}\n", base_dir=tmp_path)
    assert e.line == 2 and "cannot read" in e.message and "255" in e.hint


def test_when_chain_is_near_linear() -> None:
    def chain(n: int) -> str:
        return 'policy "p" {\n layers when decode' + " and batch >= 1" * n + " { k = 3 }\n}\n"

    def cpu(n: int) -> float:
        t = time.process_time()
        compile_policy(chain(n), SPEC)
        return time.process_time() - t

    cpu(200)  # warm the parser
    small, big = cpu(10_000), cpu(20_000)
    assert len(chain(20_000)) > 300_000
    assert big < 6.0, f"300 KB took {big:.2f}s of CPU"
    assert big < 3.0 * small + 0.5, f"doubling the size took {big / small:.1f}x the time (quadratic?)"


def test_many_conditioned_dp_blocks_are_cheap() -> None:
    lines = ['policy "p" {']
    lines += [f" budget {40 + i * 0.25:.2f}% when prefill and batch == {i + 1}" for i in range(40)]
    lines += [" budget 50%"]
    lines += [f' layers when prefill and tokens == {i + 1} {{ allocate dp from "{PROFILE}" }}' for i in range(40)]
    lines += [f' layers {{ allocate dp from "{PROFILE}" }}', "}"]
    t = time.process_time()
    compile_policy("\n".join(lines), SPEC, base_dir=POLICY_DIR)
    assert time.process_time() - t < 5.0


def test_non_utf8_file_reports_line_and_column(tmp_path) -> None:
    p = tmp_path / "bad.policy"
    p.write_bytes(b'policy "p" {\n  budget 50% # caf\xe9\n}\n')
    with pytest.raises(PolicyError) as ei:
        load_policy(p, SPEC)
    e = ei.value
    assert (e.line, e.column) == (2, 19) and "not UTF-8" in e.message
    assert e.format().startswith(f"{p}:2:19: error:")


@pytest.mark.parametrize("src,fragment", [
    ('policy"a"{budget50%layers{allocateuniform}}', "'budget' and '50%' are glued together"),
    ('policy "a" { layers { allocateuniform } }', "'allocate' and 'uniform' are glued together"),
    ('policy "a" { budget ５０% }', "non-ASCII digit"),
    ('policy "a" { layers { k = ٣ } }', "non-ASCII digit"),
    ('policy "a\u202e" { }', "RIGHT-TO-LEFT OVERRIDE"),
    ('policy "a\x07b" { }', "control character"),
    ('policy "a\x1b[31mred" { }', "control character"),
])
def test_silently_accepted_inputs_are_rejected(src: str, fragment: str) -> None:
    e = errors(src)
    assert fragment in e.format(), e.format()


def test_terminal_escapes_are_never_echoed_raw() -> None:
    for src in ['policy "a\x1b[2J" { }', 'policy "a" { budget 50% }\n\x1b]0;pwned\x07',
                'policy "a" { reroute { similarity "\x1b[31m.sim"; primary top 1 } }', 'policy "a" { \u202e }']:
        out = errors(src).format()
        assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out, repr(out)
