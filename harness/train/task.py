"""What a trained method plugs into the engine: a :class:`Task` and the parameter :class:`Group` s it trains.

The engine owns the loop; a task says what to build, how to draw a batch and what its loss is, what to do after
each step (an EMA, a projection of r), what to write at each checkpoint and at the end. Modules come by role:
``sharded`` ones (transformers, and any copy kept in step with them such as an EMA) are wrapped by FSDP2 per
transformer block, ``replicated`` ones (small side modules read outside their own ``forward``, such as SLA's
projections) stay whole on every rank with their gradients averaged across ranks, and ``frozen`` ones (the
teacher) are placed per ``teacher_placement`` and never trained nor checkpointed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from harness.errors import check_choice

if TYPE_CHECKING:
    from harness.train.config import EngineConfig
    from harness.train.engine import Run

OPTIMIZERS = ("adamw", "sgd")
DECAYS = ("cosine", "constant")  # after the linear warm-up: cosine to 0 at the last step, or hold


@dataclass
class Modules:
    """A task's modules by role; the names key the checkpoint (``sharded`` and ``replicated`` are saved)."""

    sharded: dict[str, nn.Module]
    replicated: dict[str, nn.Module] = field(default_factory=dict)
    frozen: dict[str, nn.Module] = field(default_factory=dict)


@dataclass
class Group:
    """Parameters trained by one optimizer with one peak learning rate and schedule.

    ``clip_with`` names another group whose gradient-norm clip this one shares (default: clipped alone), e.g. a
    transformer and its new feature maps at two learning rates under one clip.
    """

    name: str
    params: list[nn.Parameter]
    lr: float
    warmup_steps: int
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    decay: str = "cosine"
    clip_with: str = ""

    def __post_init__(self) -> None:
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.decay, DECAYS)

    def build(self) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.params, lr=self.lr)
        return torch.optim.AdamW(self.params, lr=self.lr, weight_decay=self.weight_decay, betas=self.betas)


@dataclass(frozen=True)
class Shard:
    """One stream of training data: slot ``index`` of ``count`` in the global batch, with its own generator.

    ``index = rank x accumulation + micro-batch``, so a global batch draws the same samples however it is laid
    out over ranks and micro-batches; shard 0 is seeded with the run's seed itself.
    """

    index: int
    count: int
    seed: int
    generator: torch.Generator


class Data(Protocol):
    def batch(self, step: int) -> Any:
        """The next batch of this shard for optimizer step ``step`` (0-based)."""


class Task(ABC):
    """A training run the engine drives; subclasses set ``name``, ``config``, ``out`` and ``device``."""

    name: str
    config: EngineConfig
    out: Path
    device: torch.device
    #: JSON-able state the task keeps across resumes (e.g. periodic evaluations); saved with each checkpoint.
    log: dict[str, Any]
    #: Where the data shards' generators live (None: the training device); CPU for data held in host memory.
    generator_device: torch.device | None = None
    #: A two time-scale update rule: before each optimizer step of every group, ``inner_updates`` updates of the
    #: groups named in ``inner_groups`` alone, each on fresh batches with :meth:`inner_losses` (DMD2's fake score,
    #: N updates per generator step). Each is a whole update: micro-batches, clipping and the optimizers' step.
    inner_groups: tuple[str, ...] = ()
    inner_updates: int = 0

    @abstractmethod
    def build(self, device: torch.device) -> Modules:
        """Make the modules on ``device`` (the global seed is set); called once, before sharding."""

    @abstractmethod
    def param_groups(self) -> list[Group]:
        """The trained groups, read after sharding (FSDP replaces the parameters)."""

    @abstractmethod
    def data(self, shard: Shard, step: int) -> Data:
        """This shard's data source, positioned to continue at optimizer step ``step``."""

    @abstractmethod
    def losses(self, batch: Any, shard: Shard, step: int) -> dict[str, torch.Tensor]:
        """The loss terms of one micro-batch (0-dim tensors; ``objective`` first); the engine minimises their sum."""

    @abstractmethod
    def finish(self, run: Run) -> Path:
        """Write the finished result (on every rank: gathering is collective; the lead writes) and return it."""

    def inner_losses(self, batch: Any, shard: Shard, step: int, index: int) -> dict[str, torch.Tensor]:
        """The loss terms of one micro-batch of inner update ``index`` (0-based) of optimizer step ``step``; only
        the ``inner_groups`` are stepped on their gradients. Their means over the inner updates are logged with the
        step's terms, so their names must differ from :meth:`losses`'."""
        raise TypeError(f"task {self.name} sets inner_updates but defines no inner_losses")  # a task written wrong

    def parts(self, batch: Any) -> Iterator[tuple[Any, float]]:
        """``batch`` in the passes it is backpropagated in, each with its share of the batch (default: one pass).

        A loss that averages over samples, weighted by each part's share, sums to the whole batch's gradient, so
        splitting changes memory, not the step (LinVideo's ``micro_batch``)."""
        yield batch, 1.0

    def session(self) -> AbstractContextManager[Any]:
        """Context held around the whole loop (e.g. attention methods installed on student and teacher)."""
        return nullcontext()

    def after_step(self, step: int, run: Run) -> None:  # noqa: B027 (an optional hook)
        """Called on every rank after optimizer step ``step`` (1-based count of steps done)."""

    def on_checkpoint(self, step: int, run: Run) -> None:  # noqa: B027 (an optional hook)
        """Called on every rank after the resumable state of ``step`` is written."""
