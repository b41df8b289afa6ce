"""Reference routing in plain torch: the specification every backend (Triton, SGLang, HF) must match."""

from .outputs import RouteDetails, RouteOutput
from .mixed import MixedRouter, routed_per_policy
from .router import LayerRouter, compile_routers, stock_route
from .scoring import Conventions, gate_probs, score_experts

__all__ = ["Conventions", "LayerRouter", "MixedRouter", "RouteDetails", "RouteOutput", "compile_routers", "gate_probs", "score_experts",
           "routed_per_policy", "stock_route"]
