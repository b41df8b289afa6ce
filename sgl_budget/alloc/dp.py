"""Exact Alloc-L allocation: a multiple-choice knapsack solved by dynamic programming.

INTERFACE (to be implemented):

    @dataclass(frozen=True)
    class Allocation:
        k: dict[int, int]          # layer -> chosen k
        total: int                 # sum of k
        loss: float                # summed profile loss

    def allocate_dp(loss: dict[int, dict[int, float]], total_budget: int,
                    min_k: int = 1, max_k: int | None = None,
                    fixed: dict[int, int] | None = None) -> Allocation
        # one k per layer in loss (candidate ks are the profile's keys within
        # [min_k, max_k]); fixed layers keep their k and count against the budget;
        # minimise summed loss subject to sum(k) <= total_budget; ties broken
        # deterministically (smaller total, then lexicographically larger k for
        # earlier layers). Raises ValueError with a readable message if infeasible.
"""
