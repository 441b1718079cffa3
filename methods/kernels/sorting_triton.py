"""Sorting int32 keys on chip in Triton: a bitonic network over one program's keys, for kernels that order small
sets (a block of tokens by cluster, a head's clusters by popularity) without a launch of their own.

Used by :mod:`methods.kernels.kmeans_triton` (the counting sort's scatter) and
:mod:`methods.kernels.popularity_triton` (the key clusters' ranking). Nothing here launches: these are ``triton.jit``
functions called from those kernels, checked through them against torch's sorts.
"""

from __future__ import annotations

from methods.kernels import triton_jit

try:
    import triton.language as tl
except ImportError:  # CPU-only installs (CI): the functions are never called
    tl = None


@triton_jit
def _half(n_dims: tl.constexpr, axis: tl.constexpr):
    """Which half of a ``(2,) * n_dims`` hypercube's ``axis`` an element lies in: 0 or 1 int32, shaped to broadcast
    (2 along ``axis``, 1 elsewhere)."""
    return tl.reshape(tl.arange(0, 2), [1] * axis + [2] + [1] * (n_dims - axis - 1))


@triton_jit
def _compare_exchange(h, n_dims: tl.constexpr, axis: tl.constexpr, run_axis: tl.constexpr):
    """One step of :func:`sort_keys` on the hypercube ``h (2,) * n_dims``: each pair along ``axis`` ordered, the
    lower half taking the smaller key, except where the upper half of ``run_axis`` flips it (the descending runs;
    ``run_axis < 0``: none, the last stage). The partner is the pair's sum less the key: one reduction, as tl.sort's
    xor-sum."""
    partner = tl.sum(h, axis=axis, keep_dims=True) - h
    upper = _half(n_dims, axis)
    if run_axis >= 0:
        upper = upper ^ _half(n_dims, run_axis)
    return tl.where(upper == 1, tl.maximum(h, partner), tl.minimum(h, partner))


@triton_jit
def sort_keys(keys, LOG_N: tl.constexpr):
    """``keys (2^LOG_N,)`` int32 in ``[0, 2^30)`` (below 2^30 a pair's sum fits int32), ascending: ``tl.sort``'s
    bitonic network (the keys as a ``(2,) * LOG_N`` hypercube; per stage, runs of 2^stage keys sorted in alternating
    directions, the last stage's one run ascending, by stage steps of compare-exchanges 2^(stage - 1), ..., 1 keys
    apart) with :func:`_compare_exchange`'s partner by a sum: tl.sort's xor-sum has no fast path in the Triton
    interpreter, which reduces it in Python key by key (seconds per 1,024-key block); a sum reduces in numpy."""
    h = tl.reshape(keys, [2] * LOG_N)
    for stage in tl.static_range(1, LOG_N + 1):
        for step in tl.static_range(stage):
            h = _compare_exchange(h, LOG_N, LOG_N - stage + step, LOG_N - 1 - stage)
    return tl.reshape(h, keys.shape)
