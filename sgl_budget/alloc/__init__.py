"""Alloc-L: sensitivity profiles (YAML) and the exact per-layer k allocation (DP)."""

from .dp import Allocation, allocate_dp
from .profile import Profile, ProfileError, load_profile, save_profile, synthetic_profile

__all__ = ["Allocation", "Profile", "ProfileError", "allocate_dp", "load_profile", "save_profile",
           "synthetic_profile"]
