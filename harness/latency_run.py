"""``bench latency``: one transformer forward (and optionally a whole sample) per method, same inputs,
one process, speedups against a named dense baseline. Obeys :mod:`harness.latency`'s protocol.

Per method it also reports the kernel's efficiency: its attention time per call against the ideal, density x
the dense baseline's time per call (1.0: the method saves exactly the work it skips), and the TFLOP/s it
achieves on the score entries it keeps. ``compile`` times every method again under ``torch.compile`` (as
diffusers users run the transformer), beside eager, with the number of graphs and graph breaks it took.
``at_density`` times the data-dependent methods that offer it at a density the user states (their
``fixed_density`` selection) instead of what their threshold keeps on the given weights: random weights give
near-uniform attention, so a threshold keeps nearly everything. With an output file, each method's stages are saved
as they finish and a rerun of the same request measures only what an interrupted one left
(:mod:`harness.latency_resume`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.distributed import use_device
from harness.environment import capture_environment
from harness.errors import HarnessError, check_number
from harness.generate import initial_noise
from harness.latency import StageTimer, TimingStats, machine_load, measure, peak_memory, spread_warning
from harness.latency_resume import measured_stages, resumed_record, save_partial
from harness.models.base import MODELS
from harness.preflight import check_method, resolve_device, resolve_dtype
from harness.spec import Sampling
from methods import METHODS
from methods.base import AttentionMethod, Schedule

DENSE_METHODS = ("fa2", "cudnn", "sdpa", "math")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
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
    # Also time every method with the transformer under torch.compile (this mode); its first call compiles and
    # is a warm-up.
    compile: bool = False
    compile_mode: str = "default"
    compile_backend: str = "inductor"  # another torch.compile backend (e.g. eager: Dynamo's capture alone)
    # A kept fraction for the methods with a fixed-density selection (Capabilities.fixed_density).
    at_density: float | None = None

    def __post_init__(self) -> None:
        check_number("--repeats", self.repeats, ge=1)
        check_number("--warmup", self.warmup, ge=0)
        check_number("--step", self.step, ge=0, hint="a 0-based denoising step")
        check_number("--sample-steps", self.sample_steps, ge=0, hint="0: no whole sample timed")

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
    if request.compile and request.warmup < 1:
        raise HarnessError("--compile needs --warmup >= 1: the first compiled forward compiles")
    if request.compile_mode not in COMPILE_MODES:
        raise HarnessError(f"--compile-mode must be one of {', '.join(COMPILE_MODES)}, got {request.compile_mode!r}")
    if request.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise HarnessError(f"--compile-backend {request.compile_backend!r} is not a torch.compile backend; "
                           f"installed: {', '.join(torch._dynamo.list_backends())}")  # fmt: skip
    if request.compile_mode != "default" and request.compile_backend != "inductor":
        raise HarnessError(f"--compile-mode {request.compile_mode} is inductor's; the {request.compile_backend} "
                           "backend takes none")  # fmt: skip
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
    params = {name: dict(request.method_params.get(name, {})) for name in names}
    if request.at_density is not None:
        for name in fixed_density_methods(names):
            params[name]["fixed_density"] = request.at_density
    methods = [check_method(adapter_cls, name, params[name], schedule, sampling, device, dtype) for name in names]
    request.baseline = baseline
    return methods, device, dtype


def fixed_density_methods(names: list[str]) -> list[str]:
    """Those of ``names`` that take a stated density (``Capabilities.fixed_density``), for ``--at-density``.

    Raises:
        HarnessError: none of them does (the option would change nothing); the message names those that do.
    """
    fixed = [name for name in names if METHODS.get(name).capabilities.fixed_density]
    if not fixed:
        offer = sorted(n for n in METHODS.names() if METHODS.get(n).capabilities.fixed_density)
        raise HarnessError(f"--at-density applies to methods with a fixed-density selection ({', '.join(offer)});"
                           f" none of {names} has one")  # fmt: skip
    return fixed


def _default_baseline(names: list[str]) -> str:
    for candidate in DENSE_METHODS:
        if candidate in names:
            return candidate
    raise HarnessError(f"no dense method among {names}; add one (e.g. sdpa) or pass --baseline")


def dense_attention_tflop(grid_tokens: int, heads: int, head_dim: int, layers: int, batch: int = 1) -> float:
    """Dense self-attention FLOPs of one forward, in TFLOP: QK^T and PV, 2 FLOPs per multiply-add."""
    return 4.0 * batch * heads * grid_tokens**2 * head_dim * layers / 1e12


def run_latency(
    request: LatencyRequest, out: Path | None = None, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Time every requested method on the same model and inputs; return the JSON-able result.

    Args:
        request: what to time.
        out: where the result goes: the record is saved there after each method's eager, compiled and sample stage
            (``status`` "partial", :mod:`harness.latency_resume`), and the stages an earlier attempt of the same
            request saved there are not measured again. The caller writes the complete record
            (:func:`save_latency`) over it.
        log: receives one progress line per stage measured or resumed.

    Raises:
        HarnessError: a bad request, or ``out`` holding the partial result of another request (before any model is
            built).
    """
    methods, device, dtype = _validate(request)
    use_device(device)  # the timers' CUDA events record on the current device's stream
    adapter_cls = MODELS.get(request.model)
    sampling = request.sampling()
    grid = adapter_cls.token_grid(sampling)
    record: dict[str, Any] = {
        "kind": "latency",
        "spec": {"request": asdict(request), "sampling": asdict(sampling)},
        "model": request.model,
        "weights": "random" if request.weights == "random" or adapter_cls.weights_kind == "random" else "pretrained",
        "token_grid": vars(grid),
        "tokens": grid.tokens,
        "dense_attention_tflop_per_forward": None,  # from the model's config, once it is built
        "baseline": request.baseline,
        "environment": capture_environment(device),
        "machine_load": {"before": machine_load(device)},
        "warnings": [],
        "resumed": {},  # method -> its stages measured by an earlier, interrupted attempt
        "methods": {},
    }
    if out is not None:
        record = resumed_record(out, record)
    say = log or (lambda line: None)
    for name, stages in record["resumed"].items():
        say(f"{name}: {', '.join(stages)} resumed from {out}")
    results: dict[str, dict[str, Any]] = record["methods"]

    def save(line: str) -> None:
        say(line)
        if out is not None:
            save_partial(out, record)

    wanted = ["forward", *(["compiled"] if request.compile else []), *(["sample"] if request.sample_steps else [])]
    todo = {
        method.name: [stage for stage in wanted if stage not in measured_stages(results.get(method.name, {}))]
        for method in methods
    }
    if not any(todo.values()):  # a complete record of this request: returned as stored, no model built
        return _finished(record, request, device)
    model = adapter_cls.load(request.weights, device, dtype)
    config = model.transformer.config
    dense_tflop = dense_attention_tflop(
        grid.tokens, config.num_attention_heads, config.attention_head_dim, adapter_cls.num_layers
    )
    record["dense_attention_tflop_per_forward"] = dense_tflop
    with torch.inference_mode():
        latents = initial_noise((1, *adapter_cls.latent_shape(sampling)), seed=0).to(device)
        embeddings = model.encode_prompts([adapter_cls.default_prompts()[0]])  # within every model's grammar (toy)
        timestep = torch.tensor(LATENCY_TIMESTEP, device=device)

    def forward() -> torch.Tensor:
        return model.forward(latents, timestep, embeddings)

    for method in methods:
        entry = results.setdefault(method.name, {})
        pending = todo[method.name]
        if "forward" in pending or "compiled" in pending:
            with model.use_method(method) as runtime, torch.inference_mode():
                with peak_memory(device) as memory:
                    runtime.num_steps = request.step + 1
                    for earlier_step in range(request.step):  # untimed: the state earlier steps leave
                        runtime.step = earlier_step
                        forward()
                    runtime.step = request.step
                    runtime.timer.pop_seconds()
                    method.density.reset()
                    if "forward" in pending:
                        stats, attention_seconds = measure(
                            forward, device, request.warmup, request.repeats, after_each=runtime.timer.pop_seconds
                        )
                if "forward" in pending:
                    density = method.density.mean()  # eager calls only: compiled ones are not logged
                    entry.update(_eager_entry(method, stats, attention_seconds, memory["peak_gib"], density,
                                              dense_tflop, adapter_cls.num_layers))  # fmt: skip
                    save(f"{method.name}: eager forward {stats.median_ms:.4g} ms")
                if "compiled" in pending:
                    entry["compiled"] = compiled = _time_compiled(model, forward, request, device)
                    figure = compiled["error"] if "error" in compiled else f"{compiled['forward']['median_ms']:.4g} ms"
                    save(f"{method.name}: compiled forward {figure}")
        if "sample" in pending:
            entry["sample"] = time_sample(model, method, sampling, device)
            save(f"{method.name}: sample {entry['sample']['total_ms']:.4g} ms")

    return _finished(record, request, device)


def _finished(record: dict[str, Any], request: LatencyRequest, device: torch.device) -> dict[str, Any]:
    """The record with the fields derived from every method's stored stages, whichever attempt measured them."""
    _add_speedups(record["methods"], request.baseline or "")
    _add_efficiency(record["methods"], request.baseline or "")
    record["machine_load"]["after"] = machine_load(device)
    record["warnings"] = _warnings(record["methods"], record["machine_load"])
    return record


def _eager_entry(
    method: AttentionMethod,
    stats: TimingStats,
    attention_seconds: list[float],
    peak_gib: float | None,
    density: float | None,
    dense_tflop: float,
    num_layers: int,
) -> dict[str, Any]:
    """A method's eager stage: its forward's timing, attention time, memory, density and achieved TFLOP/s."""
    attention_ms = sorted(s * 1e3 for s in attention_seconds)[len(attention_seconds) // 2]
    entry: dict[str, Any] = {
        "params": method.params(),
        "sparsity": method.capabilities.sparsity,
        "data_dependent": method.capabilities.data_dependent,
        # A kept fraction the user stated (--at-density, or the method's fixed_density parameter): the density
        # is then not what the method's own selection would keep on these weights.
        "density_fixed_by_user": method.params().get("fixed_density"),
        "forward": stats.to_dict(),
        "attention_ms_per_forward": attention_ms,
        "attention_ms_per_layer": attention_ms / num_layers,
        "non_attention_ms": stats.median_ms - attention_ms,
        "peak_gib": peak_gib,
        "density": density,
        "attention_tflop_per_forward": dense_tflop * (density if density is not None else 1.0),
    }
    entry["attention_tflops"] = entry["attention_tflop_per_forward"] / (attention_ms / 1e3) if attention_ms else None
    return entry


def _time_compiled(
    model: Any, forward: Callable[[], torch.Tensor], request: LatencyRequest, device: torch.device
) -> dict[str, Any]:
    """The same forward with the transformer under ``torch.compile`` (the method's state from the eager run
    kept): its timing, the graphs and graph breaks Dynamo made, and its output's distance to eager.

    A method that fails to compile is recorded with its error, so that the other methods are still timed.
    """
    from torch._dynamo.utils import counters

    reference = forward()
    eager_transformer = model.transformer
    torch._dynamo.reset()  # no cache or recompile budget carried over from the previous method
    counters.clear()
    mode = None if request.compile_mode == "default" else request.compile_mode
    model.transformer = torch.compile(eager_transformer, backend=request.compile_backend, mode=mode)
    try:
        with peak_memory(device) as memory:
            stats, _ = measure(forward, device, request.warmup, request.repeats)
            out = forward()
    except Exception as exc:  # recorded in the result, beside the methods that did compile
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return {"backend": request.compile_backend, "mode": request.compile_mode,
                "error": f"{type(exc).__name__}: {message}"}  # fmt: skip
    finally:
        model.transformer = eager_transformer
    graphs = int(counters["stats"]["unique_graphs"])
    graph_breaks = int(sum(counters["graph_break"].values()))
    difference = (out.double() - reference.double()).norm() / reference.double().norm().clamp_min(1e-30)
    return {
        "backend": request.compile_backend,
        "mode": request.compile_mode,
        "forward": stats.to_dict(),
        "graphs": graphs,
        "graph_breaks": graph_breaks,
        "fullgraph": graphs == 1 and graph_breaks == 0,
        "peak_gib": memory["peak_gib"],
        # Methods with state that moves from call to call (svg's sampled rows, svg2's centroids) differ here by more
        # than rounding: the two outputs come from different calls.
        "rel_error_vs_eager": float(difference),
    }


# Per model, the latent shapes whose prompt encoding and decode have run once (untimed) in this process.
_WARM_STAGES: weakref.WeakKeyDictionary[Any, set[tuple[int, ...]]] = weakref.WeakKeyDictionary()


def _warm_up_stages(model: Any, sampling: Sampling) -> None:
    """Prompt encoding and VAE decode once, untimed, per model and latent shape (inference mode): their first call
    in a process pays one-time costs (lazy initialisation, the decoder's convolution algorithm search) that no later
    sample pays, so whichever sample ran first would carry them."""
    shape = tuple(type(model).latent_shape(sampling))
    warm = _WARM_STAGES.setdefault(model, set())
    if shape in warm:
        return
    model.encode_prompts([type(model).default_prompts()[0]])
    model.decode(initial_noise((1, *shape), seed=0))
    warm.add(shape)


def time_sample(
    model: Any, method: AttentionMethod, sampling: Sampling, device: torch.device, decode: bool = True
) -> dict[str, Any]:
    """One whole sample with per-stage times: prompt encoding (and the negative prompt's when ``sampling.cfg``
    > 1, two transformer passes per step then), every denoising step, VAE decode (``decode`` False: left out,
    where a caller times it once for several samples of the same shape). Encoding and decode are warmed up once
    per model and latent shape before the first timed sample (:func:`_warm_up_stages`); per stage the first
    timed call is still reported as warm-up, and ``total_ms`` sums every timed call of the stages run."""
    timer = StageTimer(device)
    with model.use_method(method) as runtime, torch.inference_mode(), peak_memory(device) as memory:
        _warm_up_stages(model, sampling)
        with timer.stage("prompt_encoding"):
            cond = model.encode_prompts([type(model).default_prompts()[0]])
        uncond = None
        if sampling.cfg > 1:
            with timer.stage("prompt_encoding"):
                uncond = model.encode_prompts([sampling.negative_prompt])
        noise = initial_noise((1, *type(model).latent_shape(sampling)), seed=0)
        latents = model.sample(noise, cond, uncond, sampling, runtime, lambda _i: timer.stage("denoise_step"))
        if decode:
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
        "stage_warm_up": "encode and decode once per model and latent shape, untimed, before the first sample",
    }


def _add_speedups(results: dict[str, dict[str, Any]], baseline: str) -> None:
    base = results[baseline]["forward"]["median_ms"]
    base_compiled = _compiled_median(results[baseline])
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
        compiled = _compiled_median(entry)
        if compiled is not None:
            entry["compiled"]["speedup_vs_eager"] = median / compiled
            entry["compiled"]["speedup_vs_baseline"] = base_compiled / compiled if base_compiled else None


def _compiled_median(entry: dict[str, Any]) -> float | None:
    return entry.get("compiled", {}).get("forward", {}).get("median_ms")


def _add_efficiency(results: dict[str, dict[str, Any]], baseline: str) -> None:
    """Kernel efficiency per method: the ideal time per attention call (density x the dense baseline's, at batch
    1 one call per layer) over the measured one; None where the ideal is zero (linear attention forms no score)."""
    base_call = results[baseline]["attention_ms_per_layer"]
    for entry in results.values():
        density, measured = entry["density"], entry["attention_ms_per_layer"]
        ideal = density * base_call if density else None
        entry["ideal_attention_ms_per_layer"] = ideal
        entry["kernel_efficiency"] = ideal / measured if ideal and measured else None


def _warnings(results: dict[str, dict[str, Any]], load: dict[str, dict[str, Any]]) -> list[str]:
    """Figures whose spread exceeds their median, and a machine busier than its CPUs (see harness.latency)."""
    figures = [(f"{name} forward", entry["forward"]) for name, entry in results.items()]
    figures += [(f"{name} compiled forward", e["compiled"]["forward"]) for name, e in results.items()
                if "forward" in e.get("compiled", {})]  # fmt: skip
    warnings = [w for w in (spread_warning(name, stats) for name, stats in figures) if w]
    for when, state in load.items():
        if state["loaded"]:
            warnings.append(
                f"machine loaded {when.replace('_', ' ')} the run: 1-minute load {state['loadavg_1_5_15'][0]:.2f} on "
                f"{state['cpus_usable']} usable CPUs; other work shares the timings"
            )
    return warnings


def save_latency(result: dict[str, Any], path: Path) -> None:
    from harness.atomic import write_json_atomic

    write_json_atomic(path, {**result, "status": "complete"})
