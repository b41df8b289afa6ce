"""Talk to a running SGLang server that serves sgl_budget policies: discover it, check it, score text windows.

Only the standard library is used for HTTP and nothing imports SGLang, so the calibration commands
(``sgl-budget eval|profile|tune --server URL``) run wherever the server is reachable. Every way a server
can be unusable — down, not an SGLang server, launched without sgl_budget, without ``--moe-calibration``,
serving another model, an sgl_budget too old to calibrate — is a :class:`ServerError` with a sentence
saying which, never a traceback.
"""

from __future__ import annotations

import itertools
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

CALIBRATION_KEY = "moe_calibration"  # sgl_budget.engines.sglang.calibration.CALIBRATION_KEY (no torch import here)
INFO_KEY = "sgl_budget"
_GROUPS = itertools.count()


class ServerError(Exception):
    """The server cannot do what was asked (unreachable, wrong kind, wrong launch flags, refused a request)."""


@dataclass
class ScoredWindow:
    """What the server said about one window: next-token log-probabilities at positions 1..L-1 (and after L)."""

    target: list[float]  # log p(token t | tokens < t), t = 1..L-1
    top_ids: list[list[int]]  # the N most likely next tokens at each position 1..L (the last: after the window)
    top_logp: list[list[float]]
    ids_logp: "np.ndarray | None"  # [L, n] log p of the asked-for token ids (in the order asked) at positions 1..L
    report: dict  # the routing report (experts, distinct experts per batch, phase, group status)


class ServerClient:
    """One SGLang server, as sgl_budget's calibration commands use it."""

    def __init__(self, url: str, timeout: float = 600.0) -> None:
        self.url = url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            self.url = "http://" + self.url
        self.timeout = timeout
        self._listing: dict | None = None

    # -- HTTP -----------------------------------------------------------------------------------

    def _open(self, req: urllib.request.Request | str) -> Any:
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return _loads(r.read())
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")
            raise _HTTPStatus(e.code, _message(body)) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ServerError(f"cannot reach the server at {self.url}: {reason} (is it running? check the URL "
                              "and port)") from None
        except ValueError:  # json.JSONDecodeError and orjson.JSONDecodeError are ValueErrors
            raise ServerError(f"{self.url} answered with something that is not JSON: is it an SGLang server?") \
                from None

    def get(self, path: str) -> Any:
        return self._open(self.url + path)

    def post(self, path: str, payload: dict) -> Any:
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        return self._open(req)

    # -- what the server is ---------------------------------------------------------------------

    def listing(self) -> dict:
        """``GET /moe_policies``: the server's policies, model and calibration mode (cached)."""
        if self._listing is None:
            try:
                self._listing = self.get("/moe_policies")
            except _HTTPStatus as e:
                if e.status == 404:
                    raise ServerError(f"{self.url} has no /moe_policies: it is not an SGLang server launched with "
                                      "sgl_budget (give it --moe-policy, --moe-named-policy or --moe-calibration; "
                                      "pip install sgl-budget[sglang] in its environment)") from None
                raise ServerError(f"{self.url}/moe_policies: HTTP {e.status}: {e.message}") from None
        return self._listing

    def policies(self) -> list[str]:
        """The policy names requests may pick (``default`` and ``stock`` included)."""
        return [p["name"] for p in self.listing()["policies"]]

    def require_calibration(self) -> dict:
        """The listing of a server that serves calibration requests; a clear error otherwise."""
        listing = self.listing()
        cal = listing.get("calibration")
        if not isinstance(cal, dict):
            raise ServerError(f"{self.url} runs an sgl_budget too old for calibration through the server "
                              f"(version {listing.get('sgl_budget', 'before 0.1')}): upgrade it on the server")
        if not cal.get("enabled"):
            raise ServerError(f"{self.url} was launched without --moe-calibration: relaunch it with that flag to "
                              "evaluate, profile or tune through it (it stays off by default: calibration "
                              "requests send policy text and probes)")
        return listing

    def model(self) -> dict:
        """The model spec the server's policies were checked against (``ModelSpec.to_dict``)."""
        return self.listing()["model"]

    def server_info(self) -> dict:
        try:
            return self.get("/server_info")
        except _HTTPStatus:
            return self.get("/get_server_info")

    def tokenizer_path(self) -> str | None:
        try:
            info = self.get("/model_info")
        except _HTTPStatus:
            return None
        return info.get("tokenizer_path")

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """The server's own tokenization of each text (no special tokens added)."""
        got = self.post("/tokenize", {"prompt": list(texts), "add_special_tokens": False})
        return got["tokens"]

    # -- scoring --------------------------------------------------------------------------------

    def score(self, windows: Sequence[Sequence[int]], policy: str | None = None, policy_text: str | None = None,
              lockstep: bool = False, top_n: int = 1, token_ids: Sequence[Sequence[int]] | None = None
              ) -> list[ScoredWindow]:
        """Route ``windows`` (equal length) as one group — one forward batch of the engine, routed as lock-step
        decode steps with ``lockstep`` — under a served policy name or policy text, and return what the model
        predicts at every position. ``token_ids[i]``: token ids whose log-probabilities window i reports."""
        params: dict[str, Any] = {"max_new_tokens": 1, "temperature": 0.0}
        cal: dict[str, Any] = {"group": {"id": f"g{next(_GROUPS)}", "rows": len(windows), "lockstep": lockstep},
                               "report": True}
        if policy_text is not None:
            cal["policy"] = policy_text
        custom: dict[str, Any] = {CALIBRATION_KEY: cal}
        if policy is not None:
            custom["moe_policy"] = policy
        params["custom_params"] = custom
        payload: dict[str, Any] = {"input_ids": [list(map(int, w)) for w in windows], "sampling_params": params,
                                   "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": top_n}
        if token_ids is not None:
            payload["token_ids_logprob"] = [list(map(int, t)) for t in token_ids]
        replies = self._generate(payload)
        out = [_scored(r, None if token_ids is None else token_ids[i]) for i, r in enumerate(replies)]
        errors = {w.report.get("error") for w in out if w.report.get("error")}
        if errors:
            raise ServerError("the server could not route the group as one batch: " + "; ".join(sorted(errors)))
        return out

    def _generate(self, payload: dict) -> list[dict]:
        """``POST /generate`` of a batch; one reply per prompt; a refusal (HTTP 400...) is a ServerError."""
        try:
            replies = self.post("/generate", payload)
        except _HTTPStatus as e:
            raise ServerError(f"the server refused the request (HTTP {e.status}): {e.message}") from None
        return [replies] if isinstance(replies, dict) else replies

    def similarity(self, windows: Sequence[Sequence[int]], session: str, method: str,
                   positions: Sequence[dict[int, Sequence[int]]] | None = None, finish: bool = False) -> dict | None:
        """One call of a similarity session (``sgl-budget similarity --server``): ``windows`` routed with stock,
        the expert inputs of window i at ``positions[i]`` (MoE layer -> window positions) measured in the
        workers; with ``finish`` (no positions: send it after every window came back) the session's report
        ``{"method", "tokens", "matrices"}`` (matrices: layer -> ``[E, E]`` lists)."""
        params = []
        for i in range(len(windows)):
            sim: dict[str, Any] = {"session": session, "method": method, "finish": finish}
            if positions is not None:
                sim["positions"] = {str(l): sorted(map(int, p)) for l, p in positions[i].items() if len(p)}
            params.append({"max_new_tokens": 1, "temperature": 0.0, "custom_params": {
                "moe_policy": "stock", CALIBRATION_KEY: {"report": True, "similarity": sim}}})
        # return_logprob from position 0: no prefix of a window is served from the cache, every token is computed
        payload = {"input_ids": [list(map(int, w)) for w in windows], "sampling_params": params,
                   "return_logprob": True, "logprob_start_len": 0}
        replies = self._generate(payload)
        reports = []
        for r in replies:
            got = r.get("meta_info", {}).get(INFO_KEY)
            if not got:
                raise ServerError("the server's reply carries no sgl_budget report: is its sgl_budget the same "
                                  "version as this one?")
            reports.append(got[0])
        if not finish:
            return None
        sim = reports[0].get("similarity")
        if not isinstance(sim, dict):
            raise ServerError("the server's sgl_budget does not measure expert similarity (upgrade it on the "
                              "server)")
        if sim.get("error"):
            raise ServerError(f"the server could not measure expert similarity: {sim['error']}")
        return sim


def _scored(reply: dict, asked: Sequence[int] | None) -> ScoredWindow:
    meta = reply.get("meta_info", {})
    reports = meta.get(INFO_KEY)
    if not reports:
        raise ServerError("the server's reply carries no sgl_budget routing report: is its sgl_budget the same "
                          "version as this one?")
    tops = (meta["input_top_logprobs"] or [])[1:] + meta["output_top_logprobs"][:1]
    ids_lp = None
    if asked is not None:
        raw = (meta["input_token_ids_logprobs"] or [])[1:] + meta["output_token_ids_logprobs"][:1]
        order = {t: i for i, t in enumerate(asked)}
        ids_lp = np.full((len(raw), len(asked)), -np.inf)
        for row, pos in zip(ids_lp, raw):
            for v, t, *_ in pos:
                row[order[int(t)]] = v
    return ScoredWindow(
        target=[float(v) for v, *_ in meta["input_token_logprobs"][1:]],
        top_ids=[[int(t) for _, t, *_ in pos] for pos in tops],
        top_logp=[[float(v) for v, *_ in pos] for pos in tops],
        ids_logp=ids_lp, report=reports[0])


def coarse_kl(logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """Per row, KL(p || q) over a set of tokens (``logp``, ``logq``: ``[..., n]`` log-probabilities of the same
    tokens) plus one bucket for every other token: a lower bound of the full KL (data-processing inequality),
    equal to it when the set covers the vocabulary."""
    p, q = np.exp(logp), np.exp(logq)
    kl = np.where(p > 0, p * (logp - logq), 0.0).sum(-1)
    p_rest = np.clip(1.0 - p.sum(-1), 0.0, 1.0)
    q_rest = np.clip(1.0 - q.sum(-1), 1e-30, 1.0)
    rest = np.where(p_rest > 1e-12, p_rest * (np.log(np.maximum(p_rest, 1e-30)) - np.log(q_rest)), 0.0)
    return np.maximum(kl + rest, 0.0)


def _loads(raw: bytes) -> Any:
    """JSON from the wire: orjson where installed (SGLang depends on it; replies of log-probabilities are large)."""
    try:
        import orjson
    except ImportError:
        return json.loads(raw)
    return orjson.loads(raw)


class _HTTPStatus(ServerError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


def _message(body: str) -> str:
    """SGLang's error text from an error reply's body (``{"error": {"message": ...}}``), else the body."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return body[:2000]
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if "detail" in data:
            return str(data["detail"])
    return body[:2000]
