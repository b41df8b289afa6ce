"""Every kind of bad policy is a PolicyError with location, source line, caret and hint — by message."""

from __future__ import annotations

import pytest

from sgl_budget.errors import PolicyError
from sgl_budget.lang import compile_policy, load_policy
from sgl_budget.spec import PRESETS

SPEC = PRESETS["deepseek-v2-lite"]  # 27 layers, MoE layers 1..26, 64 experts, top-6


def P(body: str) -> str:
    return 'policy "t" {\n' + body + "\n}\n"


# (policy text, message fragment, line, column) — column None = not checked
CASES = [
    # -- syntax ----------------------------------------------------------------
    ("", "unexpected end of file; expected 'policy'", 1, 1),
    ("policy t {}", "unexpected 't'", 1, 8),
    ('policy "t" { budget 50%', "unexpected end of file", 1, None),
    (P("  budgt 50%"), "unknown keyword 'budgt'", 2, 3),
    (P("  layers { allocate dpp from \"x\" }"), "unknown keyword 'dpp'", 2, 21),
    (P("  layers { k == 3 }"), "unexpected '='", 2, 15),
    (P("  reroute { primary top 20% }"), "a percentage is not allowed here", 2, 27),
    (P('  reroute { similarity "abc }'), "unterminated string", 2, 24),
    (P("  budget"), "unexpected '}'", 3, 1),
    (P("  layers when decode and batch => 3 { }"), "unexpected '='", 2, 32),
    (P("  tokens { reallocate by scores }"), "unknown keyword 'scores'", 2, 26),
    ('policy "t" { } trailing', "unexpected 'trailing'", 1, 16),
    (P("  layers { k = 3 @ }"), "unexpected character '@'", 2, 18),
    # -- budget ------------------------------------------------------------------
    (P("  budget 120%"), "budget 120% is above the model's top-k", 2, 10),
    (P("  budget 0%"), "budget 0% must be above 0%", 2, 10),
    (P("  budget -2"), "budget -2 must be above 0 experts per token", 2, 10),
    (P("  budget 7.5"), "budget 7.5 experts per token is above the model's top-k (6)", 2, 10),
    (P("  budget 50%\n  budget 40%"), "this budget block never applies", 3, 3),
    # -- layers ------------------------------------------------------------------
    (P("  layers { k = 7 }"), "k 7 is out of range", 2, 16),
    (P("  layers { k = 0 }"), "k 0 is out of range", 2, 16),
    (P("  layers { k = 2.5 }"), "k must be a whole number, not 2.5", 2, 16),
    (P("  layers { k >= 4\n k <= 2 }"), "k <= 2 is below k >= 4", 3, 2),
    (P("  layers { layer 40: k = 2 }"), "layer 40 is out of range", 2, 18),
    (P("  layers { layer 0: k = 2 }"), "layer 0 is not an MoE layer of deepseek-v2-lite", 2, 18),
    (P("  layers { layer 5..3: k = 2 }"), "empty layer range 5..3", 2, 18),
    (P("  layers { layer 3: k = 2\n layer 2..4: k = 1 }"), "layer 3 is given a k twice", 3, 2),
    (P("  layers { k = 3\n k = 4 }"), "'k =' is set twice in this layers block", 3, 2),
    (P("  budget 50%\n  layers { k = 3\n allocate uniform }"), "`k = 3` conflicts with `allocate uniform`", 3, 12),
    (P("  layers { allocate uniform }"), "`allocate uniform` needs a budget", 2, 12),
    (P("  budget 50%\n  layers { k = 4 }"), "the layer plan uses 104 activations per token", 3, 3),
    (P("  budget 10%"), "budget too small", 2, 3),
    (P("  layers { k <= 3\n layer 2: k = 5 }"), "layer 2: k = 5 lies outside this block's bounds 1..3", 3, 2),
    (P("  budget 50%\n  layers { allocate dp from \"missing.yaml\" }"), "profile not found: missing.yaml", 3, 29),
    # -- tokens ------------------------------------------------------------------
    (P("  tokens { min_k 1 }"), "a tokens block needs `reallocate by score`", 2, 3),
    (P("  tokens { reallocate by score\n min_k 4\n max_k 2 }"), "min_k 4 is above max_k 2", 3, 2),
    (P("  tokens { reallocate by score\n max_k 65 }"), "max_k 65 is out of range", 3, 8),
    (P("  layers { k = 2 }\n  tokens { reallocate by score\n min_k 3 }"), "min_k 3 is above layer 1's k = 2", 4, 2),
    # -- reroute -----------------------------------------------------------------
    (P("  reroute { primary top 1 }"), "a reroute block needs `similarity \"file\"`", 2, 3),
    (P('  reroute { similarity "s.safetensors" }'), "a reroute block needs a primary rule", 2, 3),
    (P('  reroute { similarity "s.safetensors"\n primary top 9 }'), "primary top 9 is out of range", 3, 14),
    (P('  reroute { similarity "s.safetensors"\n keep primary 150% }'), "primary coverage 150% is out of range", 3, 15),
    (P('  reroute { similarity "s.safetensors"\n primary top 1\n min_similarity 1.5 }'),
     "min_similarity 1.5 is out of range", 4, 17),
    (P('  reroute { similarity "s.safetensors"\n primary top 1\n preserve critical 100 }'),
     "preserve critical 100 is out of range", 4, 20),
    (P('  reroute { similarity "nope.safetensors"\n primary top 1 }'), "similarity file not found", 2, 24),
    # -- piggyback -----------------------------------------------------------------
    (P("  piggyback { min_score 0.1 }"), "a piggyback block needs `max_k N`", 2, 3),
    (P("  piggyback { max_k 3\n min_score 2 }"), "min_score 2 is out of range", 3, 12),
    # -- conditions ----------------------------------------------------------------
    (P("  layers when prefill and decode { k = 3 }"), "a forward is not both prefill and decode", 2, 27),
    (P("  layers when batch >= 8 and batch < 4 { k = 3 }"), "contradicts batch >= 8", 2, 30),
    (P("  layers when batch < 1 { k = 3 }"), "condition can never hold: batch < 1", 2, 15),
    (P("  layers when decode and tokens > 4 and batch < 3 { k = 3 }"),
     "the condition of this layers block can never hold", 2, 3),
    (P("  layers { k = 3 }\n  layers when decode { k = 2 }"), "this layers block never applies", 3, 3),
    (P("  layers when batch >= 2.5 { k = 3 }"), "batch size must be a whole number", 2, 24),
    (P("  layers when batch != 4 { k = 3 }"), "unexpected character '!'", 2, 21),
    (P("  budget 50% when batch <= 4\n  budget 60% when batch > 4\n  budget 70%"),
     "this budget block never applies: the budget block(s) on line 2, 3 match first", 4, 3),
    (P("  layers { k = " + "1" * 400 + " }"), "k 1111111111...111111 is out of range", 2, 16),
    (P("  layers when batch > " + "9" * 400 + " { k = 3 }"), "batch size 9999999999...999999 is out of range", 2, 23),
    # -- name ----------------------------------------------------------------------
    ('policy "" { }', "the policy has an empty name", 1, 8),
]


@pytest.mark.parametrize("text,message,line,column", CASES, ids=[c[1][:40] for c in CASES])
def test_bad_policy_is_a_policy_error(text: str, message: str, line: int, column: int | None) -> None:
    with pytest.raises(PolicyError) as ei:
        compile_policy(text, SPEC, file="bad.policy")
    err = ei.value
    # every independent error is reported: find this case's among them
    e = next((d for d in err.diagnostics if message in d.message), None)
    assert e is not None, err.format()
    assert e.where == "bad.policy"
    assert e.line == line, err.format()
    if column is not None:
        assert e.column == column, err.format()
    text_out = e.format()
    assert text_out.startswith(f"bad.policy:{line}:")
    assert "^" in text_out  # the caret under the offending text
    assert e.hint, "every diagnostic carries a hint"
    assert [d.sort_key() for d in err.diagnostics] == sorted(d.sort_key() for d in err.diagnostics)
    src_line = text.splitlines()[line - 1] if text.splitlines() else ""
    assert src_line.replace("\t", " ") in text_out


def test_distinct_messages() -> None:
    assert len({c[1] for c in CASES}) >= 25


def test_missing_policy_file(tmp_path) -> None:
    with pytest.raises(PolicyError, match="no such policy file"):
        load_policy(tmp_path / "nope.policy", SPEC)


def test_binary_policy_file(tmp_path) -> None:
    p = tmp_path / "bin.policy"
    p.write_bytes(b"\xff\xfe\x00policy")
    with pytest.raises(PolicyError, match="not UTF-8"):
        load_policy(p, SPEC)


def test_error_format_is_compiler_style() -> None:
    with pytest.raises(PolicyError) as ei:
        compile_policy(P("  budget 120%"), SPEC, file="x.policy")
    lines = ei.value.format().splitlines()
    assert lines[0] == "x.policy:2:10: error: budget 120% is above the model's top-k"
    assert lines[2] == "2 |   budget 120%"
    assert lines[3] == "  |          ^~~~"
    assert lines[4].startswith("  = help: a budget is at most 100%")
