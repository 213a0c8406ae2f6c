"""Low-rank factorization: the ``low-rank`` pass (plain and activation-aware truncated SVD).

``factorize`` holds the arithmetic (SVD, rank rules), ``handlers`` the ops it
splits, ``statistics`` the calibration statistics, ``low_rank`` the pass.
"""
from fxopt.passes.lowrank.factorize import allocate_ratio, energy_rank, factor_weight, factors, spectrum
from fxopt.passes.lowrank.low_rank import LowRank

__all__ = ["LowRank", "spectrum", "factors", "factor_weight", "energy_rank", "allocate_ratio"]
