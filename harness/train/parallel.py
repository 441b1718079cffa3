"""How a run is laid out over torchrun's ranks: FSDP2, mixed precision, activation checkpointing, the teacher.

Every sharded module gets ``fully_shard`` on each transformer block and then on its root (as torchtitan and
the FSDP2 docs order it), with a :class:`MixedPrecisionPolicy` of bf16 parameters for compute and fp32 gradient
reductions over fp32 master weights on CUDA, under bf16 autocast; CPU (gloo) computes in fp32, as the
single-process trainers always did there (FSDP2 itself runs on CPU/gloo in torch 2.13, bf16 included). All of a
block's parameters are gathered in bf16, the norms diffusers keeps in fp32 too.
Activation checkpointing is each diffusers transformer's own per-block ``torch.utils.checkpoint``, so block
names (and checkpoints) are unchanged. The frozen teacher is cast to bf16 and either kept whole on every rank
or sharded like the student. Data: each rank's micro-batches are the global batch's shards
``rank x accumulation + micro``, each with its own seed derived from the run's seed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from harness.distributed import Ranks
from harness.errors import HarnessError
from harness.train.config import EngineConfig
from harness.train.task import Modules


def shard_seed(seed: int, shard: int) -> int:
    """The seed of data shard ``shard``: the run's own for shard 0 (a single process draws what it always drew),
    else 63 bits of sha256 over both."""
    if shard == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}/{shard}".encode()).digest()[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class Layout:
    """The resolved layout of one run, recorded with its checkpoints."""

    ranks: int
    rank: int
    batch_per_rank: int
    accumulation: int
    global_batch: int
    fsdp: bool
    precision: str  # what computes: bf16 (CUDA) or fp32
    activation_checkpointing: bool
    teacher_placement: str
    notes: tuple[str, ...] = field(default=())

    @classmethod
    def resolve(cls, config: EngineConfig, ranks: Ranks, device: torch.device) -> Layout:
        """Check the config against the launch (global batch, FSDP, placement) and settle the precision."""
        global_batch = config.resolved_global_batch(ranks.world_size)
        fsdp = config.fsdp == "on" or (config.fsdp == "auto" and ranks.sharded)
        if ranks.sharded and not fsdp:
            raise HarnessError(f"{ranks.world_size} ranks need FSDP to share the gradients: leave --fsdp at auto or on")
        if config.teacher_placement == "shard" and not fsdp:
            raise HarnessError("a sharded teacher needs FSDP: pass --fsdp on, or run more than one rank")
        notes: list[str] = []
        precision = config.precision
        if precision == "bf16" and device.type != "cuda":
            precision = "fp32"  # as the single-process trainers always computed on CPU
            if fsdp:
                notes.append("bf16 compute is used on CUDA only: on CPU (gloo) FSDP2 computes and reduces in fp32")
        return cls(ranks=ranks.world_size, rank=ranks.rank, batch_per_rank=config.batch_size,
                   accumulation=config.accumulation, global_batch=global_batch, fsdp=fsdp, precision=precision,
                   activation_checkpointing=config.activation_checkpointing,
                   teacher_placement=config.teacher_placement, notes=tuple(notes))  # fmt: skip

    @property
    def shard_count(self) -> int:
        return self.ranks * self.accumulation

    def shards(self) -> list[int]:
        """This rank's data shards, one per micro-batch."""
        return [self.rank * self.accumulation + micro for micro in range(self.accumulation)]

    def record(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if key not in ("rank", "notes")}

    def autocast(self, device: torch.device) -> AbstractContextManager[Any]:
        """bf16 autocast on CUDA when the precision is bf16 (fp32 master weights either way)."""
        enabled = device.type == "cuda" and self.precision == "bf16"
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@contextmanager
def process_group(layout: Layout, device: torch.device) -> Iterator[None]:
    """FSDP in one process outside torchrun (``fsdp="on"``, e.g. to measure its path on one GPU) needs a process
    group of one rank: made here from an in-memory store and removed at the end; nothing otherwise."""
    import torch.distributed as dist

    if not layout.fsdp or dist.is_initialized():
        yield
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                            **({"device_id": device} if device.type == "cuda" else {}))  # fmt: skip
    try:
        yield
    finally:
        dist.destroy_process_group()


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP2 shards one by one (diffusers transformers' ``blocks``); none for other modules."""
    blocks = getattr(module, "blocks", None)
    return list(blocks) if isinstance(blocks, nn.ModuleList) else []


def apply(modules: Modules, layout: Layout, device: torch.device) -> None:
    """Activation checkpointing and FSDP2 on the sharded modules, the teacher's precision and placement."""
    if layout.activation_checkpointing:
        supported = [m for m in modules.sharded.values() if getattr(m, "_supports_gradient_checkpointing", False)]
        if not supported:
            raise HarnessError("activation checkpointing needs a diffusers transformer; this task trains none")
        for module in supported:
            module.enable_gradient_checkpointing()
    for module in modules.frozen.values():
        module.requires_grad_(False)
        if layout.precision == "bf16":
            from harness.models.wan import cast_transformer

            cast_transformer(module, torch.bfloat16)
    if not layout.fsdp:
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    mesh = init_device_mesh(device.type, (layout.ranks,))
    # Inputs are not cast: bf16 autocast (on with bf16) does that per op, and keeps the timestep (its values up to
    # 1000 would round to multiples of 4 in bf16) and RoPE tables in fp32, as the unsharded path computes them.
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
        if layout.precision == "bf16"
        else MixedPrecisionPolicy()
    )
    for module in modules.sharded.values():
        _shard(module, mesh, policy)
    if layout.teacher_placement == "shard":
        for module in modules.frozen.values():
            _shard(module, mesh, MixedPrecisionPolicy())


def _shard(module: nn.Module, mesh: Any, policy: Any) -> None:
    from torch.distributed.fsdp import fully_shard

    for block in transformer_blocks(module):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy)


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor's local part (a DTensor's shard on this rank; a plain tensor itself), sharing storage."""
    return [t.to_local() if is_sharded(t) else t for t in tensors]


def set_gradient_sync(modules: Iterable[nn.Module], enabled: bool) -> None:
    """FSDP2: reduce gradients in this backward (the last micro-batch) or keep accumulating them locally."""
    for module in modules:
        if hasattr(module, "set_requires_gradient_sync"):
            module.set_requires_gradient_sync(enabled)


def average_gradients(params: list[nn.Parameter], layout: Layout) -> None:
    """Average the gradients of replicated (not FSDP-managed) parameters across ranks, in one flat all-reduce.

    A parameter without a gradient on this rank joins with zeros (every rank must send the same buffer).
    """
    if layout.ranks == 1 or not params:
        return
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= layout.ranks
    for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(part.view_as(g))


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale the gradients so that their joint L2 norm is at most ``max_norm``; returns the norm before.

    Without FSDP this is ``torch.nn.utils.clip_grad_norm_`` itself; with sharded (DTensor) gradients, beside
    replicated ones, the sharded part's norm is reduced over the ranks and the scale applied to local shards.
    """
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if is_sharded(g)]
    if not sharded:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    plain = [g for g in grads if not is_sharded(g)]
    squares = torch.nn.utils.get_total_norm(sharded).full_tensor() ** 2
    if plain:
        squares = squares + torch.nn.utils.get_total_norm(plain).to(squares.device) ** 2
    total = squares.sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(local(grads), scale)
    return total


def mean_across_ranks(values: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The mean of ``values`` over the ranks (itself on one rank)."""
    if layout.ranks == 1:
        return values
    import torch.distributed as dist

    values = values.clone()
    dist.all_reduce(values)
    return values / layout.ranks


def peak_gib_per_rank(device: torch.device, layout: Layout) -> list[float] | None:
    """Each rank's peak allocated CUDA memory in GiB since its process started, in rank order (None off CUDA).

    Collective on several ranks: every rank must call it.
    """
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    if layout.ranks == 1:
        return [peak]
    import torch.distributed as dist

    peaks: list[Any] = [None] * layout.ranks
    dist.all_gather_object(peaks, peak)
    return peaks


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's whole state on CPU: gathered from the shards on the lead (empty elsewhere) under FSDP.

    Collective under FSDP: every rank must call it.
    """
    if any(is_sharded(p) for p in module.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {key: value.detach().cpu() for key, value in module.state_dict().items()}
