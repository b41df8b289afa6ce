"""``GET /moe_policies``: the policies a server offers its requests, so clients can discover the names.

Added to SGLang's HTTP app by the launcher once every policy is validated (before the server
starts); a plain server without sgl_budget flags has no such route.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...explain import summary_dict
from ... import __version__
from ...lang.policy_set import DEFAULT, REQUEST_KEY, PolicySet
from .calibration import CALIBRATION_KEY, allowed_files

ROUTE = "/moe_policies"


def policy_listing(pset: PolicySet, per_request_blocker: str | None = None, calibration: bool = False
                   ) -> dict[str, Any]:
    """What ``GET /moe_policies`` answers: how a request picks a policy, the default, each policy's summary, the
    model the policies were checked against, and whether calibration requests are served (with the files
    request policies may name)."""
    names = (DEFAULT,) if per_request_blocker else pset.request_names
    policies = []
    for name in names:
        i = pset.index(name)
        src = pset.sources[i]
        policies.append({"name": name, "routes_as": pset.names[i], "file": str(Path(src).resolve()) if src else None,
                         **summary_dict(pset.irs[i])})
    return {"request_field": f"custom_params.{REQUEST_KEY}", "default": pset.names[pset.default],
            "per_request": per_request_blocker is None, "per_request_off_because": per_request_blocker,
            "policies": policies, "model": pset.irs[0].spec.to_dict(), "sgl_budget": __version__,
            "calibration": {"enabled": calibration, "request_field": f"custom_params.{CALIBRATION_KEY}",
                            "files": sorted(allowed_files()) if calibration else []}}


def add_listing_route(listing: dict[str, Any]) -> None:
    """Serve ``listing`` at :data:`ROUTE` from SGLang's HTTP app (the launcher process)."""
    from sglang.srt.entrypoints import http_server

    app = http_server.app  # (a second launch in one process replaces the first one's route)
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != ROUTE]

    async def moe_policies() -> dict[str, Any]:
        return listing

    app.add_api_route(ROUTE, moe_policies, methods=["GET"], summary="sgl_budget: the MoE policies requests may pick")
