"""End-to-end sample latency of LinVideo at Wan 1.3B 480p x 81 frames, and per sampler step at Wan 14B 720p x 81,
beside the paper's (issue 23, item 4).

Random weights, real architecture, bf16 (latency does not depend on weight values). In order:

1. Correctness (fresh random inputs): Hedgehog linear attention in bf16 against a float64 reference and mixed
   attention at r = 1 against dense (:func:`harness.benchmarks.linvideo_gpu.check_correctness`); LinVideo with
   radial in its softmax layers, FlexAttention in bf16 against the masked dense path in fp32, on a linear and a
   radial layer. A failure stops the script before anything is timed.
2. Forward check (``bench latency``'s :func:`~harness.latency_run.run_latency`, one process, same inputs): cuDNN
   and FA2 dense against LinVideo with the paper's 16 linear layers and radial (its paper setting) in the other
   14, at a step after radial's warm-up. Target: >= 2.0x against cuDNN. Also reported: the attention-only
   speedup and the bound Amdahl's law sets when attention would cost nothing (cuDNN forward / its non-attention
   time).
3. End-to-end samples (:func:`~harness.latency_run.time_sample`), one real sample each, every stage timed:
   prompt encoding (a random full-size UMT5-XXL, Wan's text encoder, when ``transformers`` is importable, else
   excluded and said so), every denoising step, VAE decode (fp32, as Wan loads it). Variants, most important
   first: LinVideo 4 steps without CFG (the compute of the paper's LinVideo + DMD2; untrained maps), dense FA2
   50 steps x 2 CFG passes, LinVideo + radial 50 x 2 (radial's own warm-up, 12 of 50 steps dense), LinVideo
   50 x 2, dense cuDNN 50 x 2. LinVideo's softmax layers run cuDNN. Before each sample its time is predicted
   from the forward medians; one that would end past ``--budget-s`` is not run, and its row holds the
   prediction, marked ``"measured": false``.

The paper's 97.32 s (FA2), 68.26 s (LinVideo) and 6.11 s (LinVideo + DMD2, 4 steps) stand beside ours in the
JSON (``linvideo.md`` sections 6.3 and 9.4; the paper's GPU is not stated, the numbers fit one H100).

Budget: about 6.5 minutes on one H100 or H200, estimated from the H100 forwards in reports/gpu/h100 (FA2 877 ms,
cuDNN 656, LinVideo 558, radial 482): checks ~20 s with FlexAttention's compile, forward check ~45 s, denoising
2 + 88 + 51 + 56 + 66 s, VAE decode ~10 s per sample (not measured before). ``--budget-s`` (default 420, counted
from the start) keeps the whole run under 8 minutes: the last samples are the first to be predicted instead.

Per-step mode (``--per-step``, the default for ``--model wan14b``, where one sample takes ~50 x 2 x 12 s): the same
correctness checks, no forward check, then each variant timed as a real 2-step sample through
:func:`~harness.latency_run.time_sample` (prompt encoding and the sampler's own step, CFG included): the first step a
warm-up (autotuning, FlexAttention's compile at the new shape), the second the timed step. LinVideo has the paper's
22 of 40 layers linear. Before anything runs, each variant's timed step is checked to run dense in the same layers
as its paper-length sample's steps after the dense warm-up (by the method's own ``runs_dense``): with 2 steps
radial's warm-up (24%) rounds to none, so LinVideo + radial's timed step is one of steps 12-49 of 50. Per variant the
JSON (``linvideo_e2e_per_step_<model>.json``) holds the step, its forward (step / passes) and density, and the
predicted total at ``--steps`` x 2 (CFG) or ``--few-steps`` x 1, marked as a prediction: the dense warm-up steps
(radial's 12 of 50) at LinVideo's forward median (radial's warm-up runs torch's SDPA, LinVideo's softmax layers
cuDNN: an approximation), the rest at the measured step, plus prompt encoding per prompt and VAE decode at 720p,
each measured once (in the first sample; the later ones skip the decode), beside the paper's Wan 14B 1931 s (FA2),
1127 s (LinVideo) and 92.6 s (LinVideo + DMD2). A variant whose 2-step sample is predicted past ``--budget-s``
gets its step predicted from the forward medians, marked ``"measured": false``.

Per-step budget on one H200, from the 14B forwards of reports/gpu/h200 (cuDNN 12.3 s, FA2 17.2 s, LinVideo 7.9 s,
LinVideo + radial ~5.7 s estimated): random 14B transformer and UMT5-XXL built on the GPU, checks ~20 s, then
2-step samples of 16 + 69 + 23 + 32 + 49 s (1, 4, 4, 4, 4 forwards), VAE decode twice (warm-up, timed; ~7 s each at
720p, not measured before): about 5 minutes in all, under the default ``--budget-s`` 420.

    python -m harness.benchmarks.linvideo_e2e_gpu --out $OUT
    python -m harness.benchmarks.linvideo_e2e_gpu --out $OUT --compile   # + the forward check compiled (~1 min more)
    python -m harness.benchmarks.linvideo_e2e_gpu --out $OUT --model wan14b   # per step (~5 min)
    python -m harness.benchmarks.linvideo_e2e_gpu --out /tmp/x --device cpu --model wan-tiny --steps 2 --few-steps 1
    python -m harness.benchmarks.linvideo_e2e_gpu --out /tmp/x --device cpu --model wan-tiny --per-step
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.atomic import write_json_atomic
from harness.benchmarks.linvideo_gpu import BF16_RELATIVE_TOLERANCE, PAPER_LAYERS, check_correctness
from harness.benchmarks.sparse_gpu import CHECK_GRID, CHECK_HEADS_DIM, relative_error
from harness.environment import capture_environment
from harness.latency_run import LatencyRequest, run_latency, save_latency, time_sample
from harness.models.base import MODELS
from methods import AttentionContext, TokenGrid, build_method
from methods.base import AttentionMethod

FORWARD_TARGET = 2.0  # issue 23: 16 layers linear + radial in the other 14 vs cuDNN dense
FORWARD_REPEATS = {"cuda": (2, 5), "cpu": (1, 2)}  # (warm-up, repeats) of the forward check
# The paper's end-to-end latencies, Wan 1.3B 480p (linvideo.md 6.3, 9.4).
PAPER = {
    "source": "LinVideo (arXiv 2510.08318): latencies of the main table and Tab. III; linvideo.md sections 6.3, 9.4",
    "gpu": "not stated (the numbers fit one H100)",
    "fa2_50x2_s": 97.32,
    "linvideo_50x2_s": 68.26,
    "linvideo_dmd2_4step_s": 6.11,
    "fa2_dmd2_4step_s": 8.76,
    "linvideo_speedup": 1.43,
    "linvideo_dmd2_speedup": 15.9,
}
# Wan 14B 720p (linvideo.md 6.3; LinVideo's 22 of 40 layers linear).
PAPER_14B = {
    "source": "LinVideo (arXiv 2510.08318) v2: Wan 14B latencies; linvideo.md section 6.3",
    "gpu": "not stated (the numbers fit one H100)",
    "fa2_50x2_s": 1931.0,
    "linvideo_50x2_s": 1127.0,
    "linvideo_dmd2_4step_s": 92.6,
    "linvideo_speedup": 1.71,
    "linvideo_dmd2_speedup": 20.9,
}
PAPERS = {"wan14b": PAPER_14B}  # per model; any other (wan1.3b, wan-tiny) is set beside the 1.3B figures
# Per-step mode: each variant is timed as a sample of this many steps, a warm-up step (kernel autotuning and
# compiles at the new shape) then the timed one.
PER_STEP_SAMPLE = 2


@dataclass(frozen=True)
class Variant:
    """One end-to-end sample: a method with its parameters, a step count, CFG on or off."""

    key: str
    label: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    few_step: bool = False  # the few-step count (4) without CFG, else the model's steps with CFG
    paper_s: float | None = None
    # Whose forward median predicts it: LinVideo + radial takes LinVideo's (radial's warm-up steps run it), so
    # its prediction is an upper bound.
    forward: str = ""

    def sampling(self, model: str, steps: int, few_steps: int) -> Any:
        defaults = MODELS.get(model).defaults
        if self.few_step:
            return dataclasses.replace(defaults, steps=few_steps, cfg=1.0)
        return dataclasses.replace(defaults, steps=steps)


def paper_for(model: str) -> dict[str, Any]:
    """The paper's latencies set beside ``model``'s: Wan 14B's for it, Wan 1.3B's for any other."""
    return PAPERS.get(model, PAPER)


def variants(model: str, device: torch.device) -> list[Variant]:
    """The samples, most important first (a tight budget drops the last)."""
    fa2, cudnn = ("fa2", "cudnn") if device.type == "cuda" else ("sdpa", "sdpa")
    paper = paper_for(model)
    linvideo = {"linear_layers": list(PAPER_LAYERS[model]), "softmax_method": cudnn}
    radial = {**linvideo, "softmax_method": "radial"}
    layers = f"{len(PAPER_LAYERS[model])} of {MODELS.get(model).num_layers} layers linear"
    return [
        Variant("linvideo_4step", f"LinVideo ({layers}), 4 steps, no CFG", "linvideo", linvideo, few_step=True,
                paper_s=paper["linvideo_dmd2_4step_s"], forward="linvideo"),
        Variant("fa2_50x2", "dense FA2, CFG", fa2, paper_s=paper["fa2_50x2_s"], forward=fa2),
        Variant("linvideo_radial_50x2", f"LinVideo ({layers}) + radial in the rest, CFG", "linvideo", radial,
                forward="linvideo"),
        Variant("linvideo_50x2", f"LinVideo ({layers}), CFG", "linvideo", linvideo, paper_s=paper["linvideo_50x2_s"],
                forward="linvideo"),
        Variant("cudnn_50x2", "dense cuDNN, CFG", cudnn, forward=cudnn),
    ]  # fmt: skip


def check_combined(device: torch.device) -> dict[str, Any]:
    """LinVideo + radial, FlexAttention (bf16 on CUDA) against masked dense (fp32), on one linear layer (1) and
    one radial layer (2, after radial's dense first layer; a one-step run has no warm-up)."""
    grid, (heads, dim) = CHECK_GRID[device.type], CHECK_HEADS_DIM[device.type]
    low = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(1, heads, grid.tokens, dim, device=device).to(low).float() for _ in range(3))
    fast = build_method("linvideo", linear_layers=[1], softmax_method="radial")
    reference = build_method("linvideo", linear_layers=[1], softmax_method="radial",
                             softmax_params={"backend": "masked"})  # fmt: skip
    errors = {}
    for layer, kind in ((1, "linear"), (2, "radial")):
        ctx = AttentionContext(layer, 4, 0, 1, 1.0, "cond", grid)
        errors[kind] = relative_error(fast(q.to(low), k.to(low), v.to(low), ctx), reference(q, k, v, ctx))
    density = fast.density.per_layer()
    passed = max(errors.values()) <= BF16_RELATIVE_TOLERANCE and density[1] == 0.0 and 0.0 < density[2] < 1.0
    return {"tokens": grid.tokens, "relative_error": errors, "density_per_layer": density, "passed": passed}


def forward_check(
    model: str, device: torch.device, dense: list[str], out: Path, compile: bool = False
) -> dict[str, Any]:
    """``bench latency`` of the dense backends and LinVideo + radial; the speedup against the last dense one (with
    ``compile``, also every method under ``torch.compile``: compiled against the compiled baseline)."""
    baseline = dense[-1]
    linvideo = {"linear_layers": list(PAPER_LAYERS[model]), "softmax_method": "radial"}
    warmup, repeats = FORWARD_REPEATS[device.type]
    latency_path = out / f"linvideo_radial_forward_{model}.json"
    result = run_latency(LatencyRequest(
        model=model, methods=[*dense, "linvideo"], weights="random", device=str(device),
        dtype="bfloat16" if device.type == "cuda" else "float32", warmup=warmup, repeats=repeats, baseline=baseline,
        method_params={"linvideo": linvideo}, compile=compile,
    ), out=latency_path, log=print)  # fmt: skip
    save_latency(result, latency_path)
    base, ours = result["methods"][baseline], result["methods"]["linvideo"]
    compiled = ours.get("compiled", {}).get("speedup_vs_baseline")
    return {
        "compiled_speedup": compiled,
        "compiled_target_met": None if compiled is None else compiled >= FORWARD_TARGET,
        "compiled": {name: entry.get("compiled") for name, entry in result["methods"].items()} if compile else None,
        "baseline": baseline,
        "baseline_forward_ms": base["forward"]["median_ms"],
        "linvideo_radial_forward_ms": ours["forward"]["median_ms"],
        "speedup": ours["speedup_vs_baseline"],
        "target": FORWARD_TARGET,
        "target_met": ours["speedup_vs_baseline"] >= FORWARD_TARGET,
        "attention_speedup": ours["attention_speedup_vs_baseline"],
        "bound_if_attention_were_free": base["forward"]["median_ms"] / base["non_attention_ms"],
        "softmax_density": ours["density"],
        "forward_ms": {name: entry["forward"]["median_ms"] for name, entry in result["methods"].items()},
        "non_attention_ms": {name: entry["non_attention_ms"] for name, entry in result["methods"].items()},
        "linvideo_params": ours["params"],
    }


def build_model(model: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, str]:
    """The random-weight model for the samples and what its prompt encoding is."""
    adapter_cls = MODELS.get(model)
    if adapter_cls.weights_kind == "random":  # a test config: it carries its own small text encoder
        return adapter_cls.load("random", device, dtype), "the test config's own small UMT5"
    try:
        return adapter_cls.build_random(device, dtype, text_encoder=True), "random UMT5-XXL (Wan's), 512 tokens"
    except ImportError as exc:
        note = f"EXCLUDED: no text encoder ({exc}); prompts embedded as seeded noise"
        return adapter_cls.build_random(device, dtype), note


def passes_per_step(cfg: float) -> int:
    """Transformer forwards per sampler step: 2 with CFG (conditional and unconditional), else 1."""
    return 2 if cfg > 1 else 1


def predicted_s(variant: Variant, forward_ms: dict[str, float], sampling: Any, fixed_s: float) -> float | None:
    """A sample's time from its forward median (the slowest one while its own is unknown) plus encode/decode;
    ``None`` while no forward median is known."""
    if not forward_ms:
        return None
    passes = sampling.steps * passes_per_step(sampling.cfg)
    return passes * forward_ms.get(variant.forward, max(forward_ms.values())) / 1e3 + fixed_s


def sample(model: Any, variant: Variant, sampling: Any, device: torch.device, decode: bool = True) -> dict[str, Any]:
    """One real sample of ``variant`` with per-stage times, density and the method's resolved parameters
    (``decode`` False: without the VAE decode, ``decode_s`` 0)."""
    method: AttentionMethod = build_method(variant.method, **variant.params)
    method.validate_for(type(model).num_layers, sampling.steps)
    timing = time_sample(model, method, sampling, device, decode)
    stages = timing["stages"]
    seconds = {name: (sum(stats["samples_ms"]) + sum(stats["warmup_ms"])) / 1e3 for name, stats in stages.items()}
    return {
        "measured": True,
        "total_s": timing["total_ms"] / 1e3,
        "encode_s": seconds.get("prompt_encoding", 0.0),
        "denoise_s": seconds.get("denoise_step", 0.0),
        "decode_s": seconds.get("decode", 0.0),
        "step_median_ms": stages["denoise_step"]["median_ms"] if "denoise_step" in stages else None,
        "attention_s": timing["attention_ms"] / 1e3,
        "density": method.density.mean(),
        "density_per_layer": method.density.per_layer(),
        "density_per_step": method.density.per_step(),
        "params": method.params(),
        "timing": timing,
    }


def run_samples(model: Any, plans: list[tuple[Variant, Any]], forward_ms: dict[str, float], deadline: float,
                device: torch.device, decode_once: bool = False) -> list[dict[str, Any]]:  # fmt: skip
    """One row per (variant, sampling), in order: a real sample, or -- when its predicted time would end past
    ``deadline`` (a ``time.time()``) -- the prediction, marked ``"measured": false`` (a sample runs while no
    forward median is known to predict it). ``forward_ms`` (per :attr:`Variant.forward`) learns each measured
    variant's forward median. ``decode_once``: only the first measured sample decodes (same shape for all)."""
    rows: list[dict[str, Any]] = []
    fixed_s = 0.0  # encode + decode of the last sample, for the predictions
    for variant, sampling in plans:
        passes = sampling.steps * passes_per_step(sampling.cfg)
        row: dict[str, Any] = {"key": variant.key, "label": variant.label, "method": variant.method,
                               "steps": sampling.steps, "cfg": sampling.cfg, "transformer_passes": passes,
                               "paper_s": variant.paper_s}  # fmt: skip
        prediction = predicted_s(variant, forward_ms, sampling, fixed_s)
        row["predicted_s"] = prediction
        if prediction is not None and time.time() + prediction > deadline:
            row |= {"measured": False, "total_s": prediction,
                    "note": f"NOT MEASURED: predicted {prediction:.0f} s from forward medians would end past "
                            "--budget-s; total_s is that prediction"}  # fmt: skip
        else:
            decode = not decode_once or not any(done["measured"] for done in rows)
            row |= sample(model, variant, sampling, device, decode)
            fixed_s = row["encode_s"] + row["decode_s"]
            forward_ms.setdefault(variant.forward, row["step_median_ms"] / passes_per_step(sampling.cfg))
        rows.append(row)
        print(f"{variant.key}: {row['total_s']:.1f} s{'' if row['measured'] else ' (predicted, not measured)'}",
              flush=True)  # fmt: skip
    return rows


def dense_layers(method: AttentionMethod, num_layers: int, step: int, num_steps: int, grid: TokenGrid
                 ) -> tuple[bool, ...]:  # fmt: skip
    """Per layer, whether ``method`` runs plain dense attention at ``step`` (0-based) of a ``num_steps`` sample."""
    return tuple(method.runs_dense(AttentionContext(layer, num_layers, step, num_steps, 0.0, "cond", grid))
                 for layer in range(num_layers))  # fmt: skip


def step_schedule(variant: Variant, model: str, timed: Any, target: Any) -> dict[str, Any]:
    """What the timed step (the last of the ``timed`` sample) stands for in the ``target`` sample, by the method's
    own schedule (:meth:`~methods.base.AttentionMethod.runs_dense`): ``dense_warmup_steps``, the target's steps
    whose dense layers differ from its last step's (radial's first 12 of 50), and ``timed_matches_target``, whether
    the timed step runs dense in the same layers as the target's steps after that warm-up."""
    method = build_method(variant.method, **variant.params)
    adapter = MODELS.get(model)
    layers, grid = adapter.num_layers, adapter.token_grid(target)
    after = dense_layers(method, layers, target.steps - 1, target.steps, grid)
    warmup = sum(dense_layers(method, layers, step, target.steps, grid) != after for step in range(target.steps))
    return {
        "dense_warmup_steps": warmup,
        "dense_layers_after_warmup": [layer for layer, dense in enumerate(after) if dense],
        "timed_matches_target": dense_layers(method, layers, timed.steps - 1, timed.steps, grid) == after,
    }


def add_predicted_totals(rows: list[dict[str, Any]], plans: list[tuple[Variant, Any, Any]],
                         schedules: list[dict[str, Any]], forward_ms: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    """Per-step mode: each row gains its step (the timed one, or for a row not measured its forward median x
    passes, :func:`predicted_s`'s rule) and its predicted total at the target step count: the warm-up steps at its
    :attr:`Variant.forward` median (LinVideo's for LinVideo + radial: radial's warm-up runs the softmax layers
    dense, torch's SDPA there, LinVideo's cuDNN here), the rest at its step, plus prompt encoding per prompt and
    VAE decode measured once (the first measured sample). Returns those two."""
    first = next(row for row in rows if row["measured"])
    fixed = {"measured_in": first["key"], "encode_per_prompt_s": first["encode_s"] / passes_per_step(first["cfg"]),
             "decode_s": first["decode_s"]}  # fmt: skip
    for row, (variant, timed, target), schedule in zip(rows, plans, schedules, strict=True):
        passes = passes_per_step(timed.cfg)
        forward = forward_ms.get(variant.forward, max(forward_ms.values()))
        step_ms = row["step_median_ms"] if row["measured"] else passes * forward
        warmup = schedule["dense_warmup_steps"]
        denoise_s = (warmup * passes * forward + (target.steps - warmup) * step_ms) / 1e3
        row |= {
            "step_ms": step_ms,
            "forward_ms": step_ms / passes,
            "timed_step": timed.steps - 1,
            # The sample's first step: kernel autotuning and compiles at the shape, not timed as the step.
            "first_step_ms": row["timing"]["stages"]["denoise_step"]["warmup_ms"][0] if row["measured"] else None,
            "timed_step_density": row["density_per_step"].get(timed.steps - 1) if row["measured"] else None,
            "target": {
                "steps": target.steps,
                "cfg": target.cfg,
                "transformer_passes": target.steps * passes,
                **schedule,
                "dense_warmup_step_ms": passes * forward if warmup else None,
            },
            "predicted_denoise_s": denoise_s,
            "predicted_total_s": passes * fixed["encode_per_prompt_s"] + fixed["decode_s"] + denoise_s,
            "predicted_note": "PREDICTED: target steps from the "
            + ("measured step" if row["measured"] else "forward medians (this step NOT MEASURED)")
            + ", encode and decode measured once",
        }
    return fixed


def print_step_table(rows: list[dict[str, Any]], fixed: dict[str, Any]) -> None:
    """Per-step mode: each variant's step, its predicted total beside the paper's."""
    print(f"\n{'variant':<22}{'step s':>8}{'fwd s':>7}{'density':>8}{'target':>8}{'total s':>9}{'vs FA2':>8}"
          f"{'paper s':>9}{'paper vs FA2':>13}")  # fmt: skip
    for row in rows:
        density = "-" if row["timed_step_density"] is None else f"{row['timed_step_density']:.2f}"
        target = row["target"]
        paper = (f"{row['paper_s']:>9.1f}{row['paper_speedup_vs_fa2']:>12.2f}x" if row["paper_s"]
                 else f"{'-':>9}{'-':>13}")  # fmt: skip
        note = "" if row["measured"] else "  (step NOT MEASURED)"
        print(f"{row['key']:<22}{row['step_ms'] / 1e3:>8.2f}{row['forward_ms'] / 1e3:>7.2f}{density:>8}"
              f"{target['steps']:>4} x{passes_per_step(row['cfg']):>2}{row['predicted_total_s']:>9.1f}"
              f"{row['speedup_vs_fa2_50x2']:>7.2f}x{paper}{note}")  # fmt: skip
    print(f"totals predicted: target steps x the measured step (dense warm-up steps at the forward median), plus "
          f"prompt encoding {fixed['encode_per_prompt_s']:.2f} s per prompt and VAE decode {fixed['decode_s']:.2f} s "
          f"measured once ({fixed['measured_in']})")  # fmt: skip


def print_table(rows: list[dict[str, Any]], forward: dict[str, Any], linear_layers: int) -> None:
    """The samples beside the paper's, then the forward check."""
    print(f"\n{'variant':<22}{'passes':>7}{'total s':>9}{'encode':>8}{'denoise':>9}{'decode':>8}{'vs FA2':>8}"
          f"{'paper s':>9}{'paper vs FA2':>13}")  # fmt: skip
    for row in rows:
        stages = (f"{row['encode_s']:>8.2f}{row['denoise_s']:>9.1f}{row['decode_s']:>8.2f}" if row["measured"]
                  else f"{'(predicted, not measured)':>25}")  # fmt: skip
        paper = (f"{row['paper_s']:>9.2f}{row['paper_speedup_vs_fa2']:>12.2f}x" if row["paper_s"]
                 else f"{'-':>9}{'-':>13}")  # fmt: skip
        print(f"{row['key']:<22}{row['transformer_passes']:>7}{row['total_s']:>9.1f}{stages}"
              f"{row['speedup_vs_fa2_50x2']:>7.2f}x{paper}")  # fmt: skip
    verdict = "met" if forward["target_met"] else "NOT met"
    print(f"forward check: linvideo ({linear_layers} linear) + radial {forward['speedup']:.2f}x vs "
          f"{forward['baseline']} (target {FORWARD_TARGET}x: {verdict}); attention alone "
          f"{forward['attention_speedup']:.2f}x; bound with free attention "
          f"{forward['bound_if_attention_were_free']:.2f}x")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    started = time.time()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON results")
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test with wan-tiny)")
    parser.add_argument("--model", default="wan1.3b",
                        help="model (random weights): wan1.3b, wan14b (per step), or wan-tiny to smoke")  # fmt: skip
    parser.add_argument("--steps", type=int, default=50, help="steps of the CFG samples (the paper's: 50)")
    parser.add_argument("--few-steps", type=int, default=4, help="steps of the few-step sample (DMD2's: 4)")
    parser.add_argument(
        "--per-step",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"time one sampler step per variant ({PER_STEP_SAMPLE}-step samples, the first a warm-up) and predict "
        "the totals at --steps / --few-steps, instead of whole samples (default: on for wan14b only)",
    )
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip a sample predicted to end past this")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="the forward check also under torch.compile (every "
        "method, against the compiled baseline: outside attention shrinks, attention weighs more)",
    )
    args = parser.parse_args(argv)
    per_step = args.model == "wan14b" if args.per_step is None else args.per_step
    if per_step and args.compile:
        raise SystemExit("--compile applies to the forward check, which --per-step leaves out")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU; use --device cpu --model wan-tiny for a smoke test")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dense = ["fa2", "cudnn"] if device.type == "cuda" else ["sdpa"]
    args.out.mkdir(parents=True, exist_ok=True)
    if per_step:  # (variant, timed sample, target sample) and what the timed step stands for, before any work
        steps = [(v, v.sampling(args.model, PER_STEP_SAMPLE, PER_STEP_SAMPLE), v.sampling(args.model, args.steps,
                  args.few_steps)) for v in variants(args.model, device)]  # fmt: skip
        schedules = [step_schedule(variant, args.model, timed, target) for variant, timed, target in steps]
        wrong = [variant.key for (variant, _, _), schedule in zip(steps, schedules, strict=True)
                 if not schedule["timed_matches_target"]]  # fmt: skip
        if wrong:
            raise SystemExit(f"{', '.join(wrong)}: the timed step {PER_STEP_SAMPLE - 1} runs dense in other layers "
                             "than the target's steps after warm-up: nothing timed")  # fmt: skip

    grid, (heads, dim) = CHECK_GRID[device.type], CHECK_HEADS_DIM[device.type]
    correctness = {
        "linvideo": check_correctness(device, grid.tokens, heads, dim),
        "linvideo_radial": check_combined(device),
    }
    print("correctness:", correctness, flush=True)
    linear = correctness["linvideo"]
    if not correctness["linvideo_radial"]["passed"] or linear["hedgehog_linear_bf16"] > BF16_RELATIVE_TOLERANCE \
            or linear["mixed_r1_vs_dense"] > 1e-3:  # fmt: skip
        raise SystemExit("correctness check failed: nothing timed")

    forward: dict[str, Any] | None = None
    forward_ms: dict[str, float] = {}  # per Variant.forward, for the predictions; per-step mode learns all
    if not per_step:  # at 14B 720p its 21 forwards would cost ~4 minutes; the per-step rows time the same forwards
        forward = forward_check(args.model, device, dense, args.out, args.compile)
        compiled = "" if forward["compiled_speedup"] is None else f"; compiled {forward['compiled_speedup']:.2f}x"
        print(f"forward: {forward['baseline']} {forward['baseline_forward_ms']:.1f} ms, linvideo + radial "
              f"{forward['linvideo_radial_forward_ms']:.1f} ms: {forward['speedup']:.2f}x (target {FORWARD_TARGET}x)"
              f"{compiled}", flush=True)  # fmt: skip
        # Dense backends from the forward check; LinVideo's from its first sample (the check timed it with radial).
        forward_ms = {name: ms for name, ms in forward["forward_ms"].items() if name != "linvideo"}
    if device.type == "cuda":
        torch.cuda.empty_cache()

    model, encoder_note = build_model(args.model, device, dtype)
    if per_step:
        plans = [(variant, timed) for variant, timed, _ in steps]
    else:
        plans = [(v, v.sampling(args.model, args.steps, args.few_steps)) for v in variants(args.model, device)]
    rows = run_samples(model, plans, forward_ms, started + args.budget_s, device, decode_once=per_step)
    fixed = add_predicted_totals(rows, steps, schedules, forward_ms) if per_step else None
    figure = "predicted_total_s" if per_step else "total_s"
    paper = paper_for(args.model)
    by_key = {row["key"]: row for row in rows}
    for row in rows:
        for base in ("fa2_50x2", "cudnn_50x2"):
            row[f"speedup_vs_{base}"] = by_key[base][figure] / row[figure]
        row["paper_speedup_vs_fa2"] = paper["fa2_50x2_s"] / row["paper_s"] if row["paper_s"] else None
    video = vars(MODELS.get(args.model).defaults) | {"steps": args.steps, "few_steps": args.few_steps}
    result = {
        "kind": "linvideo_e2e_per_step" if per_step else "linvideo_e2e",
        "model": args.model,
        "weights": "random",
        "dtype": str(dtype).removeprefix("torch."),
        "video": video | ({"timed_sample_steps": PER_STEP_SAMPLE} if per_step else {}),
        "prompt_encoding": encoder_note,
        "vae_decode": "included: AutoencoderKLWan, fp32 (random weights)"
        + (f"; measured once, in {fixed['measured_in']}'s sample, added to every predicted total" if fixed else ""),
        "correctness": correctness,
        "forward_check": forward if forward else "not run in per-step mode: the rows' steps time the same forwards",
        "samples": rows,
        "encode_decode_once": fixed,
        "paper": paper,
        "budget_s": args.budget_s,
        "environment": capture_environment(device),
        "wall_seconds": time.time() - started,
    }
    write_json_atomic(args.out / f"{result['kind']}_{args.model}.json", result)

    if fixed:
        print_step_table(rows, fixed)
    else:
        print_table(rows, forward, len(PAPER_LAYERS[args.model]))
    print(f"prompt encoding: {encoder_note}. Total {time.time() - started:.0f} s.")


if __name__ == "__main__":
    main()
