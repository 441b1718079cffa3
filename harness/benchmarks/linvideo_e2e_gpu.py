"""End-to-end sample latency of LinVideo at Wan 1.3B 480p x 81 frames, beside the paper's (issue 23, item 4).

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

    python -m harness.benchmarks.linvideo_e2e_gpu --out $OUT
    python -m harness.benchmarks.linvideo_e2e_gpu --out $OUT --compile   # + the forward check compiled (~1 min more)
    python -m harness.benchmarks.linvideo_e2e_gpu --out /tmp/x --device cpu --model wan-tiny --steps 2 --few-steps 1
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
from methods import AttentionContext, build_method
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


def variants(model: str, device: torch.device) -> list[Variant]:
    """The samples, most important first (a tight budget drops the last)."""
    fa2, cudnn = ("fa2", "cudnn") if device.type == "cuda" else ("sdpa", "sdpa")
    linvideo = {"linear_layers": list(PAPER_LAYERS[model]), "softmax_method": cudnn}
    radial = {**linvideo, "softmax_method": "radial"}
    layers = f"{len(PAPER_LAYERS[model])} of {MODELS.get(model).num_layers} layers linear"
    return [
        Variant("linvideo_4step", f"LinVideo ({layers}), 4 steps, no CFG", "linvideo", linvideo, few_step=True,
                paper_s=PAPER["linvideo_dmd2_4step_s"], forward="linvideo"),
        Variant("fa2_50x2", "dense FA2, CFG", fa2, paper_s=PAPER["fa2_50x2_s"], forward=fa2),
        Variant("linvideo_radial_50x2", f"LinVideo ({layers}) + radial in the rest, CFG", "linvideo", radial,
                forward="linvideo"),
        Variant("linvideo_50x2", f"LinVideo ({layers}), CFG", "linvideo", linvideo, paper_s=PAPER["linvideo_50x2_s"],
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
    result = run_latency(LatencyRequest(
        model=model, methods=[*dense, "linvideo"], weights="random", device=str(device),
        dtype="bfloat16" if device.type == "cuda" else "float32", warmup=warmup, repeats=repeats, baseline=baseline,
        method_params={"linvideo": linvideo}, compile=compile,
    ))  # fmt: skip
    save_latency(result, out / f"linvideo_radial_forward_{model}.json")
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


def predicted_s(variant: Variant, forward_ms: dict[str, float], sampling: Any, fixed_s: float) -> float:
    """A sample's time from its forward median (the slowest one while its own is unknown) plus encode/decode."""
    passes = sampling.steps * (2 if sampling.cfg > 1 else 1)
    return passes * forward_ms.get(variant.forward, max(forward_ms.values())) / 1e3 + fixed_s


def sample(model: Any, variant: Variant, sampling: Any, device: torch.device) -> dict[str, Any]:
    """One real sample of ``variant`` with per-stage times, density and the method's resolved parameters."""
    method: AttentionMethod = build_method(variant.method, **variant.params)
    method.validate_for(type(model).num_layers, sampling.steps)
    timing = time_sample(model, method, sampling, device)
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
        "params": method.params(),
        "timing": timing,
    }


def run_samples(model: Any, plans: list[tuple[Variant, Any]], forward_ms: dict[str, float], deadline: float,
                device: torch.device) -> list[dict[str, Any]]:  # fmt: skip
    """One row per (variant, sampling), in order: a real sample, or -- when its predicted time would end past
    ``deadline`` (a ``time.time()``) -- the prediction, marked ``"measured": false``. ``forward_ms`` (per
    :attr:`Variant.forward`) learns each measured variant's forward median."""
    rows: list[dict[str, Any]] = []
    fixed_s = 0.0  # encode + decode of the last sample, for the predictions
    for variant, sampling in plans:
        passes = sampling.steps * (2 if sampling.cfg > 1 else 1)
        row: dict[str, Any] = {"key": variant.key, "label": variant.label, "method": variant.method,
                               "steps": sampling.steps, "cfg": sampling.cfg, "transformer_passes": passes,
                               "paper_s": variant.paper_s}  # fmt: skip
        prediction = predicted_s(variant, forward_ms, sampling, fixed_s)
        row["predicted_s"] = prediction
        if time.time() + prediction > deadline:
            row |= {"measured": False, "total_s": prediction,
                    "note": f"NOT MEASURED: predicted {prediction:.0f} s from forward medians would end past "
                            "--budget-s; total_s is that prediction"}  # fmt: skip
        else:
            row |= sample(model, variant, sampling, device)
            fixed_s = row["encode_s"] + row["decode_s"]
            forward_ms.setdefault(variant.forward, row["step_median_ms"] / (passes // sampling.steps))
        rows.append(row)
        print(f"{variant.key}: {row['total_s']:.1f} s{'' if row['measured'] else ' (predicted, not measured)'}",
              flush=True)  # fmt: skip
    return rows


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
    parser.add_argument("--model", default="wan1.3b", help="model (random weights): wan1.3b, or wan-tiny to smoke")
    parser.add_argument("--steps", type=int, default=50, help="steps of the CFG samples (the paper's: 50)")
    parser.add_argument("--few-steps", type=int, default=4, help="steps of the few-step sample (DMD2's: 4)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip a sample predicted to end past this")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="the forward check also under torch.compile (every "
        "method, against the compiled baseline: outside attention shrinks, attention weighs more)",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU; use --device cpu --model wan-tiny for a smoke test")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dense = ["fa2", "cudnn"] if device.type == "cuda" else ["sdpa"]
    args.out.mkdir(parents=True, exist_ok=True)

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

    forward = forward_check(args.model, device, dense, args.out, args.compile)
    compiled = "" if forward["compiled_speedup"] is None else f"; compiled {forward['compiled_speedup']:.2f}x"
    print(f"forward: {forward['baseline']} {forward['baseline_forward_ms']:.1f} ms, linvideo + radial "
          f"{forward['linvideo_radial_forward_ms']:.1f} ms: {forward['speedup']:.2f}x (target {FORWARD_TARGET}x)"
          f"{compiled}", flush=True)  # fmt: skip
    if device.type == "cuda":
        torch.cuda.empty_cache()

    model, encoder_note = build_model(args.model, device, dtype)
    # Dense backends from the forward check; LinVideo's from its first sample (the check timed it with radial).
    forward_ms = {name: ms for name, ms in forward["forward_ms"].items() if name != "linvideo"}
    plans = [
        (variant, variant.sampling(args.model, args.steps, args.few_steps)) for variant in variants(args.model, device)
    ]
    rows = run_samples(model, plans, forward_ms, started + args.budget_s, device)
    by_key = {row["key"]: row for row in rows}
    for row in rows:
        for base in ("fa2_50x2", "cudnn_50x2"):
            row[f"speedup_vs_{base}"] = by_key[base]["total_s"] / row["total_s"]
        row["paper_speedup_vs_fa2"] = PAPER["fa2_50x2_s"] / row["paper_s"] if row["paper_s"] else None
    result = {
        "kind": "linvideo_e2e",
        "model": args.model,
        "weights": "random",
        "dtype": str(dtype).removeprefix("torch."),
        "video": vars(MODELS.get(args.model).defaults) | {"steps": args.steps, "few_steps": args.few_steps},
        "prompt_encoding": encoder_note,
        "vae_decode": "included: AutoencoderKLWan, fp32 (random weights)",
        "correctness": correctness,
        "forward_check": forward,
        "samples": rows,
        "paper": PAPER,
        "budget_s": args.budget_s,
        "environment": capture_environment(device),
        "wall_seconds": time.time() - started,
    }
    write_json_atomic(args.out / f"linvideo_e2e_{args.model}.json", result)

    print_table(rows, forward, len(PAPER_LAYERS[args.model]))
    print(f"prompt encoding: {encoder_note}. Total {time.time() - started:.0f} s.")


if __name__ == "__main__":
    main()
