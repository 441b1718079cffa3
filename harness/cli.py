"""The ``bench`` command line: parse options, build a spec, call one harness function, print.

Every subcommand prints a rich table or a one-line summary, and ``--json`` prints the
machine-readable result instead. User errors exit with code 2 and one clear message.
"""

from __future__ import annotations

import functools
import json
import math
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from harness import strict_json
from harness.errors import HarnessError

if TYPE_CHECKING:
    from harness.eval.suites import EvalOptions
    from harness.spec import RunSpec

app = typer.Typer(
    name="bench",
    help="Benchmark and ablate efficient attention in video diffusion transformers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
RunsDirOpt = Annotated[Path, typer.Option("--runs-dir", help="Folder of run records and artifacts.")]
PromptDirOpt = Annotated[
    Path | None,
    typer.Option(
        help="Folder of the VBench prompt lists (default: $BENCH_VBENCH_PROMPTS; a checkout's "
        "../shared/data/vbench has them)."
    ),
]
DimensionsOpt = Annotated[
    str | None,
    typer.Option(help="Comma-separated VBench / VBench-2.0 dimensions (default: those of the run's prompt set)."),
]
CacheOpt = Annotated[
    Path | None,
    typer.Option(
        "--cache",
        help="Evaluator cache: venvs and weights (default: $BENCH_VBENCH_CACHE or ~/.cache/attention-bench/vbench).",
    ),
]


def user_errors(fn: F) -> F:
    """Every command's wrapper: :class:`HarnessError` becomes a one-line message and exit code 2 (no
    traceback), and under ``--json`` the console's notes and summaries go to stderr, so that stdout
    carries the JSON only."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        console.stderr = bool(kwargs.get("as_json"))
        try:
            _check_finite(kwargs)
            return fn(*args, **kwargs)
        except HarnessError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
            raise typer.Exit(2) from None
        finally:
            console.stderr = False

    return wrapper  # type: ignore[return-value]


def _check_finite(options: dict[str, Any]) -> None:
    """No option takes NaN or infinity (click's float parses both): refuse them by the option's name, for every
    command at once; the configs the options fill check each value's range."""
    for name, value in options.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise HarnessError(f"--{name.replace('_', '-')} must be a finite number, got {value}")


def _prompt_lines(prompt_file: Path | None) -> tuple[str, ...] | None:
    """The non-empty lines of ``--prompt-file`` (None when not given)."""
    from harness.io_checks import existing_input

    if prompt_file is None:
        return None
    text = existing_input(prompt_file, "--prompt-file", folder=False).read_text()
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def _print_json(payload: Any) -> None:
    sys.stdout.write(strict_json.encode(payload) + "\n")


def _parse_ints(text: str | None, what: str) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise HarnessError(f"{what} must be a comma-separated list of integers, got {text!r}") from None


def _parse_params(pairs: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` pairs as text; the method's schema types them (:meth:`AttentionMethod.parse_params`)."""
    params: dict[str, str] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise HarnessError(f"--param takes KEY=VALUE, got {pair!r}")
        params[key] = raw
    return params


def _method_params(method: str, pairs: list[str]) -> dict[str, Any]:
    """``--param`` pairs typed by ``method``'s schema: what the spec records (so spellings hash alike)."""
    from methods import METHODS

    return METHODS.get(method).parse_params(_parse_params(pairs))


def _per_method_params(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """``METHOD.KEY=VALUE`` pairs grouped by (canonical) method name, typed by each method's schema."""
    grouped: dict[str, list[str]] = {}
    for pair in pairs:
        method, dot, rest = pair.partition("=")[0].partition(".")
        if not dot or not method or not rest:
            raise HarnessError(f"--param takes METHOD.KEY=VALUE here (e.g. linvideo.linear_layers=[1,2]), got {pair!r}")
        grouped.setdefault(_canonical_method(method), []).append(pair.removeprefix(f"{method}."))
    return {method: _method_params(method, method_pairs) for method, method_pairs in grouped.items()}


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    table = Table(title=title, show_lines=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*[_fmt(value) for value in row])
    return table


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


# -- listing -----------------------------------------------------------------------------------


@app.command("methods")
@user_errors
def methods_cmd(as_json: JsonOpt = False) -> None:
    """List attention methods and what each supports (devices, dtypes, sparsity, training)."""
    from methods import METHODS

    rows = []
    for name in METHODS.names():
        cls = METHODS.get(name)
        caps = cls.capabilities
        rows.append(
            {
                "name": name,
                "aliases": METHODS.aliases_of(name),
                "devices": list(caps.devices),
                "dtypes": [str(d).removeprefix("torch.") for d in caps.dtypes],
                "sparsity": caps.sparsity,
                "data_dependent": caps.data_dependent,
                "needs_training": caps.needs_training,
                "needs_calibration": caps.needs_calibration,
                "notes": caps.notes,
                "parameters": [param.describe() for param in cls.parameters],
            }
        )
    if as_json:
        _print_json(rows)
        return
    for row in rows:  # the table names the parameters; --json gives their types, ranges and help
        row["parameters"] = [param["name"] for param in row["parameters"]]
    columns = ["name", "aliases", "devices", "dtypes", "sparsity", "data_dependent", "needs_training", "notes",
               "parameters"]  # fmt: skip
    console.print(
        _table(
            "attention methods (--json: each parameter's type, default, range, help)",
            columns,
            [[", ".join(r[c]) if isinstance(r[c], list) else r[c] for c in columns] for r in rows],
        )
    )


@app.command("models")
@user_errors
def models_cmd(as_json: JsonOpt = False) -> None:
    """List model adapters: layers, default sampling, token count, where weights come from."""
    from harness.models import MODELS

    rows = []
    for name in MODELS.names():
        cls = MODELS.get(name)
        d = cls.defaults
        rows.append(
            {
                "name": name,
                "aliases": MODELS.aliases_of(name),
                "description": cls.description,
                "layers": cls.num_layers,
                "weights": cls.weights_kind,
                "hub_id": getattr(cls, "hub_id", ""),
                "default_video": f"{d.height}x{d.width}x{d.frames}",
                "tokens": cls.token_grid(d).tokens,
                "steps": d.steps,
                "cfg": d.cfg,
                "shift": d.shift,
                "fps": d.fps,
            }
        )
    if as_json:
        _print_json(rows)
        return
    columns = ["name", "layers", "default_video", "tokens", "steps", "cfg", "shift", "weights", "description"]
    console.print(_table("models", columns, [[r[c] for c in columns] for r in rows]))


# -- run ---------------------------------------------------------------------------------------


@app.command("run")
@user_errors
def run_cmd(
    method: Annotated[str, typer.Option(help="Attention method (see `bench methods`).")] = "sdpa",
    model: Annotated[str, typer.Option(help="Model adapter (see `bench models`).")] = "toy",
    prompt: Annotated[
        list[str] | None,
        typer.Option(help="A prompt; repeat for several. Default: the model's (toy: its 64 held-out prompts)."),
    ] = None,
    seeds: Annotated[
        str, typer.Option(help="Comma-separated seeds; each gives the same noise for every method.")
    ] = "0",
    steps: Annotated[int | None, typer.Option(help="Denoising steps (default: the model's).")] = None,
    cfg: Annotated[float | None, typer.Option(help="Classifier-free guidance scale; 1 disables CFG.")] = None,
    shift: Annotated[float | None, typer.Option(help="Flow-matching timestep shift.")] = None,
    height: Annotated[int | None, typer.Option(help="Video height in pixels.")] = None,
    width: Annotated[int | None, typer.Option(help="Video width in pixels.")] = None,
    frames: Annotated[int | None, typer.Option(help="Video frames (Wan: 4k+1).")] = None,
    fps: Annotated[int | None, typer.Option(help="Frames per second of the written mp4.")] = None,
    negative_prompt: Annotated[str, typer.Option(help="Negative prompt for the CFG branch.")] = "",
    weights: Annotated[str, typer.Option(help="Local diffusers folder or hub id (default: the model's hub id).")] = "",
    random_weights: Annotated[bool, typer.Option(help="Real architecture, random weights: latency only.")] = False,
    download: Annotated[bool, typer.Option(help="Allow fetching weights from the hub (offline otherwise).")] = False,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto (bf16 on GPU, fp32 on CPU).")] = "auto",
    dense_warmup_steps: Annotated[int, typer.Option(help="First steps that run dense attention.")] = 0,
    dense_layers: Annotated[str, typer.Option(help="Comma-separated layers (0-based) that always run dense.")] = "",
    param: Annotated[
        list[str] | None,
        typer.Option(help="Method parameter KEY=VALUE, typed by the method (`bench methods --json`); repeatable."),
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="Method state to load, e.g. a converted LinVideo folder; a dmd2 generator's folder also sets its "
            "steps, CFG 1 and shift. linvideo on toy without it: the default conversion, trained once and cached "
            "($ATTENTION_BENCH_CACHE, else ~/.cache/attention-bench)."
        ),
    ] = None,
    eval_suites: Annotated[
        str | None,
        typer.Option(
            "--eval",
            help="Comma-separated metric suites to score the videos with (toybench); 'none' for none. "
            "Default: the model's (toy: toybench).",
        ),
    ] = None,
    protocol: Annotated[
        str | None,
        typer.Option(
            help="Evaluation protocol (linvideo-vbench, linvideo-vbench2): fixes the prompts, videos per "
            "prompt, sampling and suite."
        ),
    ] = None,
    prompt_set: Annotated[
        str | None, typer.Option(help="Named prompts: vbench:paper8, vbench:<dimension> or vbench2:<dimension>.")
    ] = None,
    augmented: Annotated[
        str | None,
        typer.Option(help="Generate from the line-aligned extended prompts (wan); videos keep the unaugmented names."),
    ] = None,
    prompt_dir: PromptDirOpt = None,
    dimensions: DimensionsOpt = None,
    evaluator_cache: CacheOpt = None,
    eval_device: Annotated[
        str | None, typer.Option(help="Device of the VBench evaluator (default: the run's device).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option(help="Print the plan (prompts, videos, estimated GPU hours) and generate nothing.")
    ] = False,
    step_time_from: Annotated[
        Path | None,
        typer.Option(help="Latency or run record giving the forward time of the estimate (default: reports/)."),
    ] = None,
    runs_dir: RunsDirOpt = Path("runs"),
    force: Annotated[bool, typer.Option(help="Rerun even if this exact spec already finished.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Generate videos for prompts x seeds with one method and write one record (skips finished specs)."""
    from harness.checkpoints import checkpoint_sampling
    from harness.eval.suites import EvalOptions
    from harness.generate import run
    from harness.models import MODELS
    from harness.protocols import PROTOCOLS, named_prompt_specs
    from harness.spec import RunSpec, Sampling

    adapter_cls = MODELS.get(model)
    chosen_protocol = PROTOCOLS.get(protocol) if protocol else None
    d = _protocol_defaults(
        adapter_cls.defaults,
        chosen_protocol,
        dict(steps=steps, cfg=cfg, height=height, width=width, frames=frames, fps=fps),
    )
    d = replace(d, **checkpoint_sampling(checkpoint))  # a few-step generator's own steps, CFG 1 and shift
    sampling = Sampling(
        steps=d.steps if steps is None else steps,
        cfg=d.cfg if cfg is None else cfg,
        shift=d.shift if shift is None else shift,
        height=d.height if height is None else height,
        width=d.width if width is None else width,
        frames=d.frames if frames is None else frames,
        fps=d.fps if fps is None else fps,
        negative_prompt=negative_prompt,
    )
    if random_weights and weights:
        raise HarnessError("pass either --weights or --random-weights, not both")
    spec = RunSpec(
        model=MODELS.canonical(model),
        method=_canonical_method(method),
        sampling=sampling,
        prompts=tuple(prompt or adapter_cls.default_prompts()),
        seeds=_parse_ints(seeds, "--seeds"),
        device=_resolved_device(device),
        dtype=_resolved_dtype(dtype, device),
        weights=_weights_value(weights, random_weights, adapter_cls.weights_kind),
        method_params=_method_params(_canonical_method(method), param or []),
        dense_warmup_steps=dense_warmup_steps,
        dense_layers=_parse_ints(dense_layers, "--dense-layers"),
        checkpoint=str(checkpoint) if checkpoint else None,
        eval_suites=_eval_suites(
            eval_suites, (chosen_protocol.suite,) if chosen_protocol else adapter_cls.default_eval
        ),
        eval_params=_eval_params(dimensions, eval_suites),
    )
    specs = named_prompt_specs(spec, chosen_protocol, prompt_set, augmented, prompt_dir, seeds_given=seeds != "0")
    options = EvalOptions(dimensions=_parse_names(dimensions), cache=evaluator_cache, device=eval_device or spec.device)
    if dry_run:
        _print_plan(specs, options, step_time_from, as_json, download)
        return
    for spec in specs:
        if spec.method == "linvideo" and spec.checkpoint is None and adapter_cls.weights_kind == "builtin":
            spec = replace(spec, checkpoint=str(_default_linvideo(spec, options, progress and not as_json)))
        outcome = run(
            spec,
            runs_dir,
            force=force,
            allow_download=download,
            show_progress=progress and not as_json,
            eval_options=options,
        )
        if as_json:
            _print_json({"skipped": outcome.skipped, "path": str(outcome.path), "record": outcome.record})
            continue
        rec = outcome.record
        verb = "skipped (already finished; --force reruns)" if outcome.skipped else "done"
        latency, resumed = rec["latency"], rec.get("resumed_videos", 0)
        timing = (
            f"step {_fmt(latency['stages']['denoise_step']['median_ms'])} ms median, "
            f"{_fmt(latency['end_to_end_ms_per_video'] / 1e3)} s/video"
            if latency["end_to_end_ms_per_video"] is not None
            else "untimed (an earlier, interrupted attempt made every video)"
        )
        console.print(
            f"[bold]{spec.model} / {spec.method}[/] {verb}: {len(rec['artifacts']['videos'])} video(s)"
            f"{f' ({resumed} resumed)' if resumed else ''}, {timing}, "
            f"density {_fmt(rec['density']['mean'])} -> {outcome.path}"
        )


def _protocol_defaults(defaults: Any, protocol: Any, given: dict[str, Any]) -> Any:
    """The model's default sampling with a protocol's fixed settings; an option contradicting one is refused."""
    from dataclasses import replace

    if protocol is None:
        return defaults
    for name, value in given.items():
        if value is not None and name in protocol.sampling and value != protocol.sampling[name]:
            raise HarnessError(f"--protocol {protocol.name} fixes {name} = {protocol.sampling[name]}; drop --{name}")
    return replace(defaults, **protocol.sampling)


def _parse_names(text: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


def _eval_params(dimensions: str | None, eval_suites: str | None) -> dict[str, Any]:
    """``{suite: {"dimensions": [...]}}`` for the one benchmark suite named with --eval."""
    names = _parse_names(dimensions)
    if not names:
        return {}
    benchmarks = [s for s in _parse_names(eval_suites) if s in ("vbench", "vbench2")]
    if len(benchmarks) != 1:
        raise HarnessError("--dimensions goes with exactly one of --eval vbench or --eval vbench2")
    return {benchmarks[0]: {"dimensions": list(names)}}


def _print_plan(specs: list[Any], options: Any, step_time_from: Path | None, as_json: bool, download: bool) -> None:
    from harness.models import MODELS
    from harness.plan import measured_forward, plan
    from harness.preflight import preflight

    first = specs[0]
    tokens = MODELS.get(first.model).token_grid(first.sampling).tokens
    result = plan(specs, tokens, measured_forward(first.model, first.method, tokens, step_time_from))
    problems = []
    for spec in specs[:1]:  # one check covers them all: the runs differ only in prompts and seeds
        try:
            preflight(spec, options, allow_download=download)
        except HarnessError as exc:
            problems.append(str(exc))
    result["problems_before_a_real_run"] = problems
    if as_json:
        _print_json(result)
        return
    rows = [
        [r["prompt_set"], r["prompts"], r["videos_per_prompt"], r["videos"], r["gpu_hours"]] for r in result["runs"]
    ]
    title = f"plan: {result['model']} / {result['method']}" + (
        f", protocol {result['protocol']}" if result["protocol"] else ""
    )
    console.print(_table(title, ["prompt set", "prompts", "videos/prompt", "videos", "GPU hours"], rows))
    console.print(
        f"sampling: {result['sampling']} ({tokens} tokens); eval: {', '.join(first.eval_suites) or 'none'}",
        soft_wrap=True,
    )
    st = result["step_time"]
    if st:
        console.print(
            f"estimate: {result['total_videos']} videos, {_fmt(result['gpu_hours'])} GPU hours "
            f"({result['estimate_covers']}) from a {st['method']} forward of {_fmt(st['forward_ms'])} ms measured on "
            f"{st['device']} ({st['source']}){'; ' + st['note'] if st['note'] else ''}",
            soft_wrap=True,
        )
    else:
        console.print(
            f"{result['total_videos']} videos; no measured forward time for {first.model} at {tokens} "
            "tokens: run `bench latency --out` on the GPU, or pass --step-time-from"
        )
    for problem in problems:
        console.print(f"[yellow]a real run would stop here:[/] {problem}", soft_wrap=True)


def _default_linvideo(spec: RunSpec, options: EvalOptions, show_progress: bool) -> Path:
    """Validate the run, then train (once; cached) the default LinVideo conversion of the built-in teacher."""
    from harness.preflight import preflight
    from harness.training import cache_dir, default_checkpoint

    preflight(spec, options, checkpoint_to_come=True)
    console.print(
        f"no --checkpoint: using the default LinVideo conversion of {spec.model} (the one shipped beside the "
        f"teacher if the recipe matches, else trained once and cached in {cache_dir() / 'linvideo'})"
    )
    return default_checkpoint(spec.model, spec.device, show_progress)


def _eval_suites(option: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    from harness.eval.suites import SUITES

    if option is None:
        return default
    names = [name.strip() for name in option.split(",") if name.strip()]
    return () if names == ["none"] else tuple(SUITES.canonical(name) for name in names)


def _weights_value(weights: str, random_weights: bool, weights_kind: str) -> str:
    """The spec's weights field: "random", the adapter's own kind, or a folder / hub id ("" = default)."""
    if random_weights:
        return "random"
    if weights_kind == "random":
        if weights:
            raise HarnessError("--weights does not apply to a model built from its own seeded random config")
        return weights_kind
    if weights_kind == "builtin":
        return weights or "builtin"
    return weights


def _canonical_method(name: str) -> str:
    from methods import METHODS

    return METHODS.canonical(name)


def _resolved_device(name: str) -> str:
    from harness.preflight import resolve_device

    return str(resolve_device(name))


def _resolved_dtype(name: str, device: str) -> str:
    if name != "auto":
        return name
    return "bfloat16" if _resolved_device(device).startswith("cuda") else "float32"


# -- latency, check ----------------------------------------------------------------------------


@app.command("latency")
@user_errors
def latency_cmd(
    model: Annotated[str, typer.Option(help="Model adapter.")] = "wan-tiny",
    methods: Annotated[
        str, typer.Option(help="Comma-separated methods, timed in one process on the same inputs.")
    ] = "sdpa,math",
    random_weights: Annotated[bool, typer.Option(help="Real architecture with random weights (latency only).")] = False,
    weights: Annotated[
        str, typer.Option(help="Local diffusers folder or hub id (ignored with --random-weights).")
    ] = "",
    height: Annotated[int | None, typer.Option(help="Video height in pixels (default: the model's).")] = None,
    width: Annotated[int | None, typer.Option(help="Video width in pixels.")] = None,
    frames: Annotated[int | None, typer.Option(help="Video frames (Wan: 4k+1).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto.")] = "auto",
    warmup: Annotated[int, typer.Option(help="Warm-up forwards per method (reported, not in the statistics).")] = 2,
    repeats: Annotated[int, typer.Option(help="Timed forwards per method (median and spread).")] = 5,
    baseline: Annotated[
        str | None,
        typer.Option(
            help="Dense method speedups are computed against (default: fa2, cudnn, sdpa, math: first present)."
        ),
    ] = None,
    sample_steps: Annotated[
        int, typer.Option(help="Also time one whole sample with this many steps (0: forward only).")
    ] = 0,
    dense_layers: Annotated[str, typer.Option(help="Comma-separated layers kept dense for every method.")] = "",
    step: Annotated[
        int,
        typer.Option(
            help="Denoising step (0-based) the forward is timed at; earlier steps run once, untimed, "
            "so that state carried across steps is there (e.g. 1 for dfa's windowed or reused steps)."
        ),
    ] = 0,
    param: Annotated[
        list[str] | None,
        typer.Option(
            help="A method's parameter METHOD.KEY=VALUE (`bench methods --json` lists them), "
            "e.g. linvideo.linear_layers=[1,2]."
        ),
    ] = None,
    compile: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="Also time every method (dense included) with the transformer under torch.compile, beside eager; "
            "records the graphs and graph breaks each took. Needs --warmup >= 1 (the first call compiles).",
        ),
    ] = False,
    compile_mode: Annotated[
        str, typer.Option(help="torch.compile mode with --compile: default, reduce-overhead, max-autotune, ...")
    ] = "default",
    compile_backend: Annotated[
        str, typer.Option(help="torch.compile backend with --compile (eager: Dynamo's graph capture alone).")
    ] = "inductor",
    at_density: Annotated[
        float | None,
        typer.Option(
            help="Time the data-dependent methods that offer it (xattn, svg2) at this kept fraction, e.g. the "
            "density their paper reports, instead of what their threshold keeps on random weights (nearly all).",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Write the JSON result here, after each method's stage too (status partial until the end); a rerun "
            "of the same request resumes it, measuring only what it lacks."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Time one transformer forward per method (and optionally a full sample); speedups vs a dense baseline."""
    from harness.latency_run import LatencyRequest, run_latency, save_latency
    from harness.models import MODELS

    adapter_cls = MODELS.get(model)
    request = LatencyRequest(
        model=MODELS.canonical(model),
        methods=[m.strip() for m in methods.split(",") if m.strip()],
        weights="random" if random_weights or adapter_cls.weights_kind == "random" else weights,
        height=height,
        width=width,
        frames=frames,
        dtype=_resolved_dtype(dtype, device),
        device=_resolved_device(device),
        warmup=warmup,
        repeats=repeats,
        baseline=baseline,
        sample_steps=sample_steps,
        dense_layers=_parse_ints(dense_layers, "--dense-layers"),
        method_params=_per_method_params(param or []),
        step=step,
        compile=compile,
        compile_mode=compile_mode,
        compile_backend=compile_backend,
        at_density=at_density,
    )
    if out is not None:
        from harness.io_checks import ensure_writable_file

        ensure_writable_file(out)
    result = run_latency(request, out, log=lambda line: err_console.print(line, soft_wrap=True, highlight=False))
    if out is not None:
        save_latency(result, out)
    for warning in result["warnings"]:
        err_console.print(f"[yellow]warning:[/] {warning}", soft_wrap=True)
    if as_json:
        _print_json(result)
        return
    _print_latency(result)
    if out is not None:
        console.print(f"wrote {out}")


def _print_latency(result: dict[str, Any]) -> None:
    env = result["environment"]
    title = (
        f"{result['model']} ({result['weights']} weights), {result['tokens']} tokens, "
        f"{env['device_name']}, baseline {result['baseline']}"
    )
    # Narrow headers and no empty memory column (CPU): the table should fit 80 columns.
    with_memory = any(e["peak_gib"] is not None for e in result["methods"].values())
    columns = ["method", "fwd ms", "p25-p75", "attn/layer", "density", "effic.", "TFLOP/s", "speedup"]
    rows = [
        [
            name,
            e["forward"]["median_ms"],
            f"{e['forward']['p25_ms']:.3g}-{e['forward']['p75_ms']:.3g}",
            e["attention_ms_per_layer"],
            f"{_fmt(e['density'])} (fixed)" if e.get("density_fixed_by_user") is not None else e["density"],
            e.get("kernel_efficiency"),
            e["attention_tflops"],
            e["speedup_vs_baseline"],
        ]
        + ([e["peak_gib"]] if with_memory else [])
        for name, e in result["methods"].items()
    ]
    columns += ["peak GiB"] if with_memory else []
    console.print(_table(title, columns, rows))
    console.print(
        "attn/layer: attention ms per layer (one call); effic.: density x the baseline's attn/layer over the "
        "method's (1 = it saves exactly the work it skips); TFLOP/s on the kept score entries"
    )
    compiled = {name: e["compiled"] for name, e in result["methods"].items() if "compiled" in e}
    if compiled:
        rows = [
            [name, "error", None, None, None, c["error"]] if "error" in c else
            [name, c["forward"]["median_ms"], f"{c['forward']['p25_ms']:.4g}-{c['forward']['p75_ms']:.4g}",
             c["speedup_vs_eager"], c["speedup_vs_baseline"], f"{c['graphs']}/{c['graph_breaks']}"]
            for name, c in compiled.items()
        ]  # fmt: skip
        first = next(iter(compiled.values()))
        title = f"compiled ({first['backend']}, mode {first['mode']})"
        console.print(_table(title, ["method", "forward ms", "p25-p75", "vs eager", "speedup", "graphs/breaks"], rows))


@app.command("check")
@user_errors
def check_cmd(
    baseline: Annotated[Path, typer.Option(help="A `bench latency --out` JSON to compare against.")],
    tolerance: Annotated[float, typer.Option(help="Allowed relative growth of a method's time ratio to dense.")] = 0.10,
    repeats: Annotated[int | None, typer.Option(help="Override the baseline's number of timed repeats.")] = None,
    confirm: Annotated[
        int,
        typer.Option(
            help="Re-measure a failed check up to N more times; a method regresses only if it regressed in "
            "every measurement (a shared machine's load slows some kernels more than others)."
        ),
    ] = 1,
    as_json: JsonOpt = False,
) -> None:
    """Re-measure a baseline's methods here; exit 1 if a method's time ratio to dense regressed."""
    from harness.check import check

    if repeats is not None and repeats < 1:
        raise HarnessError(f"--repeats must be >= 1, got {repeats}")
    verdicts, current, attempts = check(baseline, tolerance, {"repeats": repeats} if repeats else None, confirm)
    failed = [v for v in verdicts if v.regressed]
    if as_json:
        _print_json(
            {
                "passed": not failed,
                "tolerance": tolerance,
                "measurements": [{v.method: v.new_ratio for v in attempt} for attempt in attempts],
                "verdicts": [
                    {
                        "method": v.method,
                        "old_ratio": v.old_ratio,
                        "new_ratio": v.new_ratio,
                        "limit": v.limit,
                        "regressed": v.regressed,
                    }
                    for v in verdicts
                ],
            }
        )
    else:
        rows = [
            [v.method, v.old_ratio, v.new_ratio, f"{v.change:+.1%}", "REGRESSED" if v.regressed else "ok"]
            for v in verdicts
        ]
        console.print(
            _table(
                f"latency check vs {baseline} (tolerance {tolerance:.0%}, ratio = time / {current['baseline']}, "
                f"lowest of {len(attempts)} measurement{'s' if len(attempts) > 1 else ''})",
                ["method", "old ratio", "new ratio", "change", "verdict"],
                rows,
            )
        )
        console.print("[bold red]FAILED[/]" if failed else "[bold green]passed[/]")
    if failed:
        raise typer.Exit(1)


# -- the training engine's layout (bench toy train, bench train) ---------------------------------

AccumulationOpt = Annotated[
    int, typer.Option(help="Micro-batches per rank and step: the global batch is batch size x ranks x this.")
]
GlobalBatchOpt = Annotated[
    int, typer.Option(help="The global batch this run must have (checked against the launch); 0: any.")
]
FsdpOpt = Annotated[
    str, typer.Option(help="FSDP2 per transformer block: auto (when torchrun starts more than one rank), on or off.")
]
Bf16Opt = Annotated[
    bool, typer.Option(help="bf16 compute on CUDA with fp32 master weights and reductions (--no-bf16: fp32).")
]

# -- toy world ---------------------------------------------------------------------------------

toy_app = typer.Typer(help="The embedded toy world: train (reproduce) the shipped teacher.", no_args_is_help=True)
app.add_typer(toy_app, name="toy")


@toy_app.command("train")
@user_errors
def toy_train_cmd(
    out: Annotated[Path, typer.Option(help="Folder for the resumable training state and toy_teacher.safetensors.")],
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 18000,
    batch_size: Annotated[int, typer.Option(help="Clips per step.")] = 256,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate (cosine schedule, linear warm-up).")] = 8e-4,
    warmup_steps: Annotated[int, typer.Option(help="Steps of linear learning-rate warm-up.")] = 500,
    seed: Annotated[int, typer.Option(help="Seed of the weights, the data and the noise.")] = 0,
    width: Annotated[int, typer.Option(help="Transformer width (a multiple of the head size, 32).")] = 128,
    layers: Annotated[int, typer.Option(help="Transformer blocks.")] = 8,
    ffn_dim: Annotated[int, typer.Option(help="Hidden size of each block's feed-forward network.")] = 256,
    checkpoint_dtype: Annotated[
        str, typer.Option(help="Precision of the written teacher: float32, float16 or bfloat16.")
    ] = "float32",
    pool_size: Annotated[int, typer.Option(help="Pre-rendered training clips held on the device.")] = 40000,
    eval_every: Annotated[int, typer.Option(help="Score the EMA teacher with ToyBench every N steps.")] = 4000,
    eval_clips: Annotated[int, typer.Option(help="Held-out prompts sampled per evaluation.")] = 32,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    init_from: Annotated[
        Path | None,
        typer.Option(help="Start from this toy teacher's weights (a later stage of the recipe; fresh optimizer)."),
    ] = None,
    compile_model: Annotated[
        bool, typer.Option("--compile/--no-compile", help="torch.compile the training forward (CUDA only).")
    ] = True,
    checkpoint_every: Annotated[
        int, typer.Option(help="Write a resumable checkpoint (and the teacher) every N steps.")
    ] = 1000,
    sync_every: Annotated[int, typer.Option(help="Read the loss on the host (NaN check) every N steps.")] = 50,
    log_every: Annotated[int, typer.Option(help="Print a log line every N steps (a multiple of --sync-every).")] = 500,
    accumulation: AccumulationOpt = 1,
    global_batch: GlobalBatchOpt = 0,
    fsdp: FsdpOpt = "auto",
    bf16: Bf16Opt = True,
    activation_checkpointing: Annotated[bool, typer.Option(help="Recompute each block's activations.")] = False,
) -> None:
    """Train the toy teacher (seeded, resumable: rerun the same command to continue; torchrun: one rank per GPU)."""
    from harness.checkpoints import file_sha256
    from harness.distributed import current_ranks
    from harness.io_checks import ensure_writable_dir
    from harness.preflight import resolve_device
    from harness.toyworld.train import ToyTrainConfig, train

    config = ToyTrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, seed=seed,
                            width=width, layers=layers, ffn_dim=ffn_dim, checkpoint_dtype=checkpoint_dtype,
                            pool_size=pool_size, eval_every=eval_every, eval_clips=eval_clips,
                            checkpoint_every=checkpoint_every, sync_every=sync_every, log_every=log_every,
                            accumulation=accumulation, global_batch=global_batch, fsdp=fsdp,
                            precision="bf16" if bf16 else "fp32", activation_checkpointing=activation_checkpointing,
                            init_from=str(init_from or ""),
                            init_sha256=file_sha256(init_from) if init_from and init_from.is_file() else "",
                            )  # fmt: skip
    config.validate()
    target = resolve_device(device)
    ensure_writable_dir(out)

    def evaluate(transformer: Any, encoder: Any, step: int) -> dict[str, float]:
        import torch

        from harness.models.toy import ToyModel
        from harness.toyworld.sampling import toybench_of

        model = ToyModel(transformer, encoder, next(transformer.parameters()).device, torch.float32)
        scores = toybench_of(model, config.eval_clips)
        transformer.requires_grad_(False)
        return {k: v for k, v in scores.items() if k != "clips"}

    teacher = train(config, out, target, evaluate if eval_clips > 0 else None, show_progress=progress,
                    compile_model=compile_model and target.type == "cuda")  # fmt: skip
    if current_ranks().lead:
        console.print(f"toy teacher written to {teacher}")


# -- train, ablate ----------------------------------------------------------------------------

TrainStepsOpt = Annotated[int, typer.Option(help="Optimizer steps.")]
TrainBatchOpt = Annotated[int, typer.Option(help="Stored teacher states per step.")]
TrainPromptsOpt = Annotated[int, typer.Option(help="Training prompts from the model's prompt world (toy).")]


def _recipes(field: str) -> str:
    from harness.recipes import side_by_side

    return f" (recipes: {side_by_side(field)})"


@app.command("train")
@user_errors
def train_cmd(
    out: Annotated[Path, typer.Option(help="Folder of the converted checkpoint (and the resumable training state).")],
    target_layers: Annotated[
        int | None,
        typer.Option(help="Self-attention layers to convert to linear attention (linvideo; dmd2: ST + DMD2)."),
    ] = None,
    method: Annotated[
        str,
        typer.Option(
            help="Method to train: linvideo, sla, or dmd2 (a 4-step generator distilled by DMD2: distribution "
            "matching against the teacher with CFG, a fake score updated --fake-updates times per step, backward "
            "simulation; DMD2's GAN term is left out)."
        ),
    ] = "linvideo",
    init: Annotated[
        str,
        typer.Option(
            help="dmd2: where the generator starts: dense (the teacher) or a method's checkpoint folder, e.g. a "
            "LinVideo conversion (its linear layers are kept: LinVideo + DMD2). With --target-layers: ST + DMD2."
        ),
    ] = "dense",
    fake_updates: Annotated[int, typer.Option(help="dmd2: fake-score updates per generator step (TTUR).")] = 5,
    fake_lr: Annotated[float | None, typer.Option(help="dmd2: the fake score's learning rate (default: --lr).")] = None,
    real_cfg: Annotated[float, typer.Option(help="dmd2: the real score's CFG scale; 0: the model's.")] = 0.0,
    regression_pairs: Annotated[
        int, typer.Option(help="dmd2: teacher ODE pairs for DMD's regression loss (0: off, as DMD2).")
    ] = 0,
    eval_every: Annotated[
        int, typer.Option(help="dmd2 on toy: ToyBench of the generator every N steps (0: off), for its curve.")
    ] = 0,
    model: Annotated[str, typer.Option(help="Teacher model adapter (see `bench models`).")] = "toy",
    recipe: Annotated[
        str | None,
        typer.Option(
            help="LinVideo's settings by name: paper (the appendix: lr 1e-4 cosine, 10% warm-up, batch 48, alpha "
            "20->2 over the run, lambda 0.01, Eq. 13's weighting, 3K steps; ours where it is silent) or toy (the "
            "tuned defaults; README: the table of both). An option given explicitly overrides its recipe's value; "
            "each option's help shows both recipes' values. Default: toy."
        ),
    ] = None,
    objective: Annotated[
        str | None,
        typer.Option(
            help="adm (anytime distribution matching, the student as its own score model), mse (regress the "
            "stored velocities), adm-extra-score (a separately trained score model of the student's samples; "
            "slower) or mse-limit (not the paper's: the MSE that ADM tends to as --adm-step-fraction shrinks, each "
            "state weighted as --adm-weighting implies; issue 20's E1c)." + _recipes("objective")
        ),
    ] = None,
    kernel: Annotated[str | None, typer.Option(help="Feature map: hedgehog, relu, taylor or elu.")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps." + _recipes("steps"))] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            help="Stored teacher states per optimizer step, per rank and --accumulation micro-batch (the "
            "global batch on one process)." + _recipes("batch_size")
        ),
    ] = None,
    micro_batch: Annotated[
        int | None,
        typer.Option(
            help="States per forward/backward pass, gradients accumulated over the batch (0: the whole "
            "batch at once; Wan at the paper's batch 48 on one GPU: 1)." + _recipes("micro_batch")
        ),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            help="Peak learning rate of the transformer (LinVideo's feature maps: --map-lr); sla: 1e-4; dmd2: 2e-5 "
            "(the generator, constant). ADM on the toy diverged once this lr summed over the steps (warm-up and "
            "cosine included) passed 0.007-0.014." + _recipes("lr")
        ),
    ] = None,
    map_lr: Annotated[
        float | None,
        typer.Option(
            help="Peak learning rate of LinVideo's feature maps (new parameters, identity init)." + _recipes("map_lr")
        ),
    ] = None,
    grad_clip: Annotated[
        float | None,
        typer.Option(
            help="Largest gradient norm of LinVideo's weights and feature maps (r is clipped apart); a step whose "
            "norm is larger is scaled down to it. Under Adam, clipping every step normalises each step's gradient, "
            "so two objectives whose gradients differ by a factor train alike only while both are clipped or "
            "neither is." + _recipes("grad_clip")
        ),
    ] = None,
    r_optimizer: Annotated[
        str | None,
        typer.Option(
            help="Optimizer of the scores r: sgd (keeps per-layer gradient sizes) or adamw." + _recipes("r_optimizer")
        ),
    ] = None,
    r_lr: Annotated[
        float | None, typer.Option(help="Peak learning rate of the per-layer scores r." + _recipes("r_lr"))
    ] = None,
    r_lr_schedule: Annotated[
        str | None,
        typer.Option(
            help="cosine (as the weights: warm-up, then cosine to 0) or constant (after warm-up)."
            + _recipes("r_lr_schedule")
        ),
    ] = None,
    r_init: Annotated[
        float | None, typer.Option(help="Initial score r of every layer (1 = softmax)." + _recipes("r_init"))
    ] = None,
    alpha_start: Annotated[
        float | None, typer.Option(help="Exponent of L_reg at the first step." + _recipes("alpha_start"))
    ] = None,
    alpha_end: Annotated[
        float | None,
        typer.Option(help="Exponent of L_reg at the end of annealing (= start: fixed)." + _recipes("alpha_end")),
    ] = None,
    alpha_anneal_fraction: Annotated[
        float | None,
        typer.Option(
            help="Fraction of the run over which alpha goes linearly from start to end, then holds."
            + _recipes("alpha_anneal_fraction")
        ),
    ] = None,
    adm_weighting: Annotated[
        str | None,
        typer.Option(
            help="ADM's score-difference weight: analytic ((1 - t)/t, Eq. 13), normalized (DMD's 1/mean|u|) or "
            "uniform (normalized and divided by the step s - t: every step weighs alike)." + _recipes("adm_weighting")
        ),
    ] = None,
    reduction: Annotated[
        str | None,
        typer.Option(
            help="The objective's reduction, i.e. its scale against lambda (L_con + L_reg): mean (over every "
            "element: ADM's gradient on r divided by the elements of a sample) or sample-sum (Eq. 12: summed per "
            "sample, averaged over the batch)." + _recipes("adm_reduction")
        ),
    ] = None,
    adm_step_fraction: Annotated[
        float | None,
        typer.Option(
            help="kappa: ADM's student step from a stored state at s lands at s - kappa (s - t_next), teacher and "
            "student evaluated there (1: the next sampler time; -> 0: ADM tends to a weighted MSE)."
            + _recipes("adm_step_fraction")
        ),
    ] = None,
    adm_jump: Annotated[
        str | None,
        typer.Option(
            help="Where ADM's student step from a stored state lands: next (the next sampler time) or any "
            "(a sampler time drawn from all later ones; on the toy: no blow-up, no better students)."
            + _recipes("adm_jump")
        ),
    ] = None,
    t_min: Annotated[
        float | None,
        typer.Option(
            help="ADM's earliest landing time (bounds (1 - t)/t; the sampler's last step lands there)."
            + _recipes("t_min")
        ),
    ] = None,
    score_updates: Annotated[
        int | None,
        typer.Option(
            help="adm-extra-score: flow-matching updates of the score model per student step."
            + _recipes("score_updates")
        ),
    ] = None,
    score_guided: Annotated[
        bool,
        typer.Option(help="adm-extra-score: train and read the score model CFG-guided, as the student samples."),
    ] = False,
    lam: Annotated[float | None, typer.Option(help="Weight lambda of L_con + L_reg." + _recipes("lam"))] = None,
    selection: Annotated[
        str | None,
        typer.Option(help="learned (selective transfer), manual (--layers) or heuristic (greedy by output change)."),
    ] = None,
    layers: Annotated[str, typer.Option(help="Comma-separated layers to convert, with --selection manual.")] = "",
    prompts: TrainPromptsOpt = 64,
    prompt_file: Annotated[Path | None, typer.Option(help="Training prompts, one per line (real models).")] = None,
    store: Annotated[Path | None, typer.Option(help="Trajectory store folder (default OUT/trajectories).")] = None,
    sampler_steps: Annotated[
        int | None,
        typer.Option(help="Sampler steps of the teacher's trajectories (default: the model's; Wan 50, toy 20)."),
    ] = None,
    sampler_shift: Annotated[
        float | None,
        typer.Option(help="Timestep shift of the teacher's trajectories (default: the model's; Wan 5.0, toy 3.0)."),
    ] = None,
    collect_batch: Annotated[
        int, typer.Option(help="Prompts the teacher samples at once while collecting (part of the store's spec).")
    ] = 16,
    weights: Annotated[str, typer.Option(help="Teacher weights: local folder or hub id (default: the model's).")] = "",
    activation_checkpointing: Annotated[bool, typer.Option(help="Recompute activations in backward.")] = False,
    bf16: Annotated[
        bool | None, typer.Option(help="bf16 autocast on CUDA (--no-bf16: fp32 throughout)." + _recipes("bf16"))
    ] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Write a resumable checkpoint every N steps.")] = 100,
    seed: Annotated[int, typer.Option(help="Seed of the prompts, the batches and the trainer.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    param: Annotated[
        list[str] | None, typer.Option(help="SLA parameter KEY=VALUE: critical, negligible, block_size.")
    ] = None,
    accumulation: AccumulationOpt = 1,
    global_batch: GlobalBatchOpt = 0,
    fsdp: FsdpOpt = "auto",
    teacher_placement: Annotated[
        str, typer.Option(help="The frozen teacher under FSDP: replicate (a bf16 copy per rank) or shard.")
    ] = "replicate",
) -> None:
    """Train LinVideo (data-free collection, selective transfer, ADM), fine-tune SLA, or distil a 4-step DMD2
    generator (no GAN term); resumable (rerun).

    Every method trains through the training engine, also under ``torchrun --nproc-per-node N -m harness.cli train``.
    """
    from harness.distributed import current_ranks, rank_device
    from harness.models import MODELS
    from harness.preflight import resolve_device
    from harness.recipes import recipe as recipe_values
    from harness.training import TrainRequest, train
    from methods.linvideo.train import LinVideoTrainConfig

    trained = _canonical_method(method)
    if trained not in ("linvideo", "sla", "dmd2"):
        raise HarnessError(f"bench train trains linvideo, sla or dmd2, not {method!r}")
    ranks = current_ranks()
    layout = {"accumulation": accumulation, "global_batch": global_batch, "fsdp": fsdp,
              "teacher_placement": teacher_placement}  # fmt: skip
    if trained == "dmd2":
        if recipe is not None:
            raise HarnessError("--recipe names LinVideo's recipes; dmd2 takes its settings one by one (ST + DMD2 "
                               "starts from the toy recipe's selection settings)")  # fmt: skip
        _train_dmd2(dict(init=init, fake_updates=fake_updates, fake_lr=fake_lr, real_cfg=real_cfg,
                         regression_pairs=regression_pairs, eval_every=eval_every, target_layers=target_layers or 0,
                         kernel=kernel, r_init=r_init, r_lr=r_lr, map_lr=map_lr, lam=lam, alpha_start=alpha_start,
                         alpha_end=alpha_end, alpha_anneal_fraction=alpha_anneal_fraction, model=model,
                         weights=_weights_value(weights, False, MODELS.get(model).weights_kind), steps=steps,
                         batch_size=batch_size, lr=lr, checkpoint_every=checkpoint_every, seed=seed,
                         precision="bf16" if bf16 else "fp32", activation_checkpointing=activation_checkpointing,
                         **layout), out, prompt_file, prompts, device, progress)  # fmt: skip
        return
    adapter_cls = MODELS.get(model)
    shared = {"objective": objective, "steps": steps, "batch_size": batch_size, "lr": lr}
    given = {key: value for key, value in shared.items() if value is not None}  # else the method's (recipe's) value
    if trained == "sla":
        if recipe is not None:
            raise HarnessError("--recipe names LinVideo's recipes; sla takes its settings one by one")
        config: Any = _sla_train_config(param or [], activation_checkpointing=activation_checkpointing,
                                        checkpoint_every=checkpoint_every, seed=seed,
                                        precision="bf16" if bf16 else "fp32", **layout, **given)  # fmt: skip
    elif target_layers is None:
        raise HarnessError("bench train --method linvideo needs --target-layers")
    else:
        options = {
            "kernel": kernel, "micro_batch": micro_batch, "map_lr": map_lr, "grad_clip": grad_clip,
            "r_optimizer": r_optimizer, "r_lr": r_lr,
            "r_lr_schedule": r_lr_schedule, "r_init": r_init, "alpha_start": alpha_start, "alpha_end": alpha_end,
            "alpha_anneal_fraction": alpha_anneal_fraction, "adm_weighting": adm_weighting,
            "adm_reduction": reduction, "adm_step_fraction": adm_step_fraction, "adm_jump": adm_jump, "t_min": t_min,
            "score_updates": score_updates, "lam": lam, "selection": selection, "bf16": bf16,
        }  # fmt: skip
        given |= {key: value for key, value in options.items() if value is not None}
        config = LinVideoTrainConfig(
            target_layers=target_layers, **{**recipe_values(recipe or "toy"), **given}, score_guided=score_guided,
            layers=_parse_ints(layers, "--layers"), activation_checkpointing=activation_checkpointing,
            checkpoint_every=checkpoint_every, seed=seed, **layout,
        )  # fmt: skip
    listed = _prompt_lines(prompt_file)
    request = TrainRequest(
        model=MODELS.canonical(model), weights=_weights_value(weights, False, adapter_cls.weights_kind), config=config,
        out=out, prompts=listed, prompt_count=prompts, device=str(rank_device(resolve_device(device), ranks)),
        store=store, show_progress=progress, sampler_steps=sampler_steps, sampler_shift=sampler_shift,
        collect_batch=collect_batch,
    )  # fmt: skip
    converted = train(request)
    if not ranks.lead:
        return
    summary = json.loads((converted / "spec.json").read_text())
    if trained == "sla":  # the engine printed its notes
        console.print(f"[bold]sla[/] fine-tuned {summary['steps']} steps ({summary['seconds_per_step']:.3g} s/step)"
                      f" -> {converted}")  # fmt: skip
        return
    from methods.linvideo.attention import conversion_notes

    score = summary.get("score_seconds_per_step")
    console.print(
        f"[bold]linvideo[/] trained {summary['steps']} steps ({summary['seconds_per_step']:.3g} s/step"
        + (f", of which the score model {score:.3g} s" if score is not None else "")
        + f"): layers {summary['linear_layers']} linear -> {converted}"
    )
    for note in conversion_notes(summary["final_r"], summary["config"]["target_layers"]):  # the engine printed its own
        console.print(f"[yellow]note:[/] {note}")


def _train_dmd2(settings: dict[str, Any], out: Path, prompt_file: Path | None, prompt_count: int, device: str,
                progress: bool) -> None:  # fmt: skip
    """``bench train --method dmd2``: the config from the options (Dmd2Config's defaults where not given; the fake
    score's learning rate follows --lr unless --fake-lr is given)."""
    from harness.distributed import current_ranks, rank_device
    from harness.preflight import resolve_device
    from methods.dmd2.train import Dmd2Config, Dmd2Request, train

    given = {key: value for key, value in settings.items() if value is not None}
    if "lr" in given:
        given.setdefault("fake_lr", given["lr"])
    ranks = current_ranks()
    request = Dmd2Request(Dmd2Config(**given), out, _prompt_lines(prompt_file), prompt_count,
                          str(rank_device(resolve_device(device), ranks)), progress)  # fmt: skip
    folder = train(request)
    if ranks.lead:
        spec = json.loads((folder / "spec.json").read_text())
        console.print(f"[bold]dmd2[/] {spec['generator']}: {spec['steps']} steps ({spec['seconds_per_step']:.3g} "
                      f"s/step; {spec['gan']}) -> {folder}")  # fmt: skip
        for note in spec["notes"]:
            console.print(f"[yellow]note:[/] {note}")


def _sla_train_config(pairs: list[str], **settings: Any) -> Any:
    from methods.sla_train import SlaTrainConfig

    params = _parse_params(pairs)
    unknown = sorted(set(params) - {"critical", "negligible", "block_size"})
    if unknown:
        raise HarnessError(f"sla takes --param critical, negligible, block_size; not {unknown}")
    return SlaTrainConfig(**settings, **_method_params("sla", pairs))


@app.command("calibrate")
@user_errors
def calibrate_cmd(
    out: Annotated[Path, typer.Option(help="Plan file to write (JSON); pass it to `bench run --param plan=OUT`.")],
    method: Annotated[str, typer.Option(help="Method to calibrate (dfa).")] = "dfa",
    model: Annotated[str, typer.Option(help="Teacher model adapter (see `bench models`).")] = "toy",
    threshold: Annotated[
        float, typer.Option(help="DFA error bound delta: layer i may add up to delta*(i+1)/L relative error.")
    ] = 0.05,
    window: Annotated[float, typer.Option(help="Window attention width as a fraction of the tokens.")] = 0.125,
    prompts: Annotated[int, typer.Option(help="Calibration prompts from the model's training split (toy).")] = 8,
    prompt_file: Annotated[Path | None, typer.Option(help="Calibration prompts, one per line (real models).")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps the plan is for (default: the model's).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the prompts and of the first noise draw.")] = 0,
    weights: Annotated[str, typer.Option(help="Teacher weights: local folder or hub id (default: the model's).")] = "",
    dense_warmup_steps: Annotated[int, typer.Option(help="First steps kept dense (not searched).")] = 0,
    dense_layers: Annotated[str, typer.Option(help="Comma-separated layers kept dense (not searched).")] = "",
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto (bf16 on GPU, fp32 on CPU).")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Search a calibrated plan (DFA: per step x layer, the most aggressive substitute under --threshold)."""
    from harness.calibration import CalibrationRequest, calibrate
    from harness.models import MODELS
    from methods.dfa import DfaPlan

    adapter_cls = MODELS.get(model)
    listed = _prompt_lines(prompt_file)
    request = CalibrationRequest(
        method=method, model=MODELS.canonical(model), weights=_weights_value(weights, False, adapter_cls.weights_kind),
        out=out, threshold=threshold, window=window, prompt_count=prompts, prompts=listed, steps=steps, seed=seed,
        device=_resolved_device(device), dtype=_resolved_dtype(dtype, device), dense_warmup_steps=dense_warmup_steps,
        dense_layers=_parse_ints(dense_layers, "--dense-layers"), show_progress=progress and not as_json,
    )  # fmt: skip
    plan = DfaPlan.load(calibrate(request))
    if as_json:
        _print_json({"path": str(out), "choices": plan.counts(), "calibration": plan.calibration})
        return
    console.print(
        f"[bold]{method}[/] plan for {plan.num_steps} steps x {plan.num_layers} layers: "
        + ", ".join(f"{name} {count}" for name, count in sorted(plan.counts().items()))
        + f"; density {_fmt(plan.calibration['density']['mean'])} -> {out}"
    )


@app.command("ablate")
@user_errors
def ablate_cmd(
    axes: Annotated[
        list[str],
        typer.Argument(
            help="One or more of alpha, kernel, objective, selection, target, r-optimizer; `all` = the paper's five.",
            show_default=False,
        ),
    ],
    model: Annotated[str, typer.Option(help="Teacher model adapter (a model with built-in prompts: toy).")] = "toy",
    target_layers: Annotated[
        int | None, typer.Option(help="Layers to convert in every variant but the target axis (default: half).")
    ] = None,
    recipe: Annotated[
        str,
        typer.Option(
            help="The LinVideo recipe every variant starts from (see `bench train --recipe`): toy or paper; the axis "
            "changes one setting of it."
        ),
    ] = "toy",
    steps: Annotated[int | None, typer.Option(help="Optimizer steps (default: the recipe's).")] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Stored teacher states per step (default: the recipe's).")
    ] = None,
    prompts: TrainPromptsOpt = 64,
    jobs: Annotated[
        int,
        typer.Option(
            help=(
                "Variants trained, then sampled, at a time, each in its own process (the toy is launch-bound: one GPU "
                "runs several, and on a bare cuda they are dealt over every visible GPU; on CPU they share the cores)."
            )
        ),
    ] = 1,
    runs_dir: RunsDirOpt = Path("runs"),
    train_dir: Annotated[Path, typer.Option(help="Folder of the trained checkpoints and the trajectory store.")] = Path(
        "checkpoints"
    ),
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Train, sample, score and record every variant of LinVideo ablation axes (resumes a half-done sweep).

    A configuration shared by several axes (the default recipe) is trained and sampled once.
    """
    from harness.ablate import AblationRequest, ablate, expand_axes
    from harness.models import MODELS
    from harness.recipes import recipe as recipe_values
    from methods.linvideo.train import LinVideoTrainConfig

    adapter_cls = MODELS.get(model)
    given = {key: value for key, value in {"steps": steps, "batch_size": batch_size}.items() if value is not None}
    base = LinVideoTrainConfig(target_layers=target_layers or adapter_cls.num_layers // 2,
                               **{**recipe_values(recipe), **given})  # fmt: skip
    chosen = expand_axes(tuple(axes))
    records = ablate(AblationRequest(axes=chosen, model=MODELS.canonical(model), base=base, runs_dir=runs_dir,
                                     train_dir=train_dir, device=_resolved_device(device), prompt_count=prompts,
                                     show_progress=progress, jobs=jobs))  # fmt: skip
    for rec in records:
        scores = next(iter(rec["metrics"].values()), {})
        labels = ", ".join(f"{m['axis']} = {m['variant']}" for m in rec["ablation"] if m["axis"] in chosen)
        console.print(
            f"{labels}: linear layers {rec['training']['linear_layers']}, "
            f"prompt correctness {_fmt(scores.get('prompt_correctness'))}, "
            f"motion smoothness {_fmt(scores.get('motion_smoothness'))}"
        )
    console.print(
        f"{len(records)} variants recorded in {runs_dir}; `bench report --runs-dir {runs_dir}` tabulates them"
    )


# -- eval, evaluator environments ---------------------------------------------------------------


@app.command("eval")
@user_errors
def eval_cmd(
    run: Annotated[str, typer.Argument(help="A run record (path) or run id in --runs-dir.")],
    suite: Annotated[
        str, typer.Option(help="Comma-separated suites: vbench, vbench2, fidelity, proxies, toybench.")
    ] = "proxies",
    dimensions: DimensionsOpt = None,
    evaluator_cache: CacheOpt = None,
    device: Annotated[str, typer.Option(help="Device of the VBench evaluator (cpu, cuda).")] = "cuda",
    reference: Annotated[
        Path | None, typer.Option(help="Fidelity reference run (record path or id; default: the cohort's dense run).")
    ] = None,
    runs_dir: RunsDirOpt = Path("runs"),
    as_json: JsonOpt = False,
) -> None:
    """Score an existing run with metric suites and merge the scores into its record."""
    from harness.eval.suites import SUITES, EvalOptions
    from harness.evaluate import evaluate_record, find_record

    suites = tuple(SUITES.canonical(name) for name in _parse_names(suite))
    if not suites:
        raise HarnessError("--suite names no suite")
    path = find_record(run, runs_dir)
    options = EvalOptions(
        dimensions=_parse_names(dimensions), cache=evaluator_cache, device=device,
        reference=None if reference is None else find_record(str(reference), path.parent),
    )  # fmt: skip
    record = evaluate_record(path, suites, options)
    scores = {name: record.get("metrics", {}).get(name, {}) for name in suites}
    if as_json:
        _print_json({"path": str(path), "metrics": scores})
        return
    rows = [[name, metric, value] for name, values in scores.items() for metric, value in values.items()]
    console.print(_table(f"{record['run_id']}", ["suite", "metric", "value"], rows))
    console.print(f"scores merged into {path}")


def _evaluator_app(name: str, title: str, needs: str) -> typer.Typer:
    """``bench vbench`` / ``bench vbench2``: set up the evaluator's own venv; list its weights."""
    sub = typer.Typer(help=f"{title} in its own virtual environment: {needs}", no_args_is_help=True)

    @sub.command("setup")
    @user_errors
    def setup_cmd(
        evaluator_cache: CacheOpt = None,
        python: Annotated[
            str | None, typer.Option(help="Interpreter for the venv (default: the pinned CPython).")
        ] = None,
    ) -> None:
        """Create the venv under the cache and install the pinned evaluator there (minutes; ~6 GB)."""
        from harness.eval.vbench.environment import Cache, setup

        record = setup(name, Cache.resolve(evaluator_cache), python, log=lambda line: console.print(line))
        versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items() if v)
        console.print(f"[bold]{title}[/] ready at {record['venv']} (Python {record['python']}; {versions})")
        for step in record["manual_steps"]:
            console.print(f"[yellow]still to do by hand:[/] {step}", soft_wrap=True)

    @sub.command("check")
    @user_errors
    def check_cmd(evaluator_cache: CacheOpt = None, as_json: JsonOpt = False) -> None:
        """Every dimension with its weight files present or missing and where each must go."""
        from harness.eval.vbench.catalogue import DIMENSIONS
        from harness.eval.vbench.environment import Cache, environment_status, missing_packages, weight_status

        cache = Cache.resolve(evaluator_cache)
        status = environment_status(name, cache)
        rows = weight_status(name, cache)
        modules = missing_packages(name, cache, tuple(DIMENSIONS[name].names()))
        if as_json:
            _print_json(
                {
                    "environment": status,
                    "missing_modules": modules,
                    "weights": [
                        {
                            "dimension": r.dimension,
                            "path": str(r.location),
                            "present": r.present,
                            "source": r.file.source,
                        }
                        for r in rows
                    ],
                }
            )
            return
        env_line = "ready" if status["ready"] else f"{status['reason']} (run `bench {name} setup`)"
        console.print(f"[bold]{title}[/] environment at {cache.venv(name)}: {env_line}", soft_wrap=True)
        table_rows = []
        for dim in DIMENSIONS[name].names():
            files = [r for r in rows if r.dimension == dim]
            ready = all(r.present for r in files) and dim not in modules
            table_rows += (
                [[dim, "ready" if ready else "MISSING", "(no weights)", "", ""]]
                if not files
                else [
                    [
                        dim if i == 0 else "",
                        ("ready" if ready else "MISSING") if i == 0 else "",
                        str(r.location),
                        "present" if r.present else "missing",
                        r.file.source,
                    ]
                    for i, r in enumerate(files)
                ]
            )
            if dim in modules:
                table_rows.append(
                    ["", "", f"modules: {', '.join(modules[dim])}", "missing", f"see `bench {name} setup`"]
                )
        console.print(_table(f"{title} dimensions", ["dimension", "status", "file", "state", "source"], table_rows))

    return sub


app.add_typer(
    _evaluator_app("vbench", "VBench", "16 dimensions; weights from the cache, never downloaded."), name="vbench"
)
app.add_typer(
    _evaluator_app(
        "vbench2",
        "VBench-2.0",
        "18 dimensions; needs CUDA, ~30 GB of checkpoints and steps pip cannot do (setup lists them).",
    ),
    name="vbench2",
)


# -- report ------------------------------------------------------------------------------------


@app.command("report")
@user_errors
def report_cmd(
    runs_dir: RunsDirOpt = Path("runs"),
    out: Annotated[Path, typer.Option(help="Folder for the markdown and CSV tables.")] = Path("reports"),
    include: Annotated[
        list[Path] | None,
        typer.Option(
            help="An earlier report's table3.csv whose rows join this table3 as computed there (their "
            "speedups on their own device); repeatable. For rows whose records were not kept."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Build comparison tables (latency, speedup, every recorded metric) from a runs folder."""
    from harness.io_checks import existing_input
    from harness.report import build_report, console_view

    existing_input(runs_dir, "runs folder", folder=True, missing_hint="; run `bench run` first")
    report = build_report(runs_dir, out, include)
    for path, reason in report.errors:
        err_console.print(f"[yellow]skipped record[/] {path}: {reason}", soft_wrap=True)
    if not report.tables and not report.files:  # a folder holding only scaling sweeps still gets their figures
        others = len(report.not_records)
        raise HarnessError(f"no readable records under {runs_dir}"
                           + (f" ({others} other JSON files there are not run records)" if others else ""))  # fmt: skip
    if as_json:
        _print_json(
            {
                "tables": {k: t.to_dict(orient="records") for k, t in report.tables.items()},
                "files": [str(p) for p in report.files],
                "errors": [{"path": str(p), "reason": r} for p, r in report.errors],
                "not_records": [str(p) for p in report.not_records],
                "notes": report.notes,
            }
        )
        return
    for name, table in report.tables.items():
        view = console_view(name, table, console.width)
        more = f" (+{len(view.left_out)} columns in {name}.md)" if view.left_out and out is not None else ""
        console.print(_table(view.title + more, view.columns, view.rows))
    for metric, note in report.notes.items():
        console.print(f"[yellow]note:[/] {metric}: {note}")
    console.print(f"wrote {', '.join(str(p) for p in report.files)}")


if __name__ == "__main__":
    app()
