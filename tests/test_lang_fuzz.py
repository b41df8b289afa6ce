"""Mutated valid policies: whatever the mutation, only PolicyError may escape the compiler.

Every reported position lies inside the file, every input is checked within a time bound, and
the structural fuzzer below covers lengths, nesting, encodings and repetition.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sgl_budget.errors import PolicyError
from sgl_budget.errors import LineIndex
from sgl_budget.lang import compile_policy, load_policy
from sgl_budget.spec import PRESETS

POLICY_DIR = Path(__file__).resolve().parent.parent / "policies"
SOURCES = [p.read_text() for p in sorted(POLICY_DIR.glob("*.policy"))]
SPEC = PRESETS["deepseek-v2-lite"]
TOKEN = re.compile(r'"[^"\n]*"|[A-Za-z_]+|\d+(?:\.\d+)?%?|\.\.|>=|<=|==|[{}:;,=<>#\n]|\s+|.')
VOCAB = ["policy", "budget", "layers", "tokens", "reroute", "piggyback", "when", "and", "decode", "prefill",
         "batch", "k", "=", ">=", "<=", "layer", "..", ",", ":", "{", "}", ";", "allocate", "dp", "uniform",
         "from", "min_k", "max_k", "reallocate", "by", "score", "similarity", "primary", "top", "coverage",
         "count", "keep", "preserve", "critical", "min_similarity", "min_score", "0", "1", "6", "7", "-1",
         "1e9", "0.5", "150%", "50%", "0%", '"x"', '""', '"profiles/deepseek-v2-lite.synthetic.sens.yaml"',
         "#", "\n", " ", "\x00", "é", "\t"]
CHARS = st.characters(codec="utf-8", exclude_categories=("Cs",))


TIME_BOUND_S = 2.0  # CPU seconds per fuzz input (all are well under 100 KB)


def assert_positions_inside(e: PolicyError, text: str) -> None:
    """Every diagnostic points inside the file (a line that exists, a column on it or just past its end)."""
    idx = LineIndex.of(text)
    for d in e.diagnostics:
        if d.span is None:
            continue
        assert 1 <= d.line <= idx.num_lines, (d, idx.num_lines)
        assert 1 <= d.column <= len(idx.line(d.line)) + 1, (d, idx.line(d.line))


def compile_or_policy_error(text: str) -> None:
    t = time.process_time()
    try:
        compile_policy(text, SPEC, file="fuzz.policy", base_dir=POLICY_DIR)
    except PolicyError as e:
        out = e.format()  # formatting must work for every error
        assert out.startswith("fuzz.policy")
        assert "\x1b" not in out and "\u202e" not in out  # never echo terminal escapes / bidi overrides
        assert_positions_inside(e, text)
        assert [d.sort_key() for d in e.diagnostics] == sorted(d.sort_key() for d in e.diagnostics)
    took = time.process_time() - t
    assert took < TIME_BOUND_S, f"{len(text)} chars took {took:.2f}s"


def test_sources_compile() -> None:
    for src in SOURCES:
        compile_policy(src, SPEC, file="ok.policy", base_dir=POLICY_DIR)


@st.composite
def char_mutation(draw) -> str:
    text = draw(st.sampled_from(SOURCES))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        c = draw(CHARS)
        if op == "insert":
            text = text[:i] + c + text[i:]
        elif op == "delete":
            text = text[:i] + text[i + 1:]
        else:
            text = text[:i] + c + text[i + 1:]
    return text


@st.composite
def token_mutation(draw) -> str:
    toks = TOKEN.findall(draw(st.sampled_from(SOURCES)))
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(toks) - 1))
        op = draw(st.sampled_from(["insert", "delete", "replace", "swap"]))
        t = draw(st.sampled_from(VOCAB))
        if op == "insert":
            toks.insert(i, t)
        elif op == "delete":
            del toks[i]
        elif op == "replace":
            toks[i] = t
        elif i + 1 < len(toks):
            toks[i], toks[i + 1] = toks[i + 1], toks[i]
    return "".join(toks)


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(char_mutation())
def test_character_mutations_raise_only_policy_error(text: str) -> None:
    compile_or_policy_error(text)


@FUZZ
@given(token_mutation())
def test_token_mutations_raise_only_policy_error(text: str) -> None:
    compile_or_policy_error(text)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(VOCAB), max_size=40).map(" ".join))
def test_random_token_soup(text: str) -> None:
    compile_or_policy_error('policy "soup" {' + text + "}")


# -- structural fuzzer: lengths, nesting, encodings, repetition ---------------------------

STATEMENTS = ["budget 50%", "budget 3.0 when decode", "layers { k = 3 }", "layers when batch >= 4 { k = 2 }",
              'layers { allocate dp from "profiles/deepseek-v2-lite.synthetic.sens.yaml" }', "layers { allocate uniform }",
              "tokens { reallocate by score; min_k 1; max_k 6 }", "piggyback { max_k 6 }", "layers { layer 1..4: k = 2 }",
              'reroute { similarity "profiles/nope.sim.safetensors"; primary top 1 }', "layers { k = 9 }",
              "budget 150%", "tokens { min_k 2 }"]


@st.composite
def structured(draw) -> str:
    """A policy built from statements: repeated, nested in stray braces, with long names and numbers."""
    body = []
    for _ in range(draw(st.integers(0, 12))):
        stmt = draw(st.sampled_from(STATEMENTS))
        reps = draw(st.sampled_from([1, 1, 2, 5, 40]))
        sep = draw(st.sampled_from(["\n", "; ", " ", "\r\n", "\n\n# c\n"]))
        body.append(sep.join([stmt] * reps))
    depth = draw(st.sampled_from([0, 0, 1, 3, 50]))
    name = draw(st.sampled_from(["p", "x" * 300, "é" * 40, "a b", ""]))
    when = " and batch >= 1" * draw(st.sampled_from([0, 1, 100, 2000]))
    if when:
        body.append(f"layers when decode{when} {{ k = 2 }}")
    text = f'policy "{name}" {{\n' + "{" * depth + "\n".join(body) + "}" * depth + "\n}\n"
    return text


@FUZZ
@given(structured())
def test_structured_inputs_raise_only_policy_error(text: str) -> None:
    compile_or_policy_error(text)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SOURCES), st.sampled_from(["utf-8", "utf-16", "latin-1", "cp1252", "utf-8-sig"]),
       st.binary(max_size=8), st.integers(0, 10_000))
def test_encodings_raise_only_policy_error(tmp_path_factory, src: str, encoding: str, junk: bytes, at: int) -> None:
    data = (src.replace("#", "# café ") if encoding != "utf-16" else src).encode(encoding, "replace")
    at = at % (len(data) + 1)
    data = data[:at] + junk + data[at:]
    p = tmp_path_factory.mktemp("enc") / "f.policy"
    p.write_bytes(data)
    t = time.process_time()
    try:
        load_policy(p, SPEC)
    except PolicyError as e:
        e.format()
        if e.span is not None and "not UTF-8" in e.message:
            text = data.decode("utf-8", "replace")
            assert 1 <= e.line <= text.count("\n") + 1
    assert time.process_time() - t < TIME_BOUND_S


def test_checking_is_near_linear_in_repetitions() -> None:
    def cpu(n: int) -> float:
        text = 'policy "r" {\n' + "\n".join(f"layers when batch == {i + 1} {{ k = 2 }}" for i in range(n)) + "\n}\n"
        t = time.process_time()
        compile_policy(text, SPEC)
        return time.process_time() - t

    cpu(10)
    small, big = cpu(150), cpu(300)
    assert big < 3.0 * small + 0.5, f"doubling the blocks took {big / max(small, 1e-9):.1f}x the time"
