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

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from ..datacheck import decode_utf8, describe, int_problem, is_int, is_number, missing_file
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
    warnings: tuple[str, ...] = ()  # e.g. losses that grow with k: allowed, but the user should see them

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


_SafeBase = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when present: same rules, ~5x faster


class _StrictLoader(_SafeBase):  # type: ignore[misc, valid-type]
    """A safe YAML loader (SafeConstructor: no Python objects, no eval) that refuses a key given twice in a mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[tuple[type, object]] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                marker = (type(key), key)
                dup = marker in seen
            except TypeError:  # unhashable key: SafeLoader reports it
                continue
            if dup:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {describe(key)}",
                                                        key_node.start_mark)
            seen.add(marker)
        return super().construct_mapping(node, deep=deep)


def _parse(text: str, p: Path) -> tuple[object, yaml.Node | None]:
    """The YAML document and its node tree (parsed once); every failure is a ProfileError with a line."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        return (loader.construct_document(node) if node is not None else None), node
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ProfileError(f"not valid YAML: {getattr(e, 'problem', None) or e}", p,
                           mark.line + 1 if mark else None) from None
    except RecursionError:
        raise ProfileError("not a profile: nested far too deep", p) from None
    except ValueError as e:  # e.g. an integer over Python's digit limit
        raise ProfileError(f"not valid YAML: {str(e)[:120]}", p) from None
    finally:
        loader.dispose()


def _key_lines(node: yaml.Node | None) -> dict[str, int]:
    """1-based line of each key of a mapping node, by its scalar text (one pass: lookups stay O(1))."""
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(k.value): k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}


def _child(node: yaml.Node | None, key: str) -> yaml.Node | None:
    """The value node of ``key`` in a mapping node (None if absent)."""
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return v
    return None


def _model_problems(model: dict) -> list[str]:
    """What is wrong with the profile's ``model`` entry: positive integer experts and top-k, integer layers."""
    problems = [q for key, hi in (("num_experts", 1 << 16), ("top_k", 1 << 16))
                if (q := int_problem(f"model.{key}", model[key], 1, hi))]
    if not problems and model["top_k"] > model["num_experts"]:
        problems.append(f"model.top_k {model['top_k']} exceeds model.num_experts {model['num_experts']}")
    layers = model.get("moe_layers", [])
    if not isinstance(layers, list) or not all(is_int(l) and l >= 0 for l in layers):
        problems.append(f"model.moe_layers must be a list of layer indices, not {describe(layers)}")
    if not isinstance(model.get("name", ""), str):
        problems.append(f"model.name must be a string, not {describe(model['name'])}")
    return problems


def _row(lk: object, ks: object, top_k: int, line: int | None) -> tuple[dict[int, float], list[tuple[int | None, str]]]:
    """One layer's {k: loss} and its problems (each with its line): integer k in 1..top_k, finite loss >= 0."""
    if isinstance(lk, bool) or not isinstance(lk, int) or lk < 0:
        return {}, [(line, f"layer key {describe(lk)} is not an integer layer index")]
    if not isinstance(ks, dict) or not ks:
        return {}, [(line, f"layer {lk} must map k to loss, e.g. {{1: 0.5, 2: 0.2}}")]
    row, problems = {}, []
    for k, v in ks.items():
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            problems.append((line, f"layer {lk}: k {describe(k)} is not a positive integer"))
        elif k > top_k:
            problems.append((line, f"layer {lk}: k {describe(k)} exceeds the profile's model.top_k {top_k}"))
        elif not is_number(v) or v < 0:
            problems.append((line, f"layer {lk}, k {k}: loss {describe(v)} must be a finite number >= 0"))
        else:
            row[k] = float(v)
    return dict(sorted(row.items())), problems


def _growth_warning(loss: dict[int, dict[int, float]], p: Path) -> str | None:
    """A warning when some layer's loss grows with k: the plan trusts such rows, so the user should know."""
    rising = [(l, a, b) for l, row in loss.items() for a, b in zip(row, list(row)[1:]) if row[b] > row[a]]
    if not rising:
        return None
    l, a, b = rising[0]
    layers = sorted({r[0] for r in rising})
    return (f"{p}: losses grow with k in layers {layers[:8]}{'...' if len(layers) > 8 else ''} (e.g. layer {l}: "
            f"k {a} -> {loss[l][a]:.4g}, k {b} -> {loss[l][b]:.4g}); more experts should not cost quality, "
            "so check the measurement: the plan uses these numbers as given")


def _raise_all(problems: list[tuple[int | None, str]], p: Path) -> None:
    """Raise one ProfileError at the first problem's line that also lists the others (with their lines)."""
    line, msg = problems[0]
    if len(problems) > 1:
        rest = "; ".join(f"line {l}: {m}" if l else m for l, m in problems[1:8])
        msg += f" (and {len(problems) - 1} more: {rest}{'; ...' if len(problems) > 8 else ''})"
    raise ProfileError(msg, p, line)


def load_profile(path: str | Path) -> Profile:
    """Load and validate a profile; problems raise :class:`ProfileError` (with the YAML line when known)."""
    p = Path(path)
    why = missing_file(p)
    if why:
        raise ProfileError("no such profile file" if why == "no such file" else why, p,
                           hint="measure one with `sgl-budget profile`")
    try:
        text = decode_utf8(p.read_bytes())
    except (OSError, ValueError) as e:
        raise ProfileError(str(e), p) from None
    data, tree = _parse(text, p)
    if not isinstance(data, dict):
        raise ProfileError("a profile is a YAML mapping with format, metric, model and layers", p, 1)
    top = _key_lines(tree)
    if data.get("format") != FORMAT:
        raise ProfileError(f"unsupported profile format {describe(data.get('format'))}; expected {FORMAT!r}", p,
                           top.get("format") or 1)
    for key in ("metric", "model", "layers"):
        if key not in data:
            raise ProfileError(f"missing key '{key}'", p, 1)
    model = data["model"]
    if not isinstance(model, dict) or not {"num_experts", "top_k"} <= set(model):
        raise ProfileError("'model' must give at least num_experts and top_k", p, top.get("model"))
    problems = [(top.get("model"), q) for q in _model_problems(model)]
    for key in ("metric", "source"):
        if not isinstance(data.get(key, ""), str):
            problems.append((top.get(key), f"'{key}' must be a string, not {describe(data[key])}"))
    if problems:
        _raise_all(problems, p)
    layers = data["layers"]
    if not isinstance(layers, dict) or not layers:
        raise ProfileError("'layers' must map each MoE layer to {k: loss}", p, top.get("layers"))
    lines = _key_lines(_child(tree, "layers"))
    loss: dict[int, dict[int, float]] = {}
    for lk, ks in layers.items():
        row, row_problems = _row(lk, ks, model["top_k"], lines.get(str(lk)))
        problems += row_problems
        if row and not row_problems:
            loss[lk] = row
    listed = set(model.get("moe_layers") or ())
    if listed and not problems and listed != set(loss):
        lacks, extra = sorted(listed - set(loss)), sorted(set(loss) - listed)
        problems.append((top.get("layers"), "'layers' must cover exactly model.moe_layers: "
                         + ", ".join(f"{what} {ls[:8]}{'...' if len(ls) > 8 else ''}" for what, ls in
                                     (("it lacks", lacks), ("it adds", extra)) if ls)))
    if problems:
        _raise_all(problems, p)
    loss = dict(sorted(loss.items()))
    warning = _growth_warning(loss, p)
    return Profile(loss=loss, metric=data["metric"], model=dict(model), source=data.get("source", ""), path=str(p),
                   warnings=(warning,) if warning else ())


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
