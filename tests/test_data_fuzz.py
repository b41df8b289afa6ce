"""Fuzzed data files: every malformed config.json, trace, profile or similarity file gets the project's own error
naming the file, or loads into values that make sense; never a traceback, never over the time bound.

Variants come from fixed seeds: wrong types, huge/negative/NaN/inf numbers, deep nesting, duplicate keys,
non-UTF-8 bytes, missing/extra fields, truncation and oversized safetensors headers. Each goes through the
loaders the CLI uses and, for a sample, through ``sgl_budget.cli.main`` itself.
"""

from __future__ import annotations

import copy
import json
import math
import random
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from sgl_budget.alloc import ProfileError, load_profile, save_profile, synthetic_profile
from sgl_budget.cli import main
from sgl_budget.similarity import SimilarityFileError, load_similarity, save_similarity, synthetic_similarity
from sgl_budget.spec import SpecError, load_spec
from sgl_budget.traces import TraceError, load_trace, synthetic_trace, write_trace

from conftest import TINY_SOFTMAX

TIME_BOUND_S = 2.0  # CPU seconds per input; every input here is under 1 MB
VARIANTS = 60  # per file kind and seed
SEEDS = (11, 12)
DEEP = "[" * 5000 + "]" * 5000
WEIRD: list[Any] = [None, True, False, "no", "", "\u202e\x1b[31m", "x" * 5000, -5, 0, 1, 2.5, 64.0, -0.0, 1e308,
                    -1e308, math.inf, -math.inf, math.nan, 10 ** 30, -(10 ** 30), [], {}, [1.5, 2], [[1, 2]],
                    {"a": 1}, [None], list(range(300))]
QWEN = {"model_type": "qwen3_moe", "num_hidden_layers": 3, "num_experts": 16, "num_experts_per_tok": 4,
        "hidden_size": 64, "moe_intermediate_size": 32, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [0], "shared_expert_intermediate_size": 0}


# -- generic mutations -------------------------------------------------------------

def _paths(v: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every path to a value inside nested dicts/lists (the root included)."""
    yield prefix
    if isinstance(v, dict):
        for k, c in v.items():
            yield from _paths(c, prefix + (k,))
    elif isinstance(v, list):
        for i, c in enumerate(v[:6]):
            yield from _paths(c, prefix + (i,))


def _set(root: Any, path: tuple, value: Any, delete: bool = False) -> Any:
    """A copy of ``root`` with the value at ``path`` replaced (or deleted)."""
    if not path:
        return value
    root = copy.deepcopy(root)
    node = root
    for key in path[:-1]:
        node = node[key]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return root


def _mutate_tree(rng: random.Random, tree: Any) -> Any:
    """Replace, delete or add one value somewhere in ``tree``."""
    path = rng.choice(list(_paths(tree)))
    op = rng.random()
    if op < 0.15 and path:
        return _set(tree, path, None, delete=True)
    if op < 0.25 and isinstance(_get(tree, path), dict):
        return _set(tree, path + (rng.choice(["extra", "1", "layers", "num_experts"]),), rng.choice(WEIRD))
    return _set(tree, path, rng.choice(WEIRD))


def _get(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _mutate_text(rng: random.Random, text: str) -> str | bytes:
    """Text-level damage: truncation, a duplicated line or key, deep nesting, odd characters, non-UTF-8 bytes."""
    op = rng.randrange(7)
    cut = rng.randrange(len(text) + 1)
    if op == 0:
        return text[:cut]
    if op == 1:
        lines = text.splitlines(keepends=True)
        i = rng.randrange(len(lines))
        return "".join(lines[:i + 1] + [lines[i]] + lines[i + 1:])
    if op == 2:
        return text[:cut] + DEEP[:rng.choice([200, 2000, 10000])] + text[cut:]
    if op == 3:
        return text[:cut] + rng.choice(["\x00", "\t", "\u2028", "'", '"', "{", "&a", "*a", "!!python/object:os.system"]) + text[cut:]
    if op == 4:
        return text.encode()[:cut] + bytes([rng.choice([0x80, 0xff, 0xc3, 0xed])]) + text.encode()[cut:]
    if op == 5:
        return text.replace("1", "1" * rng.choice([20, 400, 5000]), 1)
    return text * rng.choice([2, 50])


# -- checks ------------------------------------------------------------------------------

def _within_bound(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` and assert it used at most TIME_BOUND_S of CPU; returns its result or the exception it raised."""
    t = time.process_time()
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - the caller checks the type
        out = e
    used = time.process_time() - t
    assert used < TIME_BOUND_S, f"{used:.2f} s of CPU"
    return out


def _check(result: Any, error: type, path: Path, accept: Callable[[Any], None]) -> None:
    """``result`` is the project's error naming ``path``, or a value that passes ``accept``."""
    if isinstance(result, BaseException):
        assert type(result) is error, f"{type(result).__name__}: {result}"
        assert str(path) in str(result), str(result)
    else:
        accept(result)


def _sane_spec(s) -> None:
    ints = ("num_layers", "num_experts", "top_k", "hidden_size", "moe_intermediate_size", "num_shared_experts",
            "shared_expert_intermediate_size", "n_group", "topk_group", "dtype_bytes")
    assert all(type(getattr(s, f)) is int for f in ints) and s.dtype_bytes >= 1 and s.num_shared_experts >= 0
    assert type(s.norm_topk_prob) is bool and type(s.has_correction_bias) is bool
    assert all(type(i) is int for i in s.moe_layers) and 1 <= s.top_k <= s.num_experts
    assert math.isfinite(s.routed_scaling_factor)


def _sane_trace(t) -> None:
    _sane_spec(t.spec)
    assert set(t.layers) == set(t.spec.moe_layers) and all(type(l) is int for l in t.layers)
    assert isinstance(t.source, str) and isinstance(t.synthetic, bool)


def _sane_profile(p) -> None:
    top_k = p.model["top_k"]
    assert type(top_k) is int and 1 <= top_k <= p.model["num_experts"]
    for row in p.loss.values():
        assert all(type(k) is int and 1 <= k <= top_k for k in row)
        assert all(math.isfinite(v) and v >= 0 for v in row.values())


def _sane_similarity(t) -> None:
    for m in t.matrices.values():
        assert m.shape[0] == m.shape[1] == t.num_experts and float(m.min()) >= 0 and float(m.max()) <= 1
    assert isinstance(t.source, str) and isinstance(t.synthetic, bool)


# -- variants per kind ------------------------------------------------------------------

def _config_variants(rng: random.Random, d: Path) -> Iterator[Path]:
    for i in range(VARIANTS):
        tree = _mutate_tree(rng, QWEN)
        text = json.dumps(tree) if rng.random() < 0.6 else _mutate_text(rng, json.dumps(tree, indent=1))
        p = d / f"c{i}" / "config.json"
        p.parent.mkdir()
        p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        yield p


def _safetensors_variants(rng: random.Random, d: Path, good: Path, key: str, name: str) -> Iterator[Path]:
    """Damaged metadata JSON, damaged tensors, and damaged bytes of a good safetensors file."""
    tensors = load_file(str(good))
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        meta = json.loads(f.metadata()[key])
    for i in range(VARIANTS):
        p = d / f"{name}{i}.safetensors"
        op = rng.random()
        if op < 0.5:
            tree = _mutate_tree(rng, meta)
            raw = json.dumps(tree) if rng.random() < 0.7 else _mutate_text(rng, json.dumps(tree))
            raw = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
            save_file(tensors, str(p), metadata={key: raw})
        elif op < 0.75:
            save_file(_mutate_tensors(rng, tensors), str(p), metadata={key: json.dumps(meta)})
        else:
            p.write_bytes(_mutate_bytes(rng, good.read_bytes()))
        yield p


def _mutate_tensors(rng: random.Random, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop, reshape, retype, poison or add one tensor."""
    out = dict(tensors)
    name = rng.choice(sorted(out))
    op = rng.randrange(6)
    if op == 0:
        del out[name]
    elif op == 1:
        out[name] = out[name].flatten()[:-1].clone()
    elif op == 2:
        out[name] = out[name].to(rng.choice([torch.int32, torch.float64, torch.bool, torch.uint8]))
    elif op == 3:
        x = out[name].clone().float()
        x.view(-1)[0] = rng.choice([math.nan, math.inf, -1e30, 7.0])
        out[name] = x.to(out[name].dtype) if out[name].is_floating_point() else x.long()
    elif op == 4:
        out["layer.7.router_logits"] = torch.zeros(3, 16)
    else:
        out[name] = torch.zeros(0, *out[name].shape[1:], dtype=out[name].dtype)
    return out


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    """Truncate, flip bytes, or claim an oversized header."""
    op = rng.randrange(3)
    if op == 0:
        return data[:rng.randrange(len(data))]
    if op == 1:
        b = bytearray(data)
        for _ in range(rng.randrange(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    return struct.pack("<Q", rng.choice([2 ** 63, 10 ** 9, len(data) * 2])) + data[8:]


def _profile_variants(rng: random.Random, d: Path, good: Path) -> Iterator[Path]:
    base = yaml.safe_load(good.read_text())
    extras = ["a: &a [1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b, *b, *b, *b]\n",
              "layers: {1: {1: 0.1}}\n", "x: " + DEEP[:3000] + "\n", "x: !!python/object/apply:os.system ['true']\n"]
    for i in range(VARIANTS):
        p = d / f"p{i}.sens.yaml"
        op = rng.random()
        if op < 0.45:
            text: str | bytes = yaml.safe_dump(_mutate_tree(rng, base), width=120)
        elif op < 0.85:
            text = _mutate_text(rng, good.read_text())
        else:
            text = good.read_text() + rng.choice(extras)
        p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        yield p


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    """One valid file of each kind, for the tiny softmax spec."""
    d = tmp_path_factory.mktemp("good")
    (d / "config.json").write_text(json.dumps(QWEN))
    prof = synthetic_profile(TINY_SOFTMAX, seed=1)
    pol = d / "p.policy"
    pol.write_text('policy "p" { budget 50% }\n')
    return {"trace": write_trace(synthetic_trace(TINY_SOFTMAX, num_sequences=4, seq_len=6), d / "t.safetensors"),
            "profile": save_profile(prof, d / "p.sens.yaml"),
            "similarity": save_similarity(synthetic_similarity(TINY_SOFTMAX), d / "s.safetensors"),
            "policy": pol}


def _cli_ok(argv: list[str], capsys) -> None:
    """``sgl-budget argv`` exits 0 or 2, prints no traceback, and stays within the time bound."""
    code = _within_bound(lambda: main(argv))
    err = capsys.readouterr().err
    assert code in (0, 2), f"{argv}: {code!r}\n{err}"
    assert "Traceback" not in err, err


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzzed_config_json(tmp_path, capsys, good, seed) -> None:
    rng = random.Random(seed)
    for i, p in enumerate(_config_variants(rng, tmp_path)):
        _check(_within_bound(lambda: load_spec(p)), SpecError, p, _sane_spec)
        if i % 4 == 0:
            _cli_ok(["check", str(good["policy"]), "--model-spec", str(p)], capsys)


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzzed_traces(tmp_path, capsys, good, seed) -> None:
    rng = random.Random(seed)
    for i, p in enumerate(_safetensors_variants(rng, tmp_path, good["trace"], "sgl_budget.trace", "t")):
        _check(_within_bound(lambda: load_trace(p)), TraceError, p, _sane_trace)
        if i % 3 == 0:
            _cli_ok(["trace", "info", str(p)], capsys)
            _cli_ok(["replay", str(good["policy"]), "--trace", str(p), "--batch-size", "2"], capsys)


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzzed_similarity_files(tmp_path, good, seed) -> None:
    rng = random.Random(seed)
    for p in _safetensors_variants(rng, tmp_path, good["similarity"], "sgl_budget.similarity", "s"):
        _check(_within_bound(lambda: load_similarity(p)), SimilarityFileError, p, _sane_similarity)


@pytest.mark.parametrize("seed", SEEDS)
def test_fuzzed_profiles(tmp_path, capsys, good, seed) -> None:
    rng = random.Random(seed)
    for i, p in enumerate(_profile_variants(rng, tmp_path, good["profile"])):
        _check(_within_bound(lambda: load_profile(p)), ProfileError, p, _sane_profile)
        if i % 3 == 0:
            _cli_ok(["allocate", "--profile", str(p), "--budget", rng.choice(["50%", "100%", "1.5"])], capsys)


def test_unsafe_yaml_is_never_executed(tmp_path) -> None:
    """Profiles load with SafeLoader semantics: a python/object tag is an error, not a call."""
    p = tmp_path / "p.sens.yaml"
    p.write_text("format: !!python/object/apply:os.system ['echo pwned > " + str(tmp_path / "x") + "']\n")
    with pytest.raises(ProfileError, match="not valid YAML"):
        load_profile(p)
    assert not (tmp_path / "x").exists()
