"""Block-sparse attention backends: a registry, and the choice of the fastest one that reproduces the output.

Every backend runs a :class:`~methods.kernels.block_sparse.BlockSparsePattern` on q, k, v ``(B, H, N, D)``
and declares what it needs (devices, dtypes, an optional package, the patterns it can run: the pattern kinds it
refuses outright, :data:`~methods.kernels.block_sparse.PatternKind`, and the conditions on a pattern's data), the
way diffusers' ``attention_dispatch`` registers its attention backends:

    masked      SDPA with the pattern's dense token mask: the reference every other backend is checked against
    flex        compiled FlexAttention, Flex's own tile and pipeline choice
    flex-tuned  compiled FlexAttention with explicit Hopper tiles (:func:`tuned_flex_options`)
    flashinfer  FlashInfer's variable-block wrapper: variable-size blocks (SVG2's clusters, its paper's kernel)
                when the pattern carries them, else the pattern's own tiles; block-level patterns only
    flashinfer-bsr  FlashInfer's BSR wrapper (FA3 on Hopper) over square tiles of a block-level pattern, reading q,
                k, v in place where the table is shared by every head
    triton-variable  our Triton kernel over variable-size blocks (SVG2's clusters): each query block's kept key
                tokens gathered by index, planned on the device
    triton-blocks  our Triton kernel over a block-level pattern's square tiles of 16-128 tokens (SLA's 64): each
                query block streams its listed key blocks whole, through tensor descriptors
    flashinfer-split  a token-level pattern's full tiles on the BSR wrapper and its partial tiles on Flex
                (:data:`SMALL_TILE_FLEX_OPTIONS`), merged by their log-sum-exps (svg's band and sink)

``backend`` names accepted by :func:`block_sparse_attention` are the registered ones plus ``auto`` (flex-tuned on
Hopper in fp16/bf16 up to head dim 128, flex on other CUDA calls, masked elsewhere (flex past its size); on Hopper,
calls that need no gradients run variable blocks on triton-variable, eager ones a head-shared tile table on
FlashInfer's BSR wrapper where installed, a head-shared token-level one on flashinfer-split, and other block-level
patterns on triton-blocks: :func:`auto_choice`)
and ``measure`` (:func:`choose_backend`: every available backend once on the call's own inputs, the fastest whose output
matches masked dense within :func:`tolerance`; cached per label, shape, dtype and block sizes for the process).
:class:`BackendLog` records which backend each sequence length ran on.
"""

from __future__ import annotations

import functools
import importlib
import math
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.errors import HarnessError, UnsupportedError
from methods.kernels import needs_gradients
from methods.kernels.attention_states import LOG2_E, merge_attention_states
from methods.kernels.block_list_triton import BLOCK_SIZES, block_list_attention, default_config, pattern_lists
from methods.kernels.block_sparse import (
    FLEX_TILE,
    KIND_DESCRIPTIONS,
    BlockSparsePattern,
    FlexKernelOptions,
    PatternKind,
    block_lengths,
    flex_block_sparse_attention,
    masked_dense_attention,
    num_blocks,
)
from methods.kernels.variable_blocks_triton import default_config as variable_config
from methods.kernels.variable_blocks_triton import variable_block_attention

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, BlockSparsePattern], torch.Tensor]
#: Seconds per call of a thunk (warm-up included by the timer); injectable for tests.
Timer = Callable[[Callable[[], Any], torch.device], float]
ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)

#: Forward options for Hopper (H100/H200): 128 x 128 tiles, 8 warps, 2 stages, TMA loads. Chosen by
#: ``harness.benchmarks.block_sparse_probe_gpu`` on an H200 at Wan 1.3B (reports/gpu/h200/run_95b16d0/probe):
#: against Flex's own choice 6.97 -> 5.42 ms (radial, tile density 0.325), 6.84 -> 5.16 (xattn, 0.344),
#: 5.53 -> 5.32 (svg, token-level, 0.346). ``fwd_`` prefixes leave the backward on Flex's own choice; Flex turns
#: TMA off itself where the inputs cannot use it. All are FlexKernelOptions of torch 2.13.
HOPPER_FLEX_OPTIONS: FlexKernelOptions = {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_warps": 8,  # type: ignore[typeddict-unknown-key]
                                          "fwd_num_stages": 2, "fwd_USE_TMA": True}  # fmt: skip
#: Flex's options on 64 x 64 tiles, 4 warps, 3 stages: for a split pattern's partial tiles (a few per query block),
#: the fastest of ``harness.benchmarks.split_gpu``'s candidates on an H200 at both Wan shapes (svg's partial tiles
#: 0.48 ms at 1.3B, 2.38 at 14B, against 0.57 and 3.52 with the 128 x 128 Hopper options; the split call 1.10x and
#: 1.09x the density-scaled cuDNN time, flex-tuned alone 1.34x and 1.25x: reports/gpu/h200/run_829fb7d/); and in
#: flex-tuned for patterns of 64-token blocks (SLA's), which then run unregrouped (:func:`tuned_flex_options`).
SMALL_TILE_FLEX_OPTIONS: FlexKernelOptions = {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_warps": 4,  # type: ignore[typeddict-unknown-key]
                                              "fwd_num_stages": 3}  # fmt: skip


def dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    """``float16/bfloat16``: dtypes as users write them, for messages and help."""
    return "/".join(str(dtype).removeprefix("torch.") for dtype in dtypes)


@dataclass(frozen=True)
class Backend:
    """One registered backend and what it needs.

    Attributes:
        name: the name users pass (``--param backend=NAME``).
        run: ``(q, k, v, pattern) -> out``, all ``(B, H, N, D)``.
        devices: device types it runs on.
        dtypes: input dtypes it runs on.
        package: module it imports (``None``: torch only).
        distribution: what installs ``package`` (``pip install <distribution>``), named when it is missing.
        refused_kinds: the pattern kinds it never runs, each with why: a method making only these is refused
            before a run (:func:`check_backend`), a pattern of one at its call (:meth:`refusal`).
        refuses: ``pattern -> reason`` when it cannot run a pattern of a kind it takes (tile sizes, index limits:
            conditions on the pattern's data), else ``None``.
        differentiable: its output carries autograd history to q, k and v. A call needing gradients (training
            through the layer) is never run on one that does not (:meth:`gradient_refusal`).
        configuration: ``(q, pattern) -> name`` of the launch configuration a call runs by default (our kernels:
            it depends on the block size, the Triton release and the GPU), recorded beside the backend's name
            (:class:`BackendLog`); ``None`` where there is none to name.
    """

    name: str
    run: AttentionFn
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    package: str | None = None
    distribution: str | None = None
    refused_kinds: Mapping[PatternKind, str] = field(default_factory=dict)
    refuses: Callable[[BlockSparsePattern], str | None] | None = None
    differentiable: bool = True
    configuration: Callable[[torch.Tensor, BlockSparsePattern], str] | None = None

    def gradient_refusal(self, needs_gradients: bool) -> str | None:
        """Why this backend cannot run a call that needs gradients (:func:`needs_gradients`), or ``None``."""
        if self.differentiable or not needs_gradients:
            return None
        return "it computes no gradients (forward only), and this call needs them"

    def unavailable(self, q: torch.Tensor, pattern: BlockSparsePattern) -> str | None:
        """Why this backend cannot run ``pattern`` on ``q`` here (the first reason), or ``None`` when it can."""
        reasons = self.unavailable_on(q.device, q.dtype)
        return reasons[0] if reasons else self.refusal(pattern)

    def refusal(self, pattern: BlockSparsePattern) -> str | None:
        """Why this backend cannot run ``pattern`` (its kind first, then its data), or ``None`` when it can."""
        return self.kind_refusal(pattern.kind) or (None if self.refuses is None else self.refuses(pattern))

    def kind_refusal(self, kind: PatternKind) -> str | None:
        """Why this backend runs no pattern of ``kind`` (``"token-level pattern (partial tiles): ..."``), else
        ``None``."""
        reason = self.refused_kinds.get(kind)
        return None if reason is None else f"{KIND_DESCRIPTIONS[kind]}: {reason}"

    def refuses_all(self, kinds: Collection[PatternKind]) -> list[str]:
        """Why it refuses each of ``kinds`` when it refuses every one (a method making only those can never run on
        it), else empty."""
        reasons = [self.kind_refusal(kind) for kind in kinds]
        return [reason for reason in reasons if reason] if all(reasons) else []

    def unavailable_on(self, device: torch.device, dtype: torch.dtype) -> list[str]:
        """Every reason this backend cannot run on ``device`` in ``dtype``, whatever the pattern (empty: it can).

        The package comes first: a missing install is what a user must fix wherever they run.
        """
        failure = None if self.package is None else package_failure(self.package)
        reasons = [] if failure is None else [f"package {self.package!r} cannot be imported (pip install "
                                                f"{self.distribution}): {failure}"]  # fmt: skip
        if device.type not in self.devices:
            reasons.append(f"runs on {'/'.join(self.devices)}, not {device.type}")
        if dtype not in self.dtypes:
            reasons.append(f"takes {dtype_names(self.dtypes)}, not {dtype_names((dtype,))}")
        return reasons


REGISTRY: dict[str, Backend] = {}


def register_backend(
    name: str,
    devices: tuple[str, ...] = ("cpu", "cuda"),
    dtypes: tuple[torch.dtype, ...] = ALL_DTYPES,
    package: str | None = None,
    distribution: str | None = None,
    refused_kinds: Mapping[PatternKind, str] | None = None,
    refuses: Callable[[BlockSparsePattern], str | None] | None = None,
    differentiable: bool = True,
    configuration: Callable[[torch.Tensor, BlockSparsePattern], str] | None = None,
) -> Callable[[AttentionFn], AttentionFn]:
    """Decorator: register ``fn(q, k, v, pattern)`` as backend ``name`` with its constraints (see :class:`Backend`)."""

    def register(fn: AttentionFn) -> AttentionFn:
        REGISTRY[name] = Backend(name, fn, devices, dtypes, package, distribution or package, dict(refused_kinds or {}),
                                 refuses, differentiable, configuration)  # fmt: skip
        return fn

    return register


@functools.cache
def import_failure(module: str) -> str | None:
    """Why ``import module`` fails (``"ModuleNotFoundError: No module named 'tvm_ffi'"``), ``None`` when it works.

    Cached: an import is tried once per process. Any exception counts, not only ImportError: a broken
    install (a dependency or CUDA library missing) is as absent as a missing package, and its message names
    what is missing.
    """
    try:
        importlib.import_module(module)
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc)[:300]}"
    return None


@torch.compiler.assume_constant_result
def package_failure(module: str) -> str | None:
    """:func:`import_failure`, read by a compiled graph as the constant it is (Dynamo cannot trace an import: the
    check broke svg2's compiled forward into 13 graphs where ``auto`` asked whether triton-variable can run)."""
    return import_failure(module)


def get_backend(name: str) -> Backend:
    """The registered backend ``name``; an unknown name is a :class:`HarnessError` listing the known ones."""
    if name not in REGISTRY:
        raise HarnessError(f"block-sparse backend must be one of {backend_names()}, got {name!r}")
    return REGISTRY[name]


def backend_needs() -> str:
    """Every registered backend with what it needs where it needs more than torch on any device, for ``--help``:
    ``masked, flex, ..., flashinfer-bsr (cuda; float16/bfloat16; pip install flashinfer-python)``."""

    def needs(backend: Backend) -> str:
        parts = [] if set(backend.devices) >= {"cpu", "cuda"} else ["/".join(backend.devices)]
        parts += [] if set(backend.dtypes) >= set(ALL_DTYPES) else [dtype_names(backend.dtypes)]
        parts += [] if backend.package is None else [f"pip install {backend.distribution}"]
        return f"{backend.name} ({'; '.join(parts)})" if parts else backend.name

    return ", ".join(needs(backend) for backend in REGISTRY.values())


def backend_names() -> tuple[str, ...]:
    """What ``backend=`` accepts: ``auto``, ``measure`` and every registered backend."""
    return ("auto", "measure", *REGISTRY)


# -- the backends ---------------------------------------------------------------------------------

#: Largest B x H x N x N the masked backend takes: its dense mask and fp32 scores grow as N^2 (Wan 1.3B 480p:
#: 1.3e10 entries, 52 GB of scores per call), so at Wan scale it is only the sampled-row reference.
MASKED_MAX_ENTRIES = 1 << 31


def _masked_refuses(pattern: BlockSparsePattern) -> str | None:
    entries = math.prod(pattern.batch_heads) * pattern.seq_len**2
    if entries > MASKED_MAX_ENTRIES:
        return f"dense N x N mask of {entries:.2e} entries (> {MASKED_MAX_ENTRIES:.2e}): reference on sampled rows only"
    return None


register_backend("masked", refuses=_masked_refuses)(masked_dense_attention)
register_backend("flex")(flex_block_sparse_attention)


@register_backend("flex-tuned")
def tuned_flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern
                         ) -> torch.Tensor:  # fmt: skip
    """Compiled FlexAttention with :func:`tuned_flex_options` (CPU inductor ignores the GPU tile options)."""
    return flex_block_sparse_attention(q, k, v, pattern, tuned_flex_options(pattern, needs_gradients(q, k, v)))


def tuned_flex_options(pattern: BlockSparsePattern, training: bool) -> FlexKernelOptions:
    """flex-tuned's options for ``pattern``: :data:`SMALL_TILE_FLEX_OPTIONS` where its blocks are multiples of 64
    but not of :data:`~methods.kernels.block_sparse.FLEX_TILE` and the call needs no gradients (the 64-token tiles
    then run as they are, where 128-token ones would compute up to four 64-blocks for each kept one: SLA's critical
    5% of 64-blocks keep up to 1 - 0.95^4 = 19% of 128-tiles), else :data:`HOPPER_FLEX_OPTIONS`."""
    blocks = pattern.blocks
    small = all(side % 64 == 0 for side in blocks) and not all(side % FLEX_TILE == 0 for side in blocks)
    return SMALL_TILE_FLEX_OPTIONS if small and not training else HOPPER_FLEX_OPTIONS


_FLASHINFER_WORKSPACE_BYTES = 128 * 1024 * 1024  # the size FlashInfer's documentation recommends
#: FlashInfer's plans list key indices in int32: the variable wrapper every kept key token of every (head, query
#: block) (flashinfer/sparse.py ``_block_mask_map_to_expanded_indices``), the BSR wrapper every kept key page of
#: every query block (:func:`bsr_pages`). Past this they would wrap.
FLASHINFER_MAX_KV_INDICES = 2**31 - 1


def check_kv_indices(count: int, what: str) -> None:
    """Refuse a FlashInfer plan listing ``count`` key indices (``what``: tokens or pages, one per query block that
    keeps them) past its int32 :data:`FLASHINFER_MAX_KV_INDICES`: a :class:`HarnessError`, before it is built."""
    if count > FLASHINFER_MAX_KV_INDICES:
        raise HarnessError(
            f"FlashInfer's plan would list {count:,} {what} (one per query block), past its int32 "
            f"indices ({FLASHINFER_MAX_KV_INDICES:,}): run fewer heads or a smaller batch per call"
        )


@register_backend("flashinfer", devices=("cuda",), dtypes=HALF_DTYPES, package="flashinfer",
                  distribution="flashinfer-python", differentiable=False,
                  refused_kinds={"token-level": "FlashInfer's wrappers run whole blocks only"})  # fmt: skip
def flashinfer_block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                      pattern: BlockSparsePattern) -> torch.Tensor:  # fmt: skip
    """FlashInfer's ``VariableBlockSparseAttentionWrapper`` over the pattern's blocks. ``(B, H, N, D)`` in and out.

    Variable-size blocks (``pattern.variable``, SVG2's clusters) run as they are; a block-level pattern runs
    its tiles as blocks of :func:`block_lengths` sizes (a ragged last block included). Every (batch, head)
    is one FlashInfer head with its own block table (``num_qo_heads = num_kv_heads = B * H``), q/k/v in the
    wrapper's ``(heads, tokens, head_dim)`` layout. Checked against flashinfer-python 0.6.18.post1's
    ``flashinfer/sparse.py`` (and 0.7.4's, the same for this path): ``plan(block_mask_map (kv_heads, MB, NB)
    bool, block_row_sz (kv_heads, MB), block_col_sz (kv_heads, NB), num_qo_heads, num_kv_heads, head_dim,
    causal=False, ..., sm_scale=None -> 1/sqrt(head_dim), q_data_type, kv_data_type)`` and ``run(q, k, v)``; row
    sizes must sum to N per head (the wrapper's ``qo_indptr`` is their running sum). Its plan expands the
    kept blocks to one int32 index per kept key token per query block, so a call past
    :data:`FLASHINFER_MAX_KV_INDICES` is a :class:`HarnessError`. Equal tiles also go through the variable
    wrapper: ``BlockSparseAttentionWrapper`` takes one BSR table shared by all heads (per-head masks only on its
    SM100/SM120 ``vsa_*`` backends), and the methods' tables differ per head. On Hopper the wrapper's ``auto``
    backend is FA3: its first call JIT-compiles one module per dtype and head_dim (10 nvcc jobs, 10 minutes
    on one CPU core) unless a prebuilt one is in ``flashinfer/data/aot``.

    Raises:
        HarnessError: the plan would need more than :data:`FLASHINFER_MAX_KV_INDICES` key indices.
    """
    import flashinfer

    batch, heads, tokens, dim = q.shape
    if pattern.variable is not None:
        kept, rows, cols = pattern.variable.kept, pattern.variable.row_sizes, pattern.variable.col_sizes
    else:
        q_block, kv_block = pattern.blocks
        kept = pattern.kept
        rows = block_lengths(tokens, q_block, q.device).expand(*kept.shape[:2], -1)
        cols = block_lengths(tokens, kv_block, q.device).expand(*kept.shape[:2], -1)
    groups = batch * heads
    kept = kept.expand(batch, heads, -1, -1).reshape(groups, *kept.shape[-2:])
    rows = rows.expand(batch, heads, -1).reshape(groups, -1).to(torch.int32)
    cols = cols.expand(batch, heads, -1).reshape(groups, -1).to(torch.int32)
    check_kv_indices(int((kept * cols[:, None, :].long()).sum()), "kept key tokens")
    wrapper = flashinfer.sparse.VariableBlockSparseAttentionWrapper(_flashinfer_workspace(q.device))
    wrapper.plan(
        block_mask_map=kept.contiguous(),
        block_row_sz=rows.contiguous(),
        block_col_sz=cols.contiguous(),
        num_qo_heads=groups,
        num_kv_heads=groups,
        head_dim=dim,
        q_data_type=q.dtype,
        kv_data_type=k.dtype,
    )
    out = wrapper.run(*(t.reshape(groups, tokens, dim).contiguous() for t in (q, k, v)))
    return out.reshape(batch, heads, tokens, dim)


@functools.cache
def _flashinfer_workspace(device: torch.device) -> torch.Tensor:
    return torch.empty(_FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device=device)


#: Smallest tile the BSR wrapper runs as attention (flashinfer/sparse.py: ``R * (qo_heads // kv_heads) < 4`` plans
#: the CUDA-core decode kernel, whose batch is ``q.size(0)``: one query per block row).
BSR_MIN_TILE = 4


#: The kinds the BSR wrapper never runs: it computes whole square tiles of one size.
BSR_REFUSED_KINDS: dict[PatternKind, str] = {
    "variable": "FlashInfer's variable-block wrapper (backend flashinfer) runs them",
    "token-level": "the BSR wrapper runs whole tiles only",
}


def _bsr_refuses(pattern: BlockSparsePattern) -> str | None:
    """The BSR wrapper's conditions on a pattern's tiles (its kinds are :data:`BSR_REFUSED_KINDS`), which
    flashinfer-split's full tiles meet too."""
    if pattern.blocks[0] != pattern.blocks[1]:
        return f"query and key blocks differ ({pattern.blocks}): the BSR wrapper's pages are square tiles"
    if pattern.blocks[0] < BSR_MIN_TILE:
        return (f"tiles of {pattern.blocks[0]} tokens: below {BSR_MIN_TILE} FlashInfer's plan switches to its decode "
                "kernel, which takes one query row per block row")  # fmt: skip
    return None


@dataclass(frozen=True)
class BsrPlan:
    """FlashInfer's planned ``BlockSparseAttentionWrapper`` for one pattern, and how the call's tensors map onto it.

    Attributes:
        wrapper: the planned wrapper.
        shared: one table for every head (a head-shared pattern): FlashInfer's own heads over one sequence of N
            tokens, q, k, v read in place. Else the ``B * H`` heads stacked along the token axis as one FlashInfer
            head (head g's query blocks list only head g's keys, so per-head tables share one BSR table).
        tile: query rows per block, FlashInfer's ``R``.
        page: key tokens per page, FlashInfer's ``C``: ``gcd(tile, N)``, so every key tile, the ragged last one
            included, is whole pages and no key is padding.
        padded: query rows per stacked head, N rounded up to whole tiles (N when shared: FlashInfer's last query
            block may be partial, its ``qo_indptr`` ends at M).
    """

    wrapper: Any
    shared: bool
    tile: int
    page: int
    padded: int


def bsr_pages(kept: torch.Tensor, tokens: int, tile: int, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The CSR table of key pages (``indptr (G * MB + 1,)``, ``indices``; int32) that FlashInfer's BSR plan takes for
    ``kept`` ``(G, MB, NB)`` tiles of ``tile`` tokens over G sequences of ``tokens`` keys laid end to end in pages of
    ``page`` tokens (``page`` divides ``tile`` and ``tokens``): query block ``(g, i)`` lists the pages of its kept key
    tiles ``(g, j)``, ``len_j / page`` pages from token ``g * tokens + j * tile``.

    Raises:
        HarnessError: more pages than FlashInfer's int32 indices hold (:func:`check_kv_indices`).
    """
    per_tile = block_lengths(tokens, tile, kept.device) // page
    per_row = (kept * per_tile).sum(-1).reshape(-1)
    total = int(per_row.sum())
    check_kv_indices(total, "kept key pages")
    group, _, column = kept.nonzero(as_tuple=True)  # row-major: CSR order
    counts = per_tile[column]
    first = (group * tokens + column * tile) // page
    within = torch.arange(total, device=kept.device) - (counts.cumsum(0) - counts).repeat_interleave(
        counts, output_size=total
    )
    indptr = torch.zeros(len(per_row) + 1, dtype=torch.int32, device=kept.device)
    indptr[1:] = per_row.cumsum(0)
    return indptr, (first.repeat_interleave(counts, output_size=total) + within).to(torch.int32)


def bsr_plan(pattern: BlockSparsePattern, batch: int, heads: int, head_dim: int, dtype: torch.dtype,
             device: torch.device, shared: bool) -> BsrPlan:  # fmt: skip
    """The pattern's :class:`BsrPlan` for q ``(batch, heads, N, head_dim)``, ``shared`` (FlashInfer's heads; the
    pattern's table must be ``(1, 1, MB, NB)``) or stacked, planned once and kept with the pattern
    (:attr:`BlockSparsePattern.backend_plans`). Follows flashinfer-python 0.6.18.post1's ``flashinfer/sparse.py``:
    ``plan(indptr (MB + 1,), indices (nnz,), M, N, R, C, num_qo_heads, num_kv_heads, head_dim, ...)``, block rows
    ``indptr`` and page ``indices`` in CSR order (:func:`bsr_pages`), ``qo_indptr = R * arange(MB + 1)`` with its
    last entry set to M, every page whole (``last_page_len = C``); ``run`` reshapes k and v into pages of C tokens."""
    import flashinfer

    key = ("flashinfer-bsr", shared, 1 if shared else batch, heads, head_dim, dtype, device)  # shared: any batch
    if key in pattern.backend_plans:
        return pattern.backend_plans[key]
    tile, tokens = pattern.blocks[0], pattern.seq_len
    page, blocks = math.gcd(tile, tokens), num_blocks(tokens, tile)
    if shared:
        kept, padded, sequences, fi_heads = pattern.kept.to(device)[0], tokens, 1, heads
    else:
        kept = pattern.kept.to(device).expand(batch, heads, -1, -1).reshape(batch * heads, blocks, blocks)
        padded, sequences, fi_heads = blocks * tile, batch * heads, 1
    indptr, indices = bsr_pages(kept, tokens, tile, page)
    wrapper = flashinfer.sparse.BlockSparseAttentionWrapper(_flashinfer_workspace(device))
    wrapper.plan(indptr, indices, sequences * padded, sequences * tokens, tile, page, fi_heads, fi_heads, head_dim,
                 q_data_type=dtype, kv_data_type=dtype, o_data_type=dtype)  # fmt: skip
    plan = BsrPlan(wrapper, shared, tile, page, padded)
    pattern.backend_plans[key] = plan
    return plan


def reads_in_place(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether FlashInfer's FA3 kernel can read q, k, v ``(B, H, N, D)`` in place as one ``(N, H, D)`` view per
    batch item (flashinfer/data/csrc/batch_prefill_sm90.cu takes every stride from the tensors): unit stride along
    D; every other stride and each start on 16 bytes (q is loaded by TMA, k and v by 16-byte ``cp.async``); k and v
    with the same strides (its sparse mainloop computes one offset for both and checks their page and token
    strides equal). Both the processor's layout (``(B, N, H, D)`` projections seen as ``(B, H, N, D)``) and a
    contiguous ``(B, H, N, D)`` qualify."""
    if k.stride() != v.stride():
        return False
    for x in (q, k, v):
        align = 16 // x.element_size()
        if x.stride(-1) != 1 or any(stride % align for stride in x.stride()[:-1]) or x.data_ptr() % 16:
            return False
    return True


@register_backend("flashinfer-bsr", devices=("cuda",), dtypes=HALF_DTYPES, package="flashinfer",
                  distribution="flashinfer-python", refused_kinds=BSR_REFUSED_KINDS, refuses=_bsr_refuses,
                  differentiable=False)  # fmt: skip
def flashinfer_bsr_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern
                             ) -> torch.Tensor:  # fmt: skip
    """FlashInfer's ``BlockSparseAttentionWrapper`` (BSR; FA3 on Hopper) over a block-level pattern of square tiles.
    ``(B, H, N, D)`` in and out.

    Keys are paged in ``gcd(tile, N)`` tokens (:class:`BsrPlan`): every key tile, a ragged last one included, is
    whole pages, so no key is padding and nothing is corrected afterwards (Wan 1.3B: N = 32,760, 128-token tiles,
    8-token pages; the kernel gathers keys token by token through the page table whatever the page size,
    flashinfer/data/include/flashinfer/attention/hopper/sparse_mainloop.cuh).

    - A head-shared pattern (``kept`` ``(1, 1, MB, NB)``, radial's) on inputs :func:`reads_in_place` accepts runs
      with FlashInfer's own heads: per batch item one call (the same plan) on ``(N, H, D)`` views of q, k and v,
      written into one ``(B, N, H, D)`` output whose ``(B, H, N, D)`` view is returned: no copy in or out.
    - Otherwise (per-head tables: xattn, svg; or strides FlashInfer cannot read) the ``B * H`` heads are stacked
      along the token axis as one FlashInfer head: q is copied into whole tiles per head (the padding rows are
      left unset: each is a query row of its own whose output is dropped), k and v are reshaped to ``(B * H * N,
      1, D)`` (a view where ``(B, H, N, D)`` is contiguous, else one copy each).

    Raises:
        HarnessError: the page table would need more than :data:`FLASHINFER_MAX_KV_INDICES` indices.
    """
    return bsr_attention(q, k, v, pattern, return_lse=False)[0]


def bsr_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern,
                  return_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """:func:`flashinfer_bsr_attention`'s output and, with ``return_lse``, each query row's log-sum-exp of its
    scaled scores ``(B, H, N)`` fp32 in base 2 (FlashInfer's convention: ``log2(e) m + log2(d)``), else ``None``."""
    batch, heads, tokens, dim = q.shape
    if pattern.kept.shape[:2] == (1, 1) and reads_in_place(q, k, v):
        plan = bsr_plan(pattern, batch, heads, dim, q.dtype, q.device, shared=True)
        out = q.new_empty(batch, tokens, heads, dim)
        lse = q.new_empty(batch, tokens, heads, dtype=torch.float32) if return_lse else None
        for item in range(batch):
            plan.wrapper.run(*(x.transpose(1, 2)[item] for x in (q, k, v)), out=out[item],
                             **({"lse": lse[item], "return_lse": True} if return_lse else {}))  # fmt: skip
        return out.transpose(1, 2), None if lse is None else lse.transpose(1, 2)
    plan = bsr_plan(pattern, batch, heads, dim, q.dtype, q.device, shared=False)
    groups = batch * heads
    if plan.padded == tokens:
        queries = q.reshape(groups * tokens, 1, dim)
    else:
        queries = q.new_empty(batch, heads, plan.padded, dim)  # padding rows unset: each its own softmax, dropped
        queries[:, :, :tokens] = q
        queries = queries.view(groups * plan.padded, 1, dim)
    keys, values = (x.reshape(groups * tokens, 1, dim) for x in (k, v))
    out, lse = plan.wrapper.run(queries, keys, values, return_lse=True) if return_lse else (
        plan.wrapper.run(queries, keys, values), None)  # fmt: skip
    out = out.view(batch, heads, plan.padded, dim)[:, :, :tokens]
    return out, None if lse is None else lse.view(batch, heads, plan.padded)[:, :, :tokens]


def split_patterns(pattern: BlockSparsePattern) -> tuple[BlockSparsePattern | None, BlockSparsePattern]:
    """A token-level pattern as two over disjoint entries: its full tiles, block level (``None`` when it has none:
    FlashInfer's plan takes no empty table), and its partial tiles, token level under its ``mask_mod``; built once
    (one host read, whether any tile is full) and kept with the pattern, with what each backend plans for them."""
    key = ("split",)
    if key not in pattern.backend_plans:
        partial, full = pattern.partial_tiles, pattern.full_tiles
        whole = BlockSparsePattern(full, pattern.seq_len, pattern.block_size) if bool(full.any()) else None
        cut = BlockSparsePattern(partial, pattern.seq_len, pattern.block_size, full=torch.zeros_like(partial),
                                 mask_mod=pattern.mask_mod)  # fmt: skip
        pattern.backend_plans[key] = (whole, cut)
    return pattern.backend_plans[key]


@register_backend("flashinfer-split", devices=("cuda",), dtypes=HALF_DTYPES, package="flashinfer",
                  distribution="flashinfer-python", refuses=_bsr_refuses, differentiable=False,
                  refused_kinds={"variable": BSR_REFUSED_KINDS["variable"],
                                 "tiles": "no partial tile to split off: flashinfer-bsr runs it whole"})  # fmt: skip
def flashinfer_split_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern,
                               partial_options: FlexKernelOptions | None = SMALL_TILE_FLEX_OPTIONS
                               ) -> torch.Tensor:  # fmt: skip
    """A token-level pattern in two parts over disjoint keys of each row (:func:`split_patterns`): its full tiles on
    FlashInfer's BSR wrapper (:func:`bsr_attention`, FA3 on Hopper; a head-shared table read in place, as svg's band
    after its layout transform), its partial tiles (the band's diagonal edges, a ragged sink) on Flex with
    ``partial_options`` (:data:`SMALL_TILE_FLEX_OPTIONS`; ``None``: Flex's own choice) under the mask_mod, merged by
    their log-sum-exps (:func:`~methods.kernels.attention_states.merge_attention_states`). The same output as one masked
    softmax over the union; a pattern without a full tile runs on Flex alone. ``(B, H, N, D)`` in and out."""
    whole, cut = split_patterns(pattern)
    if whole is None:
        return flex_block_sparse_attention(q, k, v, cut, partial_options)
    out_whole, lse_whole = bsr_attention(q, k, v, whole, return_lse=True)
    out_cut, lse_cut = flex_block_sparse_attention(q, k, v, cut, partial_options, return_lse=True)
    return merge_attention_states(out_whole, lse_whole, out_cut, lse_cut * LOG2_E)


@register_backend("triton-variable", devices=("cuda",), dtypes=HALF_DTYPES, package="triton", differentiable=False,
                  refused_kinds={kind: "it runs variable-size blocks (SVG2's clusters) only"
                                 for kind in ("tiles", "token-level")},
                  configuration=lambda q, pattern: variable_config().name)  # fmt: skip
def triton_variable_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern
                              ) -> torch.Tensor:  # fmt: skip
    """Our Triton kernel over the pattern's variable-size blocks
    (:func:`methods.kernels.variable_blocks_triton.variable_block_attention`): per query block the key tiles holding
    its kept keys, read whole and masked, and the kept keys of sparse tiles gathered by index, with no host plan.
    ``(B, H, N, D)`` in and out."""
    return variable_block_attention(q, k, v, pattern.variable)


def _blocks_refuses(pattern: BlockSparsePattern) -> str | None:
    """triton-blocks' conditions on a block-level pattern: square tiles of a size its kernel takes."""
    q_block, kv_block = pattern.blocks
    if q_block != kv_block:
        return f"query and key blocks differ ({pattern.blocks}): it lists square blocks"
    if q_block not in BLOCK_SIZES:
        return f"tiles of {q_block} tokens: it takes {', '.join(map(str, BLOCK_SIZES))}"
    return None


@register_backend("triton-blocks", devices=("cuda",), dtypes=HALF_DTYPES, package="triton", differentiable=False,
                  refuses=_blocks_refuses,
                  refused_kinds={"variable": "triton-variable runs them",
                                 "token-level": "it computes whole tiles only"},
                  configuration=lambda q, pattern: default_config(pattern.blocks[0], q.device).name)  # fmt: skip
def triton_blocks_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern
                            ) -> torch.Tensor:  # fmt: skip
    """Our Triton kernel over a block-level pattern's kept tiles
    (:func:`methods.kernels.block_list_triton.block_list_attention`): each query block streams its listed key
    blocks (:func:`~methods.kernels.block_list_triton.pattern_lists`: the method's own, or the table's, kept with
    the pattern). ``(B, H, N, D)`` in and out."""
    lists, counts = pattern_lists(pattern)
    return block_list_attention(q, k, v, lists, counts, pattern.blocks[0])


# -- choosing by measurement ------------------------------------------------------------------------


def tolerance(dtype: torch.dtype) -> float:
    """Largest relative error (Frobenius, against masked dense in fp32) a backend's output may have.

    2e-2 for 16-bit inputs (bf16's 8-bit mantissa over a softmax of thousands of keys), 1e-4 in fp32/fp64.
    """
    return 2e-2 if dtype in HALF_DTYPES else 1e-4


def default_timer(fn: Callable[[], Any], device: torch.device, warmup: int = 2, repeats: int = 5) -> float:
    """Seconds per call of ``fn``, median of ``repeats`` after ``warmup`` calls: CUDA events on GPU,
    ``time.perf_counter`` elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return sorted(times)[len(times) // 2]


@dataclass(frozen=True)
class BackendChoice:
    """The backend a call runs on and, when it was measured, every candidate's outcome.

    ``report`` maps each candidate to ``{"error": relative error, "ms": time}`` or ``{"skipped": reason}``
    (and the error when the output differed); empty when the backend was named, not measured.
    """

    name: str
    report: dict[str, dict[str, Any]] = field(default_factory=dict)


#: Query rows the reference is computed on: all of them up to this many, else this many evenly spaced
#: (Wan 14B 720p: 40 heads x 1,024 rows x 75,600 keys is 12 GB of fp32 scores instead of 914 GB).
REFERENCE_ROWS = 1024


def reference_rows(tokens: int, device: torch.device) -> torch.Tensor:
    """The query rows :func:`choose_backend` checks: every row, or :data:`REFERENCE_ROWS` evenly spaced."""
    if tokens <= REFERENCE_ROWS:
        return torch.arange(tokens, device=device)
    return torch.linspace(0, tokens - 1, REFERENCE_ROWS, device=device).round().long()


def masked_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern,
                     rows: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Masked dense attention in fp32 for the query ``rows`` only: ``(B, H, len(rows), D)``."""
    return torch.nn.functional.scaled_dot_product_attention(
        q[..., rows, :].float(), k.float(), v.float(), attn_mask=pattern.dense_mask(rows)
    )


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` of a backend's output against the fp32 reference (NaN where out is not finite)."""
    return float((out.float() - ref).norm() / ref.norm().clamp(min=1e-30))


def choose_backend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: BlockSparsePattern,
    candidates: tuple[str, ...] | None = None,
    timer: Timer = default_timer,
) -> BackendChoice:
    """The fastest candidate whose output matches masked dense, with every candidate's error and time.

    Each available candidate runs once on these inputs; those within :func:`tolerance` of masked dense
    (in fp32, on :func:`reference_rows`) are timed with ``timer`` and the fastest wins. Unavailable ones (device, dtype,
    package, pattern) and failing ones are reported as skipped with the reason. ``candidates``: ``None``
    means every registered backend. Raises :class:`HarnessError` for an unknown name or when none matches.
    """
    names = tuple(REGISTRY) if candidates is None else candidates
    backends = [get_backend(name) for name in names]
    training = needs_gradients(q, k, v)
    with torch.no_grad():
        rows = reference_rows(q.shape[-2], q.device)
        reference = masked_reference(q, k, v, pattern, rows)
        report: dict[str, dict[str, Any]] = {}
        timed: dict[str, float] = {}
        for backend in backends:
            reason = backend.unavailable(q, pattern) or backend.gradient_refusal(training)
            if reason is not None:
                report[backend.name] = {"skipped": reason}
                continue
            try:
                error = relative_error(backend.run(q, k, v, pattern)[..., rows, :], reference)
            except Exception as exc:  # a kernel that cannot run these inputs is reported, not fatal
                report[backend.name] = {"skipped": f"failed: {type(exc).__name__}: {str(exc)[:200]}"}
                continue
            if not math.isfinite(error):  # records are strict JSON: no NaN
                report[backend.name] = {"skipped": "output not finite"}
                continue
            if error > tolerance(q.dtype):
                report[backend.name] = {
                    "error": error,
                    "skipped": f"output differs from masked dense > {tolerance(q.dtype)}",
                }
                continue
            seconds = timer(functools.partial(backend.run, q, k, v, pattern), q.device)
            timed[backend.name] = seconds
            report[backend.name] = {"error": error, "ms": seconds * 1e3}
    if not timed:
        raise HarnessError(f"no block-sparse backend reproduced masked dense: {report}")
    return BackendChoice(min(timed, key=timed.__getitem__), report)


_CHOICES: dict[tuple[Any, ...], BackendChoice] = {}


def measured_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern,
                     label: str = "") -> BackendChoice:  # fmt: skip
    """:func:`choose_backend` once per (label, shape, dtype, device, block sizes, pattern kind, whether the call needs
    gradients) per process: a backend chosen on whole tiles is not reused for a token-level pattern of the same
    shape, which it may refuse, nor a forward-only one for a call that trains."""
    key = (label, tuple(q.shape), q.dtype, q.device.type, pattern.blocks, pattern.kind, needs_gradients(q, k, v))
    if key not in _CHOICES:
        _CHOICES[key] = choose_backend(q, k, v, pattern)
    return _CHOICES[key]


@functools.cache
def auto_backend(device: torch.device, dtype: torch.dtype = torch.bfloat16, head_dim: int = 128) -> str:
    """What ``backend=auto`` runs for q of ``dtype`` and ``head_dim`` on ``device``: flex-tuned where
    :data:`HOPPER_FLEX_OPTIONS` were measured (Hopper, compute capability 9.x; fp16/bf16; head dim <= 128: in fp32
    its 128 x 128 tiles in two stages would need more shared memory than an SM has), Flex's own choice on other
    CUDA calls, masked dense elsewhere. FlexAttention either way, so a compiled model captures it in its graph."""
    if device.type != "cuda":
        return "masked"
    measured = dtype in HALF_DTYPES and head_dim <= 128
    return "flex-tuned" if measured and torch.cuda.get_device_capability(device)[0] == 9 else "flex"


def auto_flashinfer(pattern: BlockSparsePattern) -> str | None:
    """The FlashInfer wrapper ``auto`` takes for ``pattern`` in an eager call on Hopper, or ``None`` (our kernels or
    Flex, :func:`auto_choice`).

    Measured on one H200 at Wan 1.3B (bf16; reports/gpu/h200/run_9dca079/sparse/ per call, run_9dca079/latency/ and
    run_982dd84/latency/ per forward, each against its own run's cuDNN): a table shared by every head (radial's,
    planned once and read in place) on the BSR wrapper, 3.76 against flex-tuned's 5.43 ms a call, a forward 1.55x
    cuDNN against 1.42x. Per-head tiles (xattn's, a new table every call) were faster per call on BSR (4.08 against
    5.29 ms) but not in the forward (1.22x against 1.28x: each call plans on the host and stacks the heads), so they
    stay off it (on triton-blocks since). A token-level pattern with a head-shared table (svg's band and sink, after
    its per-head layout transform) goes to flashinfer-split: its full tiles on the BSR wrapper, planned once, the
    partial ones on Flex.
    Variable blocks go to triton-variable (:func:`auto_choice`), faster than FlashInfer's variable-block wrapper
    (run_f81020f/variable_blocks/)."""
    if pattern.batch_heads != (1, 1):
        return None
    return {"tiles": "flashinfer-bsr", "token-level": "flashinfer-split"}.get(pattern.kind)


@functools.cache
def flashinfer_prebuilt() -> bool:
    """Whether FlashInfer's kernels come prebuilt (``flashinfer-jit-cache`` installed, or modules in its
    ``data/aot``): without them its first call per dtype and head dim JIT-compiles for minutes, and fails where no
    CUDA compiler is installed (``import flashinfer`` works either way)."""
    if import_failure("flashinfer_jit_cache") is None:
        return True
    if import_failure("flashinfer") is not None:
        return False
    import flashinfer

    aot = Path(flashinfer.__file__).parent / "data" / "aot"
    return aot.is_dir() and any(aot.rglob("*.so"))


def auto_choice(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern,
                compiled: bool | None = None) -> str:  # fmt: skip
    """What ``backend=auto`` runs for this call where :func:`auto_backend` is flex-tuned (Hopper, fp16/bf16; else
    that base choice, masked on the CPU but flex where masked refuses the pattern's size), in this order, for a call
    that needs no gradients (our kernels and FlashInfer's compute none; a call that needs them takes the base):

    - variable blocks (SVG2's clusters) on triton-variable, eager or compiled (one opaque op): on an H200 at density
      0.295, 7.38 ms a call at Wan 1.3B against 15.29 on flex-tuned, 101.9 against 247.1 at 14B
      (reports/gpu/h200/run_ec88077/); its gathered keys alone took 9.24 ms against 13.93 on FlashInfer's
      variable-block wrapper, 124.0 against 137.2 at 14B (run_998d57e/variable_blocks/);
    - in an eager call, :func:`auto_flashinfer`'s wrapper where its kernels are prebuilt (:func:`flashinfer_prebuilt`:
      no JIT compile inside a run) and it can run this pattern (its plan and run are host code a compiled graph
      cannot trace);
    - a block-level pattern triton-blocks takes on triton-blocks, eager or compiled (one opaque op): on an H200 at
      Wan 1.3B / 14B, SLA's 64-token critical blocks 1.46x / 1.30x their ideal (density x the cuDNN call; 1.32x /
      1.31x back to back) against flex-tuned's 3.06x / 2.27x (reports/gpu/h200/run_ea3d5fb/); random 128-token
      tables at density 0.3 1.01x / 1.03x the density-scaled cuDNN call under the warp-specialised schedule against
      flex-tuned's 1.41x / 1.32x (run_62c9eb5/block_list/); radial's tables 1.11x / 1.07x their ideal, xattn's
      1.01x / 1.02x (run_3e31586/call6/sparse/; 1.38x and 1.35x at 1.3B before, run_d6d37b9/call3/sparse/).
      FlashInfer's BSR wrapper, preferred above for radial's head-shared table in eager, ran radial at 1.04x in
      earlier sessions (not measured against this schedule: FlashInfer not carried);
    - the base choice.

    ``compiled`` asks for the compiled choice (``True``) or the eager one (``False``) whatever the context (``None``:
    the context's)."""
    base = auto_backend(q.device, q.dtype, q.shape[-1])
    if base == "masked" and get_backend(base).refusal(pattern):
        return "flex"  # a dense N x N mask past its size (a Wan-scale call on the CPU): Flex takes every pattern
    if base != "flex-tuned" or needs_gradients(q, k, v):
        return base
    if not (torch.compiler.is_compiling() if compiled is None else compiled):
        preferred = auto_flashinfer(pattern)
        if preferred is not None and not get_backend(preferred).unavailable(q, pattern) and flashinfer_prebuilt():
            return preferred
    ours = {"variable": "triton-variable", "tiles": "triton-blocks"}.get(pattern.kind)
    return base if ours is None or get_backend(ours).unavailable(q, pattern) else ours


def select_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern,
                   backend: str = "auto", label: str = "") -> BackendChoice:  # fmt: skip
    """The backend ``backend`` names for this call: ``auto`` is :func:`auto_choice`, ``measure``
    is :func:`measured_backend`, any other name must be registered and able to run this call (else
    :class:`HarnessError` saying why)."""
    if backend == "measure":
        return measured_backend(q, k, v, pattern, label)
    if backend == "auto":
        return BackendChoice(auto_choice(q, k, v, pattern))
    named = get_backend(backend)
    reason = named.unavailable(q, pattern) or named.gradient_refusal(needs_gradients(q, k, v))
    if reason is not None:
        raise HarnessError(f"block-sparse backend {backend!r} cannot run this call: {reason}")
    return BackendChoice(backend)


def check_backend(name: str, device: torch.device, dtype: torch.dtype, label: str,
                  kinds: Collection[PatternKind]) -> None:  # fmt: skip
    """Refuse ``backend=name`` for a method (``label``) whose patterns are of ``kinds`` where it can run none of them:
    not on ``device`` in ``dtype`` (a missing package included), or refusing every one of those kinds. A run's
    preflight, before a model is built: an :class:`~harness.errors.UnsupportedError` starting with ``label``, with
    every reason and the backends that can run the method here. ``auto`` and ``measure`` always pass: neither picks
    a backend that refuses a pattern's kind (auto runs masked or Flex, which take every kind, or triton-variable or a
    FlashInfer wrapper only on a pattern it can run; measure skips any backend refusing the call's pattern).
    Conditions on a pattern's data (tile sizes, index limits) are checked at the call."""
    if name in ("auto", "measure"):
        return
    backend = get_backend(name)
    kind_reasons, device_reasons = backend.refuses_all(kinds), backend.unavailable_on(device, dtype)
    if kind_reasons or device_reasons:
        usable = [other.name for other in REGISTRY.values()
                  if not other.refuses_all(kinds) and not other.unavailable_on(device, dtype)]  # fmt: skip
        patterns = f" {label}'s {'/'.join(sorted(kinds))} patterns" if kind_reasons else ""
        where = f" on {device.type} in {dtype_names((dtype,))}" if device_reasons else ""
        raise UnsupportedError(f"{label}: block-sparse backend {name!r} cannot run{patterns}{where}: "
                               f"{'; '.join(kind_reasons + device_reasons)}. Here use "
                               f"{', '.join(['auto', 'measure', *usable])}")  # fmt: skip


def _check_fits(q: torch.Tensor, pattern: BlockSparsePattern) -> None:
    """A HarnessError unless ``pattern`` fits q ``(B, H, N, D)``; its deferred tables stay unbuilt (only a backend
    that reads them builds them)."""
    if q.shape[-2] != pattern.seq_len or pattern.batch_heads not in ((1, 1), tuple(q.shape[:2])):
        raise HarnessError(
            f"pattern for {pattern.seq_len} tokens and (B, H) = {pattern.batch_heads} "
            f"does not fit q of shape {tuple(q.shape)}"
        )


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern,
                           backend: str = "auto", label: str = "") -> torch.Tensor:  # fmt: skip
    """Attention restricted to ``pattern``: ``(B, H, N, D)`` in, ``(B, H, N, D)`` out, on the backend
    :func:`select_backend` gives (``label`` keys the ``measure`` cache, e.g. the method's name)."""
    _check_fits(q, pattern)
    return get_backend(select_backend(q, k, v, pattern, backend, label).name).run(q, k, v, pattern)


class BackendLog:
    """Runs a method's block-sparse calls on its ``backend`` setting and records the backend per sequence length.

    ``params()`` gives ``backend_used`` ``{tokens: name}``, for our kernels ``backend_config`` ``{tokens: launch
    configuration}`` (:attr:`Backend.configuration`: on triton-blocks' 128-token blocks the warp-specialised
    ``1x4x2tw`` or ``1x8x3t`` by Triton release and GPU) and, for measured choices, ``backend_report``
    ``{tokens: {backend: {"error", "ms"} or {"skipped"}}}``; where ``auto`` runs another backend under
    ``torch.compile`` than eagerly (FlashInfer eagerly, Flex compiled), ``backend_used_compiled`` names it: what run
    records and ``bench latency`` carry. Eager calls record; a compiled call changes nothing here (a change would be
    guarded by its graph and recompile it).
    """

    def __init__(self, backend: str, label: str) -> None:
        if backend not in backend_names():
            raise HarnessError(f"block-sparse backend must be one of {backend_names()}, got {backend!r}")
        self.backend, self.label = backend, label
        self._used: dict[int, BackendChoice] = {}
        self._compiled: dict[int, str] = {}
        self._configs: dict[int, str] = {}

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern
                  ) -> torch.Tensor:  # fmt: skip
        _check_fits(q, pattern)
        choice = select_backend(q, k, v, pattern, self.backend, self.label)
        if not torch.compiler.is_compiling():
            tokens = q.shape[-2]
            self._used[tokens] = choice
            configuration = get_backend(choice.name).configuration
            if configuration is None:
                self._configs.pop(tokens, None)
            else:
                self._configs[tokens] = configuration(q, pattern)
            if self.backend == "auto":
                self._compiled[tokens] = auto_choice(q, k, v, pattern, compiled=True)
        return get_backend(choice.name).run(q, k, v, pattern)

    def params(self) -> dict[str, Any]:
        used = sorted(self._used.items())
        out: dict[str, Any] = {"backend_used": {str(tokens): choice.name for tokens, choice in used}}
        if self._configs:
            out["backend_config"] = {str(tokens): name for tokens, name in sorted(self._configs.items())}
        reports = {str(tokens): choice.report for tokens, choice in used if choice.report}
        if reports:
            out["backend_report"] = reports
        compiled = {
            str(tokens): name for tokens, name in sorted(self._compiled.items()) if name != self._used[tokens].name
        }
        if compiled:
            out["backend_used_compiled"] = compiled
        return out
