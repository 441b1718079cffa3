"""``bench latency``: one transformer forward (and optionally a whole sample) per method, same inputs,
one process, speedups against a named dense baseline. Obeys :mod:`harness.latency`'s protocol."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.environment import capture_environment
from harness.errors import HarnessError
from harness.generate import initial_noise
from harness.latency import StageTimer, measure, peak_memory
from harness.models.base import MODELS
from harness.preflight import check_method, resolve_device, resolve_dtype
from harness.spec import Sampling
from methods import METHODS
from methods.base import AttentionMethod, Schedule

DENSE_METHODS = ("fa2", "cudnn", "sdpa", "math")
LATENCY_TIMESTEP = 500.0  # mid-trajectory; dense latency does not depend on it


@dataclass
class LatencyRequest:
    """What to time. ``height``/``width``/``frames`` default to the model's sampling defaults."""

    model: str
    methods: list[str]
    weights: str = "random"
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    dtype: str = "bfloat16"
    device: str = "auto"
    warmup: int = 2
    repeats: int = 5
    baseline: str | None = None
    sample_steps: int = 0  # > 0: also time a whole sample (CFG, that many steps, decode)
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    dense_layers: tuple[int, ...] = ()
    dense_warmup_steps: int = 0
    # The denoising step (0-based) whose forward is timed. The steps before it run once, untimed, so that a
    # method that carries state across steps (DFA's cached residuals and outputs) times a step that uses it.
    step: int = 0

    def sampling(self) -> Sampling:
        defaults = MODELS.get(self.model).defaults
        return Sampling(
            steps=max(self.sample_steps, self.step + 1),
            cfg=defaults.cfg,
            shift=defaults.shift,
            height=defaults.height if self.height is None else self.height,
            width=defaults.width if self.width is None else self.width,
            frames=defaults.frames if self.frames is None else self.frames,
            fps=defaults.fps,
        )


def _validate(request: LatencyRequest) -> tuple[list[AttentionMethod], torch.device, torch.dtype]:
    adapter_cls = MODELS.get(request.model)
    if not request.methods:
        raise HarnessError("name at least one method")
    if request.repeats < 1 or request.warmup < 0:
        raise HarnessError(f"need --repeats >= 1 and --warmup >= 0, got {request.repeats}, {request.warmup}")
    if request.step < 0:
        raise HarnessError(f"--step is a 0-based denoising step, got {request.step}")
    sampling = request.sampling()
    adapter_cls.validate_sampling(sampling)
    schedule = Schedule(request.dense_warmup_steps, request.dense_layers)
    device, dtype = resolve_device(request.device), resolve_dtype(request.dtype)
    names = [METHODS.canonical(name) for name in request.methods]
    baseline = METHODS.canonical(request.baseline) if request.baseline else _default_baseline(names)
    if baseline not in names:
        raise HarnessError(f"baseline {baseline!r} must be one of the timed methods {names}")
    untimed = sorted({METHODS.canonical(name) for name in request.method_params} - set(names))
    if untimed:
        # Otherwise the parameters would be silently ignored.
        raise HarnessError(f"--param names method(s) {untimed} that are not timed (--methods {','.join(names)})")
    methods = [check_method(adapter_cls, name, request.method_params.get(name, {}), schedule, sampling, device, dtype)
               for name in names]  # fmt: skip
    request.baseline = baseline
    return methods, device, dtype


def _default_baseline(names: list[str]) -> str:
    for candidate in DENSE_METHODS:
        if candidate in names:
            return candidate
    raise HarnessError(f"no dense method among {names}; add one (e.g. sdpa) or pass --baseline")


def dense_attention_tflop(grid_tokens: int, heads: int, head_dim: int, layers: int, batch: int = 1) -> float:
    """Dense self-attention FLOPs of one forward, in TFLOP: QK^T and PV, 2 FLOPs per multiply-add."""
    return 4.0 * batch * heads * grid_tokens**2 * head_dim * layers / 1e12


def run_latency(request: LatencyRequest) -> dict[str, Any]:
    """Time every requested method on the same model and inputs; return the JSON-able result."""
    methods, device, dtype = _validate(request)
    adapter_cls = MODELS.get(request.model)
    sampling = request.sampling()
    grid = adapter_cls.token_grid(sampling)
    model = adapter_cls.load(request.weights, device, dtype)
    config = model.transformer.config
    dense_tflop = dense_attention_tflop(
        grid.tokens, config.num_attention_heads, config.attention_head_dim, adapter_cls.num_layers
    )
    with torch.inference_mode():
        latents = initial_noise((1, *adapter_cls.latent_shape(sampling)), seed=0).to(device)
        embeddings = model.encode_prompts(["a latency probe"])
        timestep = torch.tensor(LATENCY_TIMESTEP, device=device)

    results: dict[str, dict[str, Any]] = {}
    for method in methods:
        with model.use_method(method) as runtime, torch.inference_mode(), peak_memory(device) as memory:
            runtime.num_steps = request.step + 1
            for earlier in range(request.step):  # untimed: the state earlier steps leave
                runtime.step = earlier
                model.forward(latents, timestep, embeddings)
            runtime.step = request.step
            runtime.timer.pop_seconds()
            method.density.reset()
            stats, attention_seconds = measure(
                lambda runtime=runtime: model.forward(latents, timestep, embeddings),
                device,
                request.warmup,
                request.repeats,
                after_each=runtime.timer.pop_seconds,
            )
        attention_ms = sorted(s * 1e3 for s in attention_seconds)[len(attention_seconds) // 2]
        density = method.density.mean()
        entry: dict[str, Any] = {
            "params": method.params(),
            "sparsity": method.capabilities.sparsity,
            "data_dependent": method.capabilities.data_dependent,
            "forward": stats.to_dict(),
            "attention_ms_per_forward": attention_ms,
            "attention_ms_per_layer": attention_ms / adapter_cls.num_layers,
            "non_attention_ms": stats.median_ms - attention_ms,
            "peak_gib": memory["peak_gib"],
            "density": density,
            "attention_tflop_per_forward": dense_tflop * (density if density is not None else 1.0),
        }
        entry["attention_tflops"] = (
            entry["attention_tflop_per_forward"] / (attention_ms / 1e3) if attention_ms else None
        )
        if request.sample_steps > 0:
            entry["sample"] = time_sample(model, method, sampling, device)
        results[method.name] = entry

    _add_speedups(results, request.baseline or "")
    return {
        "kind": "latency",
        "spec": {"request": asdict(request), "sampling": asdict(sampling)},
        "model": request.model,
        "weights": "random" if request.weights == "random" or adapter_cls.weights_kind == "random" else "pretrained",
        "token_grid": vars(grid),
        "tokens": grid.tokens,
        "dense_attention_tflop_per_forward": dense_tflop,
        "baseline": request.baseline,
        "environment": capture_environment(device),
        "methods": results,
    }


def time_sample(model: Any, method: AttentionMethod, sampling: Sampling, device: torch.device) -> dict[str, Any]:
    """One whole sample with per-stage times: prompt encoding (and the negative prompt's when ``sampling.cfg``
    > 1, two transformer passes per step then), every denoising step, VAE decode. Per stage the first call is
    reported as warm-up; ``total_ms`` sums every call of the three stages."""
    timer = StageTimer(device)
    with model.use_method(method) as runtime, torch.inference_mode(), peak_memory(device) as memory:
        with timer.stage("prompt_encoding"):
            cond = model.encode_prompts(["a latency probe"])
        uncond = None
        if sampling.cfg > 1:
            with timer.stage("prompt_encoding"):
                uncond = model.encode_prompts([sampling.negative_prompt])
        noise = initial_noise((1, *type(model).latent_shape(sampling)), seed=0)
        latents = model.sample(noise, cond, uncond, sampling, runtime, lambda _i: timer.stage("denoise_step"))
        with timer.stage("decode"):
            model.decode(latents)
    attention_ms = runtime.timer.pop_seconds() * 1e3
    total_ms = sum(sum(timer.seconds(name)) for name in ("prompt_encoding", "denoise_step", "decode")) * 1e3
    return {
        "steps": sampling.steps,
        "cfg": sampling.cfg,
        "attention_ms": attention_ms,
        "stages": {name: stats.to_dict() for name, stats in timer.stats().items()},
        "total_ms": total_ms,
        "peak_gib": memory["peak_gib"],
    }


def _add_speedups(results: dict[str, dict[str, Any]], baseline: str) -> None:
    base = results[baseline]["forward"]["median_ms"]
    dense_present = [name for name in DENSE_METHODS if name in results]
    for entry in results.values():
        median = entry["forward"]["median_ms"]
        entry["ratio_to_baseline"] = median / base
        entry["speedup_vs_baseline"] = base / median
        entry["speedup_vs"] = {name: results[name]["forward"]["median_ms"] / median for name in dense_present}
        base_attn = results[baseline]["attention_ms_per_forward"]
        entry["attention_speedup_vs_baseline"] = (
            base_attn / entry["attention_ms_per_forward"] if entry["attention_ms_per_forward"] else None
        )


def save_latency(result: dict[str, Any], path: Path) -> None:
    from harness.atomic import write_json_atomic

    write_json_atomic(path, {**result, "status": "complete"})
