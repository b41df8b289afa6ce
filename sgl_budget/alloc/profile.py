"""Alloc-L sensitivity profiles (YAML): per MoE layer, the quality loss when that layer runs with k experts.

Format (docs/formats.md)::

    format: sgl-budget-profile/1
    metric: kl            # kl | ppl_delta | ...
    source: "how it was measured (or 'synthetic: ...')"
    model: {name: deepseek-v2-lite, num_experts: 64, top_k: 6, moe_layers: [1, ..., 26]}
    layers:
      1: {1: 0.52, 2: 0.31, 3: 0.17, 4: 0.08, 5: 0.03, 6: 0.0}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from ..spec import ModelSpec

FORMAT = "sgl-budget-profile/1"


class ProfileError(ValueError):
    """A profile that cannot be used; ``line`` (1-based) points into the YAML where known."""

    def __init__(self, message: str, path: str | Path, line: int | None = None, hint: str | None = None) -> None:
        self.message, self.path, self.line, self.hint = message, str(path), line, hint
        loc = f"{path}:{line}" if line else str(path)
        super().__init__(f"{loc}: {message}" + (f" (hint: {hint})" if hint else ""))


@dataclass(frozen=True)
class Profile:
    loss: dict[int, dict[int, float]]  # layer -> {k: loss}
    metric: str
    model: dict
    source: str
    path: str = ""

    def check_against(self, spec: ModelSpec) -> list[str]:
        """Why this profile cannot serve ``spec`` ([] when it can)."""
        problems = []
        if int(self.model.get("num_experts", spec.num_experts)) != spec.num_experts:
            problems.append(f"it was measured with {self.model['num_experts']} experts, the model has {spec.num_experts}")
        if int(self.model.get("top_k", spec.top_k)) != spec.top_k:
            problems.append(f"it was measured with top-{self.model['top_k']}, the model uses top-{spec.top_k}")
        problems += spec.layer_coverage_problems(self.loss)
        bad_k = sorted({k for ks in self.loss.values() for k in ks if not 1 <= k <= spec.top_k})
        if bad_k:
            problems.append(f"it has k values {bad_k} outside 1..{spec.top_k}")
        return problems


def _line_of(node: yaml.Node, *keys) -> int | None:
    """1-based line of the mapping entry at ``keys`` in a composed YAML tree (best effort)."""
    for key in keys:
        if not isinstance(node, yaml.MappingNode):
            return None
        for k, v in node.value:
            if str(k.value) == str(key):
                node = v
                line = k.start_mark.line + 1
                break
        else:
            return None
    return line if keys else None


def load_profile(path: str | Path) -> Profile:
    """Load and validate a profile; problems raise :class:`ProfileError` (with the YAML line when known)."""
    p = Path(path)
    if not p.is_file():
        raise ProfileError("no such profile file", p, hint="measure one with `sgl-budget profile`")
    text = p.read_text(encoding="utf-8", errors="replace")
    try:
        data = yaml.safe_load(text)
        tree = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ProfileError(f"not valid YAML: {getattr(e, 'problem', e)}", p,
                           mark.line + 1 if mark else None) from None
    if not isinstance(data, dict):
        raise ProfileError("a profile is a YAML mapping with format, metric, model and layers", p, 1)
    if data.get("format") != FORMAT:
        raise ProfileError(f"unsupported profile format {data.get('format')!r}; expected {FORMAT!r}", p,
                           _line_of(tree, "format") or 1)
    for key in ("metric", "model", "layers"):
        if key not in data:
            raise ProfileError(f"missing key '{key}'", p, 1)
    model = data["model"]
    if not isinstance(model, dict) or not {"num_experts", "top_k"} <= set(model):
        raise ProfileError("'model' must give at least num_experts and top_k", p, _line_of(tree, "model"))
    layers = data["layers"]
    if not isinstance(layers, dict) or not layers:
        raise ProfileError("'layers' must map each MoE layer to {k: loss}", p, _line_of(tree, "layers"))
    loss: dict[int, dict[int, float]] = {}
    for lk, ks in layers.items():
        line = _line_of(tree, "layers", lk)
        if isinstance(lk, bool) or not isinstance(lk, int) or lk < 0:
            raise ProfileError(f"layer key {lk!r} is not an integer layer index", p, line)
        if not isinstance(ks, dict) or not ks:
            raise ProfileError(f"layer {lk} must map k to loss, e.g. {{1: 0.5, 2: 0.2}}", p, line)
        row = {}
        for k, v in ks.items():
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ProfileError(f"layer {lk}: k {k!r} is not a positive integer", p, line)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ProfileError(f"layer {lk}, k {k}: loss {v!r} must be a finite number >= 0", p, line)
            row[k] = float(v)
        loss[lk] = dict(sorted(row.items()))
    return Profile(loss=dict(sorted(loss.items())), metric=str(data["metric"]), model=dict(model),
                   source=str(data.get("source", "")), path=str(p))


def save_profile(profile: Profile, path: str | Path, header: str | None = None) -> Path:
    """Write ``profile`` as YAML (with an optional ``# comment`` header)."""
    doc = {"format": FORMAT, "metric": profile.metric, "source": profile.source, "model": profile.model,
           "layers": {int(l): {int(k): float(v) for k, v in ks.items()} for l, ks in profile.loss.items()}}
    text = yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=120)
    if header:
        text = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + text
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


def synthetic_profile(spec: ModelSpec, seed: int = 0) -> Profile:
    """A SYNTHETIC, seeded profile: loss falls with k to 0 at top-k; first and last layers are most sensitive."""
    rng = np.random.default_rng(seed)
    n = spec.num_moe_layers
    loss = {}
    for i, l in enumerate(spec.moe_layers):
        pos = i / max(1, n - 1)
        sens = 0.3 + 1.2 * (1 - pos) ** 3 + 0.6 * pos ** 4 + 0.25 * rng.random()
        row = {}
        for k in range(1, spec.top_k + 1):
            frac = (spec.top_k - k) / spec.top_k
            row[k] = round(float(sens * frac ** 1.7 * (1 + 0.1 * rng.random())), 6) if k < spec.top_k else 0.0
        loss[l] = row
    return Profile(loss=loss, metric="kl",
                   model={"name": spec.name, "num_experts": spec.num_experts, "top_k": spec.top_k,
                          "moe_layers": list(spec.moe_layers)},
                   source=f"synthetic: seeded generator (not measured), seed={seed}")
