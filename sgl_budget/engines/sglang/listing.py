"""``GET /moe_policies``: the policies a server offers its requests, so clients can discover the names.

Added to SGLang's HTTP app by the launcher once every policy is validated (before the server
starts); a plain server without sgl_budget flags has no such route.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...explain import summary_dict
from ...lang.policy_set import DEFAULT, REQUEST_KEY, PolicySet

ROUTE = "/moe_policies"


def policy_listing(pset: PolicySet, per_request_blocker: str | None = None) -> dict[str, Any]:
    """What ``GET /moe_policies`` answers: how a request picks a policy, the default, and each policy's summary."""
    names = (DEFAULT,) if per_request_blocker else pset.request_names
    policies = []
    for name in names:
        i = pset.index(name)
        src = pset.sources[i]
        policies.append({"name": name, "routes_as": pset.names[i], "file": str(Path(src).resolve()) if src else None,
                         **summary_dict(pset.irs[i])})
    return {"request_field": f"custom_params.{REQUEST_KEY}", "default": pset.names[pset.default],
            "per_request": per_request_blocker is None, "per_request_off_because": per_request_blocker,
            "policies": policies}


def add_listing_route(listing: dict[str, Any]) -> None:
    """Serve ``listing`` at :data:`ROUTE` from SGLang's HTTP app (the launcher process)."""
    from sglang.srt.entrypoints import http_server

    app = http_server.app  # (a second launch in one process replaces the first one's route)
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != ROUTE]

    async def moe_policies() -> dict[str, Any]:
        return listing

    app.add_api_route(ROUTE, moe_policies, methods=["GET"], summary="sgl_budget: the MoE policies requests may pick")
