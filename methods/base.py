"""The attention-method contract and the method registry.

A model adapter computes q, k, v exactly as its model does (projections, qk-norm, RoPE) and calls
``method(q, k, v, ctx)`` for every self-attention call; the method returns the attention output.
A method therefore never knows which model it runs in. Every method honours a per-layer x per-step
:class:`Schedule` (dense warm-up steps, dense layers) and reports the density it actually used.

Shapes: q, k, v and the output are ``(batch, heads, tokens, head_dim)``; tokens follow the
:class:`TokenGrid` layout (frame-major, then row, then column).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from harness.errors import HarnessError, UnsupportedError
from harness.registry import Registry
from methods.params import Param, parse_params

if TYPE_CHECKING:
    from harness.checkpoints import CheckpointSummary

CfgBranch = Literal["cond", "uncond", "none"]
Sparsity = Literal["dense", "static", "dynamic", "linear"]
#: The density one call used, in ``[0, 1]``: a number, or a 0-d tensor when the method computes it on the device
#: (a sparse pattern's kept fraction). Only :class:`DensityLog` reads a tensor, and only eagerly: a compiled forward
#: that read it into Python would break its graph at every sparse call (issue 21, item 5).
Density = float | torch.Tensor


@dataclass(frozen=True)
class TokenGrid:
    """The video token grid after patchify: ``frames x height x width`` tokens, frame-major."""

    frames: int
    height: int
    width: int
    layout: str = "frame-major, then row, then column"

    @property
    def tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width


@dataclass(frozen=True)
class AttentionContext:
    """Where an attention call happens: layer, denoising step, timestep, CFG branch, token grid; and ``route``, what
    the method resolved for the call before the forward (:meth:`AttentionMethod.route`; ``None`` where nothing was:
    the method then resolves it in the call). The route takes no part in comparing or hashing contexts."""

    layer: int
    num_layers: int
    step: int
    num_steps: int
    timestep: float
    cfg_branch: CfgBranch
    grid: TokenGrid
    route: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Capabilities:
    """What a method declares it supports; checked before any model is built."""

    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    sparsity: Sparsity = "dense"
    data_dependent: bool = False  # True when the density depends on q/k (dynamic masks)
    needs_training: bool = False
    needs_calibration: bool = False
    # Takes ``fixed_density``: a kept fraction stated by the user that replaces the data-dependent selection
    # (``bench latency --at-density``; random weights give near-uniform attention, which thresholds keep whole).
    fixed_density: bool = False
    notes: str = ""


@dataclass(frozen=True)
class Schedule:
    """Per-layer x per-step schedule: where the method runs and where plain dense attention runs."""

    dense_warmup_steps: int = 0
    dense_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.dense_warmup_steps < 0:
            raise HarnessError(f"dense warm-up steps must be >= 0, got {self.dense_warmup_steps}")
        if any(layer < 0 for layer in self.dense_layers):
            raise HarnessError(f"dense layers must be >= 0, got {list(self.dense_layers)}")

    def runs_dense(self, ctx: AttentionContext) -> bool:
        return ctx.step < self.dense_warmup_steps or ctx.layer in self.dense_layers

    def validate_for(self, num_layers: int, num_steps: int) -> None:
        """Fail early on a schedule that names layers the model does not have."""
        bad = [layer for layer in self.dense_layers if layer >= num_layers]
        if bad:
            raise HarnessError(f"dense layers {bad} do not exist: the model has {num_layers} layers (0-based)")
        if self.dense_warmup_steps > num_steps:
            raise HarnessError(
                f"dense warm-up steps ({self.dense_warmup_steps}) exceed the number of steps ({num_steps})"
            )


@dataclass
class DensityLog:
    """Density actually used per (layer, step), averaged over the calls (CFG branches, batches).

    A density the method gave as a device tensor is kept as it is and read back only when the log is read
    (:meth:`mean`, :meth:`entries`, ...), in one transfer per device and dtype: reading it at every call (a
    ``float()`` of a CUDA tensor) made each eager call wait for the GPU to finish it, so the host could no longer
    queue the next layer's work ahead, and a selection's host time (svg2's plan, ~40 launches) was paid in full
    at every call of a forward. The values and their order of summation are those of a read at every call; a density
    tensor is read as it is when the log is read, so a method must not change it in place after returning it (none
    does: each call's is a new tensor).
    """

    _sums: dict[tuple[int, int], float] = field(default_factory=lambda: defaultdict(float))
    _counts: dict[tuple[int, int], int] = field(default_factory=lambda: defaultdict(int))
    # Calls not yet summed, in call order: (key, density as given); folded into _sums by _settle.
    _pending: list[tuple[tuple[int, int], Density]] = field(default_factory=list)

    def add(self, ctx: AttentionContext, density: Density) -> None:
        if torch.compiler.is_compiling():
            # Inside a compiled graph this bookkeeping would put a guard on every logged value (and the step),
            # a recompile at every call: compiled calls are not logged (see harness.models.processor).
            return
        key = (ctx.layer, ctx.step)
        if isinstance(density, torch.Tensor) and density.numel() != 1:  # refused now, not at a later read
            raise ValueError(f"a call's density is one number, got a tensor of shape {tuple(density.shape)}")
        self._pending.append((key, density.detach() if isinstance(density, torch.Tensor) else float(density)))
        self._counts[key] += 1

    def _settle(self) -> None:
        """Fold the pending densities into the sums, in call order; the tensors read in one transfer per (device,
        dtype)."""
        values = [value for _, value in self._pending]
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
        for index, value in enumerate(values):
            if isinstance(value, torch.Tensor):
                groups[(value.device, value.dtype)].append(index)
        for indices in groups.values():
            read = torch.stack([values[i].reshape(()) for i in indices]).tolist()
            for index, number in zip(indices, read, strict=True):
                values[index] = float(number)
        for (key, _), value in zip(self._pending, values, strict=True):
            self._sums[key] += value
        self._pending.clear()

    def reset(self) -> None:
        self._sums.clear()
        self._counts.clear()
        self._pending.clear()

    def mean(self) -> float | None:
        self._settle()
        calls = sum(self._counts.values())
        return sum(self._sums.values()) / calls if calls else None

    def per_layer(self) -> dict[int, float]:
        return self._grouped(0)

    def per_step(self) -> dict[int, float]:
        return self._grouped(1)

    def _grouped(self, axis: int) -> dict[int, float]:
        self._settle()
        sums: dict[int, float] = defaultdict(float)
        counts: dict[int, int] = defaultdict(int)
        for key, value in self._sums.items():
            sums[key[axis]] += value
            counts[key[axis]] += self._counts[key]
        return {k: sums[k] / counts[k] for k in sorted(sums)}

    def summary(self) -> dict[str, Any]:
        return {"mean": self.mean(), "per_layer": self.per_layer(), "per_step": self.per_step()}

    def entries(self) -> list[tuple[int, int, float, int]]:
        """Raw ``(layer, step, density sum, calls)`` rows: what :meth:`absorb` joins across ranks."""
        self._settle()
        return [(*key, self._sums[key], self._counts[key]) for key in sorted(self._sums)]

    def absorb(self, entries: list[tuple[int, int, float, int]]) -> None:
        """Add another log's :meth:`entries` (another rank's calls) to this one."""
        self._settle()
        for layer, step, total, calls in entries:
            self._sums[(layer, step)] += total
            self._counts[(layer, step)] += calls


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain softmax attention, torch chooses the kernel. Shapes ``(B, H, N, D)``."""
    return F.scaled_dot_product_attention(q, k, v)


class AttentionMethod(ABC):
    """Base class of every attention method.

    Subclasses set ``name``, ``capabilities`` and ``parameters`` (the schema of their parameters, see
    :mod:`methods.params`) and implement :meth:`attend`, returning the output and the density used
    (a :data:`Density`: 1.0 for dense attention, the kept fraction of score blocks for sparse ones). Constructor keyword
    arguments are the method's parameters: typed and checked by the schema into :attr:`settings`
    (defaults filled in), which :meth:`params` records.
    """

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities] = Capabilities()
    parameters: ClassVar[tuple[Param, ...]] = ()
    #: The kernel variables (``BENCH_...``, :data:`methods.kernels.KERNEL_CHOICES`) its calls read: a finished run
    #: made with other values of these measured other kernels (:attr:`kernel_variables_used`).
    kernel_variables: ClassVar[tuple[str, ...]] = ()
    #: Parameters a saved state is bound to: a checkpoint whose state recorded other values is refused up front.
    state_params: ClassVar[tuple[str, ...]] = ()
    #: Parameters that stand in for a trained state (latency without a checkpoint): refused beside a checkpoint.
    untrained_params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, schedule: Schedule | None = None, **params: Any) -> None:
        self.settings: dict[str, Any] = {p.name: p.default for p in self.parameters} | self.parse_params(params)
        self.schedule = schedule or Schedule()
        self.density = DensityLog()

    @classmethod
    def parse_params(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """The given parameters typed by :attr:`parameters` (defaults not filled in): what a spec records.

        ``raw`` holds ``--param`` strings or Python / JSON values; an unknown name, a wrong type, NaN or
        infinity, or a value out of range is a :class:`HarnessError` naming the method and the parameter.
        Checks that need the model (layers it lacks) are :meth:`validate_for`'s.
        """
        return parse_params(getattr(cls, "name", cls.__name__), cls.parameters, raw)

    # -- the contract ------------------------------------------------------------------------

    @abstractmethod
    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext
    ) -> tuple[torch.Tensor, Density]:
        """Attention output ``(B, H, N, D)`` and the density actually used in ``[0, 1]``."""

    def runs_dense(self, ctx: AttentionContext) -> bool:
        """Whether this call runs plain dense attention (the schedule; methods may add their own)."""
        return self.schedule.runs_dense(ctx)

    def route(self, ctx: AttentionContext) -> Any:
        """What the calls at ``ctx`` look up per layer (which branch runs, the layer's weights), resolved outside the
        transformer's forward: the harness's processor puts it in ``ctx.route``. ``None``: nothing (the default).

        A compiled forward that looks a layer's things up by ``ctx.layer`` is guarded on the layer's number, so
        wherever the method breaks the graph, each layer's frame compiles again (past Dynamo's recompile limit of 8,
        it runs eagerly). Read from the route, the guards are on the route's own values, which differ between
        layers only where they run differently (issue 21, item 5). A method that runs another (LinVideo's softmax
        layers, DMD2's generator) hands it a context carrying that method's own route.
        """
        return None

    def run(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext, dense: bool | None = None
    ) -> tuple[torch.Tensor, Density]:
        """One call under the schedule: plain dense attention where :meth:`runs_dense` says so, else
        :meth:`attend`. Output ``(B, H, N, D)`` and the density used, not logged: a method that runs another
        inside it (LinVideo's softmax layers) calls this, so the inner one keeps its own schedule.
        ``dense``: :meth:`runs_dense` for ``ctx`` when the caller decided it already (the harness's processor
        decides outside the transformer's forward, so that a compiled forward holds no guard on the step);
        ``None`` decides here."""
        if self.runs_dense(ctx) if dense is None else dense:
            return dense_attention(q, k, v), 1.0
        return self.attend(q, k, v, ctx)

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext, dense: bool | None = None
    ) -> torch.Tensor:
        """The output of one call (see :meth:`run`), its density logged."""
        out, density = self.run(q, k, v, ctx, dense)
        self.density.add(ctx, density)
        return out

    @property
    def kernel_variables_used(self) -> tuple[str, ...]:
        """The kernel variables this method's calls read (its own :attr:`kernel_variables`; a method that runs
        another inside adds that one's)."""
        return self.kernel_variables

    def params(self) -> dict[str, Any]:
        """The method's parameters as recorded in the run record (JSON-serialisable): its settings."""
        return dict(self.settings)

    def begin_video(self) -> None:
        """Forget what the previous video left (random draws, warm starts) before a video is sampled.

        Each video of a run is then made as if it were the run's first, so a resumed run, or one sharded
        over ranks, makes the same videos as one uninterrupted process. Stateless methods keep nothing.
        """
        return None

    def validate_for(self, num_layers: int, num_steps: int) -> None:
        """Fail before the model is built on settings this model cannot take (e.g. layers it lacks)."""
        self.schedule.validate_for(num_layers, num_steps)
        for param in self.parameters:
            value = self.settings[param.name]
            if not param.model_layers or value is None or value == "all":
                continue
            if param.type == "int":  # a count of first layers
                if value > num_layers:
                    raise HarnessError(f"{self.name}: {param.name} {value} exceeds the model's {num_layers} layers")
            elif bad := [layer for layer in value if layer >= num_layers]:
                # Otherwise a typo'd layer would silently never be used.
                raise HarnessError(
                    f"{self.name}: {param.name} {bad} do not exist: the model has {num_layers} layers (0-based)"
                )

    # -- support checks ----------------------------------------------------------------------

    def check_supported(self, device: torch.device, dtype: torch.dtype) -> None:
        """Raise :class:`UnsupportedError` if the method cannot run here (never fall back silently)."""
        caps = self.capabilities
        if device.type not in caps.devices:
            raise UnsupportedError(
                f"method {self.name!r} cannot run on {device.type}: it needs {' or '.join(caps.devices)}."
                f"{self._device_hint(device)}"
            )
        if dtype not in caps.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in caps.dtypes)
            raise UnsupportedError(f"method {self.name!r} does not support {dtype}; supported: {names}")

    def _device_hint(self, device: torch.device) -> str:
        return " On CPU use 'sdpa' or 'math'." if device.type == "cpu" else ""

    # -- per-layer state (feature maps, caches, calibration plans) ---------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Learned or calibrated per-layer state; empty for stateless methods."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            raise HarnessError(f"method {self.name!r} has no state, but the state file holds {len(tensors)} tensors")

    def save_state(self, path: Path) -> None:
        """Write the state as safetensors (atomically), with the method's name and parameters."""
        from safetensors.torch import save_file

        from harness.atomic import atomic_path

        meta = {"method": self.name, "params": json.dumps(self.params(), sort_keys=True)}
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_tensors().items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    def check_checkpoint(self, summary: CheckpointSummary) -> None:
        """Refuse, before any model is built, a checkpoint (its ``spec.json``: ``summary.spec``) that this method's
        parameters do not fit; the harness has checked its method, model, files and state parameters already."""
        return None

    def scheduler(self, sampling: Any) -> Any:
        """The sampler a model runs under this method, with the diffusers scheduler interface the adapter drives
        (``set_timesteps``, ``timesteps``, ``step``), or ``None`` for the model's own (every attention method).
        A distilled few-step generator (``dmd2``) brings its own (``sampling``: the run's
        :class:`harness.spec.Sampling`)."""
        return None

    def load_checkpoint(self, path: Path, transformer: torch.nn.Module) -> None:
        """Load what ``--checkpoint`` names; by default the method's state file (methods that fine-tune
        the model, such as LinVideo, also load the transformer's weights)."""
        self.load_state(path)

    def load_state(self, path: Path) -> None:
        """Load state saved by :meth:`save_state`; a wrong or corrupt file is a clear error."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as exc:
            raise HarnessError(f"cannot read method state {path}: {exc}") from exc
        if meta.get("method") != self.name:
            raise HarnessError(f"state file {path} belongs to method {meta.get('method')!r}, not {self.name!r}")
        self.load_state_tensors(tensors)


METHODS: Registry[type[AttentionMethod]] = Registry("method", entry_point_group="attention_bench.methods")


def register_method(name: str, aliases: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    """Class decorator: register an :class:`AttentionMethod` subclass under ``name``."""

    def decorator(cls: type[AttentionMethod]) -> type[AttentionMethod]:
        cls.name = name
        return METHODS.register(name, aliases)(cls)

    return decorator


def build_method(name: str, schedule: Schedule | None = None, **params: Any) -> AttentionMethod:
    """Instantiate a registered method by name or alias."""
    return METHODS.get(name)(schedule=schedule, **params)
