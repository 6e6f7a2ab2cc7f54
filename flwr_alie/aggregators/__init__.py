"""Robust aggregation functions in torch, on a matrix of updates: no Flower import.

Each takes ``x`` of shape ``(n, d)`` (one row per client update), any floating dtype
on any device, and returns its result in the dtype and on the device of ``x``;
float16 and bfloat16 are computed in float32 throughout and cast back once. No
argument is ever modified. A row that holds NaN or inf, or values whose squares
overflow the accumulation dtype, makes each of them raise ``ValueError`` naming
the row (checked on what they compute anyway, at no extra read): the strategies
of :mod:`flwr_alie.defenses` set such updates aside before they get here.

- :func:`centered_clipping` (Karimireddy, He and Jaggi, ICML 2021)
- :func:`geometric_median` (smoothed Weiszfeld; Pillutla, Kakade and Harchaoui,
  IEEE TSP 2022)
- :func:`nearest_neighbor_mixing` (Allouah et al., AISTATS 2023)
- :func:`bucketing` (Karimireddy, He and Jaggi, ICLR 2022)
"""

from flwr_alie.aggregators.bucketing import bucket_permutation, bucketing
from flwr_alie.aggregators.clipping import centered_clipping
from flwr_alie.aggregators.geomed import geometric_median
from flwr_alie.aggregators.nnm import nearest_neighbor_mixing, pairwise_sq_distances

__all__ = [
    "bucket_permutation",
    "bucketing",
    "centered_clipping",
    "geometric_median",
    "nearest_neighbor_mixing",
    "pairwise_sq_distances",
]
