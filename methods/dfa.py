"""DiTFastAttn (DFA): a calibrated per-(step, layer) plan of cheaper substitutes for self-attention.

Yuan et al., NeurIPS 2024 (arXiv 2406.08552). Each self-attention call follows the plan's choice for
its (step, layer):

- ``full``: exact attention. If a later step reuses its residual, the call also caches
  ``R = full - window`` (window attention with residual sharing needs it).
- ``window_residual`` (WA-RS): 1D sliding-window attention over the flattened sequence,
  ``|i - j| <= w``, plus the residual R cached at the layer's last full step.
- ``reuse_step`` (AST): the layer's output of the previous step, reused.
- ``reuse_cond`` (ASC): full attention on the conditional pass; the unconditional pass reuses it.
- ``window_residual+reuse_cond``: WA-RS on the conditional pass, reused by the unconditional one.

The harness's samplers run CFG as two calls per step, conditional first (as diffusers' WanPipeline),
so ASC caches the conditional call's output per layer and the unconditional call of the same step
returns it (a batch of B prompts reuses row for row). DiTFastAttn's own code splits a batch of two
halves instead; the result is the same. Every cache is kept per CFG branch.

Density per call: the share of the N x N scores computed: 1 for a full call, the window's share
(``band_density``) for a windowed call, 0 for a reused output, and ``1 + band`` for a full call that
also refreshes the residual (DiTFastAttn runs a full and a windowed pass there, so the recorded
density exceeds 1 on those calls only). The plan comes from ``bench calibrate --method dfa``
(:mod:`methods.dfa_calibrate`); ``uniform`` builds an uncalibrated plan for latency probes only.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from harness import strict_json
from harness.errors import HarnessError, check_number
from methods.base import AttentionContext, AttentionMethod, Capabilities, Schedule, dense_attention, register_method
from methods.kernels.block_sparse import FLEX_TILE, BlockSparsePattern, mask_tables, num_blocks
from methods.kernels.sparse_backends import block_sparse_attention
from methods.params import Param

FULL, WINDOW, REUSE_STEP, REUSE_COND = "full", "window_residual", "reuse_step", "reuse_cond"
WINDOW_REUSE_COND = f"{WINDOW}+{REUSE_COND}"
CHOICES: tuple[str, ...] = (FULL, WINDOW, REUSE_STEP, REUSE_COND, WINDOW_REUSE_COND)
# Calibration tries these most aggressive first and keeps the first one under the error bound.
CANDIDATES: tuple[str, ...] = (REUSE_STEP, WINDOW_REUSE_COND, WINDOW, REUSE_COND)
#: The paper's window: 1/8 of the tokens in all (N/16 on each side), as DiTFastAttnV2's Wan script.
DEFAULT_WINDOW_FRACTION = 1 / 8
PLAN_FORMAT = 1


def window_radius(tokens: int, window_fraction: float) -> int:
    """Keys on each side of a query: ``round(fraction * tokens / 2)``, at least 1 (2 covers every key)."""
    return max(1, round(window_fraction * tokens / 2))


def band_density(tokens: int, radius: int) -> float:
    """Exact share of the ``tokens x tokens`` scores with ``|i - j| <= radius`` (edges clipped)."""
    radius = min(radius, tokens - 1)
    kept = tokens * (2 * radius + 1) - radius * (radius + 1)
    return kept / tokens**2


def band_pattern(tokens: int, radius: int, device: torch.device) -> BlockSparsePattern:
    """The band ``|i - j| <= radius`` as a block-sparse pattern built from block indices (no N x N mask).

    Tiles the band crosses are kept; tiles entirely inside it are full (no per-token mask there). The
    radius is a captured tensor and the pattern is cached per (tokens, radius, device), so the compiled
    Flex kernel sees one ``mask_mod`` object per sequence length.
    """
    key = (tokens, radius, str(device))
    if key not in _BAND_PATTERNS:
        block = FLEX_TILE  # the band's edges are token-level anyway
        starts = torch.arange(num_blocks(tokens, block), device=device) * block
        ends = (starts + block).clamp(max=tokens) - 1
        q_start, q_end, k_start, k_end = starts[:, None], ends[:, None], starts[None, :], ends[None, :]
        nearest = torch.maximum((k_start - q_end).clamp(min=0), (q_start - k_end).clamp(min=0))
        farthest = torch.maximum(q_end - k_start, k_end - q_start)
        (limit,) = mask_tables(torch.tensor(radius, device=device))

        def in_band(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
            return (q_idx - kv_idx).abs() <= limit

        kept, full = (nearest <= radius)[None, None], (farthest <= radius)[None, None]
        _BAND_PATTERNS[key] = BlockSparsePattern(kept, tokens, block, full=full, mask_mod=in_band)
    return _BAND_PATTERNS[key]


_BAND_PATTERNS: dict[tuple[int, int, str], BlockSparsePattern] = {}


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, radius: int, backend: str = "auto"
                     ) -> torch.Tensor:  # fmt: skip
    """Softmax attention of each query over keys ``|i - j| <= radius`` only; ``(B, H, N, D)``.

    ``backend`` ``auto``: compiled FlexAttention on CUDA (only tiles meeting the band), masked dense
    SDPA elsewhere; ``flex`` or ``masked`` force one.
    """
    return block_sparse_attention(q, k, v, band_pattern(q.shape[-2], radius, q.device), backend)


def base_choice(choice: str) -> str:
    """What the conditional (or only) pass computes: ``full``, ``window_residual`` or ``reuse_step``."""
    return {REUSE_COND: FULL, WINDOW_REUSE_COND: WINDOW}.get(choice, choice)


@dataclass(frozen=True)
class DfaPlan:
    """The calibrated choice per (step, layer), and what produced it.

    ``choices[step][layer]`` is one of :data:`CHOICES`; ``errors[step][layer]`` the calibration's
    relative error of the transformer output after that layer's choice (None where not searched).
    """

    choices: list[list[str]]
    window_fraction: float
    threshold: float | None  # None: an uncalibrated (uniform) plan
    cfg: bool
    model: str = ""
    errors: list[list[float | None]] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.choices, list) or not all(isinstance(row, list) for row in self.choices):
            raise HarnessError("dfa plan choices must be a list of steps, each a list of one choice per layer")
        if not self.choices or not self.choices[0]:
            raise HarnessError("dfa plan has no steps or no layers")
        widths = {len(row) for row in self.choices}
        if len(widths) != 1:
            raise HarnessError(f"dfa plan rows have different layer counts: {sorted(widths)}")
        bad = sorted({str(c) for row in self.choices for c in row if c not in CHOICES})
        if bad:
            raise HarnessError(f"dfa plan holds unknown choices {bad}; valid: {', '.join(CHOICES)}")
        if any(c != FULL for c in self.choices[0]):
            raise HarnessError("dfa plan: step 0 must be full attention in every layer (nothing is cached yet)")
        check_number("dfa window fraction", self.window_fraction, gt=0, le=2)

    @property
    def num_steps(self) -> int:
        return len(self.choices)

    @property
    def num_layers(self) -> int:
        return len(self.choices[0])

    @classmethod
    def uniform(cls, choice: str, num_steps: int, num_layers: int, window_fraction: float) -> DfaPlan:
        """Every (step > 0, layer) takes ``choice``: a latency probe, not a calibrated plan."""
        rows = [[FULL] * num_layers] + [[choice] * num_layers for _ in range(num_steps - 1)]
        return cls(choices=rows, window_fraction=window_fraction, threshold=None, cfg=True)

    def counts(self) -> dict[str, int]:
        return dict(Counter(c for row in self.choices for c in row))

    def to_json(self) -> str:
        return strict_json.encode({"format": PLAN_FORMAT, "method": "dfa", **asdict(self)}, indent=1) + "\n"

    def save(self, path: Path) -> None:
        from harness.atomic import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(self.to_json())

    @classmethod
    def load(cls, path: Path) -> DfaPlan:
        """Read a plan written by :meth:`save`; a missing or malformed file is a clear error."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise HarnessError(f"cannot read dfa plan {path}: {exc}") from exc
        if not isinstance(data, dict) or data.get("method") != "dfa" or data.get("format") != PLAN_FORMAT:
            raise HarnessError(f"{path} is not a dfa plan (format {PLAN_FORMAT}); make one with `bench calibrate`")
        data.pop("method"), data.pop("format"), data.pop(strict_json.NON_FINITE_KEY, None)  # errors stay null
        known = {item.name: item for item in fields(cls)}
        missing = [name for name, item in known.items() if name not in data
                   and item.default is MISSING and item.default_factory is MISSING]  # fmt: skip
        unknown = sorted(set(data) - set(known))
        problems = ([f"lacks the field(s) {', '.join(missing)}"] if missing else []) + (
            [f"has unknown field(s) {', '.join(unknown)}"] if unknown else [])  # fmt: skip
        try:
            if problems:
                raise HarnessError("; ".join(problems))
            return cls(**data)
        except HarnessError as exc:
            raise HarnessError(f"dfa plan {path} is malformed: {exc}; make one with `bench calibrate`") from exc


def residual_steps(choices: list[list[str]]) -> set[tuple[int, int]]:
    """(step, layer) pairs whose full call must cache R: a later windowed step follows before the next full."""
    needed: set[tuple[int, int]] = set()
    for layer in range(len(choices[0])):
        last_full: int | None = None
        for step, row in enumerate(choices):
            kind = base_choice(row[layer])
            if kind == FULL:
                last_full = step
            elif kind == WINDOW and last_full is not None:
                needed.add((last_full, layer))
    return needed


def output_steps(choices: list[list[str]]) -> set[tuple[int, int]]:
    """(step, layer) pairs whose output the next step reuses (``reuse_step``), so it must stay cached."""
    return {(step, layer) for step, row in enumerate(choices[1:]) for layer, choice in enumerate(row)
            if base_choice(choice) == REUSE_STEP}  # fmt: skip


def _keep_if(needed: bool, cache: dict[Any, Any], key: Any, value: Any) -> None:
    """Cache ``value`` under ``key`` if a later call reads it, else free what the key held."""
    if needed:
        cache[key] = value
    else:
        cache.pop(key, None)


@register_method("dfa", aliases=("ditfastattn",))
class DiTFastAttn(AttentionMethod):
    """DiTFastAttn following a calibrated plan (see the module docstring); ``plan`` or ``uniform`` is needed.

    The schedule's dense warm-up steps and dense layers run ``full`` (and still fill the caches).
    """

    capabilities = Capabilities(
        devices=("cpu", "cuda"),
        sparsity="static",
        needs_calibration=True,
        notes="calibrated plan: window attention + residual, step reuse, CFG reuse (bench calibrate --method dfa)",
    )
    parameters = (
        Param("plan", "path", None, "plan JSON from `bench calibrate --method dfa`", optional=True),
        Param("uniform", "choice", None, "instead of a plan, one choice for every step after the first (latency "
              "probes only; recorded as uncalibrated)", choices=CHOICES, optional=True),
        Param("window", "float", None, "window fraction of a uniform plan (default 1/8); a plan carries its own",
              min=0.0, max=2.0, min_open=True, optional=True),
    )  # fmt: skip

    def __init__(self, schedule: Schedule | None = None, **params: Any) -> None:
        super().__init__(schedule, **params)
        plan, uniform, window = (self.settings[name] for name in ("plan", "uniform", "window"))
        if (plan is None) == (uniform is None):
            raise HarnessError(
                "dfa needs a calibration plan: run `bench calibrate --method dfa --model MODEL --out plan.json`, "
                "then pass --param plan=plan.json (or --param uniform=CHOICE for a latency probe)"
            )
        if plan is not None and window is not None:
            raise HarnessError("dfa: a calibrated plan carries its own window; drop --param window")
        self.plan_path = None if plan is None else Path(plan).expanduser()
        if self.plan_path is not None and not self.plan_path.is_file():
            raise HarnessError(f"dfa plan {self.plan_path} does not exist; make it with `bench calibrate --method dfa`")
        self.uniform = uniform
        self.uniform_window = DEFAULT_WINDOW_FRACTION if window is None else window
        self.plan: DfaPlan | None = DfaPlan.load(self.plan_path) if self.plan_path is not None else None
        self._plan_sha256 = hashlib.sha256(self.plan_path.read_bytes()).hexdigest() if self.plan_path else None
        self._residual_at: set[tuple[int, int]] = set()
        self._output_at: set[tuple[int, int]] = set()
        self.calibrating = False  # True while a plan is searched: every full call caches its residual
        self.probing = False  # True during calibration trials: no persistent cache writes, no density
        self.reset_caches()
        if self.plan is not None:
            self.use_plan(self.plan)

    # -- plan ---------------------------------------------------------------------------------

    def use_plan(self, plan: DfaPlan) -> None:
        """Follow ``plan`` from now on (calibration swaps plans in while it searches)."""
        self.plan = plan
        effective = [[self.choice_at(step, layer) for layer in range(plan.num_layers)]
                     for step in range(plan.num_steps)]  # fmt: skip
        self._residual_at = residual_steps(effective)
        self._output_at = output_steps(effective)

    def choice_at(self, step: int, layer: int) -> str:
        if self.plan is None:
            raise HarnessError("dfa has no plan yet")
        if step < self.schedule.dense_warmup_steps or layer in self.schedule.dense_layers:
            return FULL
        return self.plan.choices[step][layer]

    def validate_for(self, num_layers: int, num_steps: int) -> None:
        super().validate_for(num_layers, num_steps)
        if self.uniform is not None:
            self.use_plan(DfaPlan.uniform(self.uniform, num_steps, num_layers, self.uniform_window))
            return
        assert self.plan is not None
        if (self.plan.num_steps, self.plan.num_layers) != (num_steps, num_layers):
            raise HarnessError(
                f"dfa plan {self.plan_path} is for {self.plan.num_steps} steps x {self.plan.num_layers} layers, "
                f"this run has {num_steps} steps x {num_layers} layers; calibrate for this setting"
            )

    def params(self) -> dict[str, Any]:
        if self.plan is None:
            return {"uniform": self.uniform, "window": self.uniform_window}
        return {
            "plan": str(self.plan_path) if self.plan_path else None,
            "plan_sha256": self._plan_sha256,
            "uniform": self.uniform,
            "calibrated": self.plan.threshold is not None,
            "threshold": self.plan.threshold,
            "window": self.plan.window_fraction,
            "choices": self.plan.counts(),
        }

    # -- caches -------------------------------------------------------------------------------

    def reset_caches(self) -> None:
        self._last_output: dict[tuple[int, str], torch.Tensor] = {}
        self._residual: dict[tuple[int, str], torch.Tensor] = {}
        self._cond_output: dict[int, tuple[int, torch.Tensor, torch.Tensor | None]] = {}

    def _cached(self, cache: dict[Any, torch.Tensor], key: Any, like: torch.Tensor, what: str) -> torch.Tensor:
        value = cache.get(key)
        if value is None or value.shape != like.shape:
            raise HarnessError(f"dfa: no {what} cached for layer/branch {key} with shape {tuple(like.shape)}; "
                               "the plan reuses something no earlier call computed")  # fmt: skip
        return value

    # -- the call -----------------------------------------------------------------------------

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext,
            dense: bool | None = None) -> tuple[torch.Tensor, float]:  # fmt: skip
        # Unlike other methods, scheduled dense calls must go through attend too: they fill the caches (the plan,
        # not ``dense``, decides every call).
        return self.attend(q, k, v, ctx)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext,
                 dense: bool | None = None) -> torch.Tensor:  # fmt: skip
        out, density = self.run(q, k, v, ctx)
        if not self.probing:
            self.density.add(ctx, density)
        return out

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext
               ) -> tuple[torch.Tensor, float]:  # fmt: skip
        choice = self.choice_at(ctx.step, ctx.layer)
        branch = ctx.cfg_branch
        key = (ctx.layer, branch)
        assert self.plan is not None
        if branch == "uncond" and choice in (REUSE_COND, WINDOW_REUSE_COND):
            step, output, residual = self._cond_output.get(ctx.layer, (-1, None, None))
            if step != ctx.step or output is None or output.shape != q.shape:
                raise HarnessError("dfa: CFG reuse needs the conditional pass of the same step first")
            if residual is not None and not self.probing:
                self._residual[key] = residual
            out, density = output, 0.0
        else:
            out, density, residual = self._compute(base_choice(choice), q, k, v, ctx)
            if branch == "cond":
                reused = choice in (REUSE_COND, WINDOW_REUSE_COND) or self.calibrating
                _keep_if(reused, self._cond_output, ctx.layer, (ctx.step, out, residual))
        if not self.probing:
            # Only outputs a later step reuses stay: at Wan 14B 720p one is 0.77 GB per layer and branch.
            _keep_if((ctx.step, ctx.layer) in self._output_at or self.calibrating, self._last_output, key, out)
        return out, density

    def _compute(self, kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext
                 ) -> tuple[torch.Tensor, float, torch.Tensor | None]:  # fmt: skip
        """Output, density and the residual refreshed by this call (None if it refreshed none)."""
        key = (ctx.layer, ctx.cfg_branch)
        assert self.plan is not None
        tokens = q.shape[-2]
        radius = window_radius(tokens, self.plan.window_fraction)
        if kind == REUSE_STEP:
            return self._cached(self._last_output, key, q, "previous-step output"), 0.0, None
        if kind == WINDOW:
            residual = self._cached(self._residual, key, q, "window residual")
            return window_attention(q, k, v, radius) + residual, band_density(tokens, radius), None
        refresh = (ctx.step, ctx.layer) in self._residual_at or (self.calibrating and not self.probing)
        if not refresh:
            return dense_attention(q, k, v), 1.0, None
        # As DiTFastAttn: a full pass and a windowed pass, so this call computes 1 + band of the scores.
        out = dense_attention(q, k, v)
        residual = out - window_attention(q, k, v, radius)
        if not self.probing:
            self._residual[key] = residual
        return out, 1.0 + band_density(tokens, radius), residual
