"""SVG2's key clusters in order of popularity in Triton (:mod:`methods.kernels.popularity_triton`) against the torch
path of :func:`methods.svg2.by_popularity`, and the dispatch there.

The kernel tests need Triton and either CUDA or the Triton interpreter on CPU tensors; elsewhere (CI) they skip::

    TRITON_INTERPRET=1 PYTHONPATH=.:<numpy < 2.4 site>:<triton site> python -m pytest tests/test_popularity_triton.py
"""

from __future__ import annotations

import pytest
import torch
from triton_helpers import DEVICE
from triton_helpers import needs_kernel as triton_needs_kernel

from harness.errors import HarnessError
from methods.kernels import popularity_triton as popularity
from methods.svg2 import by_popularity

needs_kernel = triton_needs_kernel(popularity)


def clusters(groups: int, q_clusters: int, k_clusters: int, tokens: int, density: float,
             generator: torch.Generator) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Random kept pairs ``(G, Cq, Ck)`` at about ``density`` and the labels of ``tokens`` queries and keys drawn
    from a few popular clusters and many rare ones (some empty), with each side's sizes, and the keys' stable order:
    ``keep, q_sizes, k_sizes, k_labels, k_order``."""
    weights = torch.rand(k_clusters, generator=generator) ** 4  # lopsided: ties and empty clusters
    k_labels = torch.multinomial(weights.expand(groups, -1), tokens, replacement=True, generator=generator)
    q_labels = torch.randint(0, q_clusters, (groups, tokens), generator=generator)
    q_sizes = torch.zeros(groups, q_clusters, dtype=torch.int64).scatter_add_(1, q_labels, torch.ones_like(q_labels))
    k_sizes = torch.zeros(groups, k_clusters, dtype=torch.int64).scatter_add_(1, k_labels, torch.ones_like(k_labels))
    keep = torch.rand(groups, q_clusters, k_clusters, generator=generator) < density
    keep[:, :, :3] = True  # three clusters every query cluster keeps: equal popularity, ranked by label
    k_order = k_labels.sort(dim=1, stable=True).indices
    return tuple(t.to(DEVICE) for t in (keep, q_sizes, k_sizes, k_labels, k_order))


@needs_kernel
@pytest.mark.parametrize(
    ("groups", "q_clusters", "k_clusters", "tokens", "density"),
    [(2, 5, 13, 200, 0.3),  # key clusters padded from 13 to 16; interpreted, 4 query clusters a tile
     (3, 20, 64, 700, 0.5),  # a power of two: no padding
     (1, 9, 300, 1500, 0.1),  # many empty key clusters; two tiles of keys moved
     (2, 300, 1000, 5000, 0.3),  # svg2's cluster counts: 19 tiles of query clusters on a GPU
     (1, 3, 2049, 9000, 0.2),  # padded to 4,096 key clusters, the most the kernel ranks
     (2, 4, 1, 50, 1.0)],  # one key cluster
)  # fmt: skip
def test_kernels_give_the_torch_order(groups: int, q_clusters: int, k_clusters: int, tokens: int,
                                      density: float) -> None:  # fmt: skip
    """keep's columns, the sizes, the key order and the kept keys equal the torch path's exactly, ties by label."""
    inputs = clusters(groups, q_clusters, k_clusters, tokens, density, torch.Generator().manual_seed(tokens))
    assert popularity.use_fused(inputs[0], inputs[-1], "triton")
    got = popularity.popularity_order(*inputs)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(popularity.BACKEND_ENV, "torch")
        want = by_popularity(*inputs)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    keep, _, k_sizes, _, _ = inputs
    assert torch.equal(got[3], (keep * k_sizes[:, None, :]).sum(dim=-1))


@needs_kernel
def test_by_popularity_takes_the_kernels_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    """by_popularity runs the op under auto and triton, the torch path under torch."""
    calls = []
    op = popularity.popularity_order
    monkeypatch.setattr(popularity, "popularity_order", lambda *args: calls.append(1) or op(*args))
    inputs = clusters(2, 6, 10, 120, 0.4, torch.Generator().manual_seed(1))
    for backend, runs in (("auto", 1), ("triton", 2), ("torch", 2)):
        monkeypatch.setenv(popularity.BACKEND_ENV, backend)
        by_popularity(*inputs)
        assert len(calls) == runs, backend


@needs_kernel
def test_refusals_name_what_does_not_fit() -> None:
    """Too many key clusters for one program's sort, or keys overflowing its int32 keys, are refused by name."""
    order = torch.zeros(1, 10, dtype=torch.int64, device=DEVICE)
    wide = torch.ones(1, 2, popularity.MAX_CLUSTERS + 1, dtype=torch.bool, device=DEVICE)
    assert "key clusters" in str(popularity.unsupported_reason(wide, order))
    many = torch.zeros(1, 1 << 21, dtype=torch.int64, device=DEVICE)
    assert "overflow" in str(popularity.unsupported_reason(torch.ones(1, 2, 1000, dtype=torch.bool, device=DEVICE),
                                                            many))  # fmt: skip
    with pytest.raises(HarnessError, match="BENCH_POPULARITY_BACKEND=triton"):
        popularity.use_fused(wide, order, "triton")


@needs_kernel
def test_op_passes_opcheck() -> None:
    """The op's schema, fake outputs and AOT dispatch agree with its launches."""
    inputs = clusters(2, 5, 13, 100, 0.3, torch.Generator().manual_seed(2))
    torch.library.opcheck(popularity.popularity_order, inputs)
