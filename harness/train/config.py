"""The engine's settings, which every trained method's config carries (the config is the experiment).

A task's config subclasses :class:`EngineConfig` and adds its own fields, so that one frozen dataclass is the
whole experiment; it is recorded with every checkpoint and in the finished record. ``batch_size`` is per rank
and per micro-batch: the global batch is ``batch_size x ranks x accumulation`` (the paper's Wan 1.3B setting,
48 on 8 GPUs, is ``--batch-size 1 --accumulation 6`` or ``--batch-size 6``; ``global_batch`` names it and the
engine checks it against the launch).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from harness.errors import HarnessError, check_choice, check_number

FSDP_MODES = ("auto", "on", "off")  # auto: FSDP2 whenever torchrun starts more than one rank
PRECISIONS = ("bf16", "fp32")
TEACHER_PLACEMENTS = ("replicate", "shard")
# How a run is laid out over ranks, not what it computes: a checkpoint resumes under another layout of the same
# global batch (a 2-rank run of batch b on 1 rank with accumulation 2), so these are left out of its identity.
LAYOUT_FIELDS = ("batch_size", "accumulation", "global_batch", "fsdp", "activation_checkpointing",
                 "teacher_placement", "log_every", "checkpoint_every")  # fmt: skip


@dataclass(frozen=True)
class EngineConfig:
    """The loop and its layout over ranks; a task's config adds learning rates and its own settings."""

    steps: int = 400
    batch_size: int = 8  # per rank and per micro-batch
    accumulation: int = 1  # micro-batches per rank and optimizer step
    global_batch: int = 0  # 0: whatever batch_size x ranks x accumulation gives; else it must equal that
    grad_clip: float = 1.0  # max gradient norm of each clip group
    checkpoint_every: int = 100
    log_every: int = 25  # steps between log lines
    sync_every: int = 1  # steps between host reads of the loss (the NaN check); checkpoints fall on them
    seed: int = 0
    fsdp: str = "auto"  # FSDP2 (fully_shard per transformer block): auto (more than one rank), on, off
    precision: str = "bf16"  # bf16 compute with fp32 master weights and reductions on CUDA; CPU computes fp32
    activation_checkpointing: bool = False  # recompute each transformer block's activations in backward
    teacher_placement: str = "replicate"  # the frozen teacher under FSDP: replicate (bf16 copy per rank) or shard

    def validate(self) -> None:
        """Raise :class:`HarnessError` on an impossible setting (before any model is built)."""
        check_choice("FSDP mode", self.fsdp, FSDP_MODES)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("teacher placement", self.teacher_placement, TEACHER_PLACEMENTS)
        for name in ("steps", "batch_size", "accumulation", "checkpoint_every", "log_every", "sync_every"):
            check_number(name.replace("_", " "), getattr(self, name), ge=1)
        check_number("global batch", self.global_batch, ge=0, hint="0: batch size x ranks x accumulation")
        check_number("grad clip", self.grad_clip, gt=0)
        for name in ("log_every", "checkpoint_every"):  # the losses are known on the host at sync steps only
            if getattr(self, name) % self.sync_every:
                raise HarnessError(f"{name} must be a multiple of sync_every ({self.sync_every})")

    def resolved_global_batch(self, ranks: int) -> int:
        """``batch_size x ranks x accumulation``; raises if ``global_batch`` names another value."""
        actual = self.batch_size * ranks * self.accumulation
        if self.global_batch and self.global_batch != actual:
            raise HarnessError(
                f"global batch {self.global_batch} asked, but batch {self.batch_size} x {ranks} rank(s) x accumulation "
                f"{self.accumulation} = {actual}; change --batch-size or --accumulation"
            )
        return actual

    def identity(self) -> dict[str, Any]:
        """What the run computes (the layout fields left out): a checkpoint resumes only into the same identity."""
        return {key: value for key, value in asdict(self).items() if key not in LAYOUT_FIELDS}
