"""LinVideo on the GPU at the paper's shapes: correctness first, then latency, then one training step.

1. Correctness (fresh random inputs): Hedgehog linear attention in bf16 against the float64 O(n^2)
   reference; mixed attention at r = 1 against dense. A failure stops the script.
2. Latency (random weights, real architecture): ``bench latency`` of cudnn, fa2 and linvideo with the
   paper's converted layers: 16 of 30 for Wan 1.3B at 480p x 81 frames, 22 of 40 for Wan 14B at 720p;
   ``--compile`` times each again with the transformer under ``torch.compile`` (as diffusers users run it), where
   the parts outside attention are faster and the linear layers' saving weighs more.
3. One ADM training step of the real Wan 1.3B architecture (random weights): step time and peak memory,
   after a warm-up step; ``--train-frames`` reduces the clip when memory demands (stated in the JSON).

    python -m harness.benchmarks.linvideo_gpu --out $OUT
    python -m harness.benchmarks.linvideo_gpu --out /tmp/x --device cpu --models wan-tiny --train-model wan-tiny
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from harness.atomic import write_json_atomic
from harness.latency_run import LatencyRequest, run_latency, save_latency
from harness.models.base import MODELS

# The paper's 1.3B selection {2-8, 10-13, 15-16, 23, 25, 30} (1-indexed), 0-indexed here. The 14B
# selection is not published: the first 22 layers after layer 0 stand in for it (same count).
PAPER_LAYERS = {
    "wan1.3b": (1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 14, 15, 22, 24, 29),
    "wan14b": tuple(range(1, 23)),
    "wan-tiny": (1,),
}
BF16_RELATIVE_TOLERANCE = 2e-2


def check_correctness(device: torch.device, tokens: int = 2048, heads: int = 12, dim: int = 128) -> dict[str, float]:
    """Relative errors of Hedgehog linear attention (bf16) and of mixed attention at r = 1, on fresh random
    q, k, v ``(1, heads, tokens, dim)``."""
    import torch.nn.functional as F

    from methods.kernels.linear_attention import naive_linear_attention
    from methods.linvideo.attention import TransferState

    q, k, v = (torch.randn(1, heads, tokens, dim, device=device) for _ in range(3))
    state = TransferState(1, heads, dim).to(device)
    with torch.no_grad():
        state.rho.fill_(0.0)
        reference = naive_linear_attention(state.q_maps[0](q), state.k_maps[0](k), v)
        linear = state.mixed(0, q.bfloat16(), k.bfloat16(), v.bfloat16())
        state.rho.fill_(1.0)
        mixed_dense = state.mixed(0, q, k, v)
        dense = F.scaled_dot_product_attention(q, k, v)

    def relative(out: torch.Tensor, ref: torch.Tensor) -> float:
        return float((out.double() - ref.double()).norm() / ref.double().norm())

    return {"hedgehog_linear_bf16": relative(linear, reference), "mixed_r1_vs_dense": relative(mixed_dense, dense)}


def training_step(model_name: str, device: torch.device, frames: int | None, out: Path) -> dict[str, Any]:
    """Time one LinVideo ADM step of the training engine (after one warm-up step) on random weights; peak memory of
    the timed step in GiB. The run stops before its checkpoint."""
    from harness.benchmarks.train_fsdp_gpu import StopTiming
    from harness.spec import Sampling
    from methods.linvideo.collect import CollectionSpec, collect
    from methods.linvideo.train import LinVideoTrainConfig, LinVideoTrainer

    adapter_cls = MODELS.get(model_name)
    dtype = torch.float32  # master weights; the step runs under bf16 autocast on CUDA
    sampling: Sampling = dataclasses.replace(
        adapter_cls.defaults, steps=2, frames=frames or adapter_cls.defaults.frames
    )
    teacher = adapter_cls.load("random", device, dtype)
    spec = CollectionSpec(model_name, "random", sampling, ("a corgi surfing a wave at sunset",), (0,), batch_size=1)
    store = collect(teacher, spec, out / "store", show_progress=False)
    config = LinVideoTrainConfig(target_layers=len(PAPER_LAYERS[model_name]), batch_size=1, steps=2,
                                 activation_checkpointing=device.type == "cuda")  # fmt: skip
    trainer = LinVideoTrainer(config, teacher, store, out / "train")
    marks: list[float] = []

    def on_step(step: int) -> None:  # after each engine step, before any checkpoint
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            if step == 1:  # the peak of the timed step alone
                torch.cuda.reset_peak_memory_stats(device)
        marks.append(time.perf_counter())
        if step == 2:
            raise StopTiming

    started = time.perf_counter()
    with contextlib.suppress(StopTiming):
        trainer.run(show_progress=False, on_step=on_step)
    seconds = [marks[0] - started, marks[1] - marks[0]]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"model": model_name, "weights": "random", "video": f"{sampling.height}x{sampling.width}x{sampling.frames}",
            "tokens": adapter_cls.token_grid(sampling).tokens, "warmup_step_s": seconds[0], "step_s": seconds[1],
            "peak_gib": peak, "activation_checkpointing": config.activation_checkpointing,
            "note": "ADM step: student fwd+bwd (CFG); teacher, student forwards at x_hat (CFG)"}  # fmt: skip


def _compiled_text(compiled: dict[str, Any] | None) -> str:
    if not compiled:
        return ""
    if "error" in compiled:
        return f"; compiled: {compiled['error']}"
    return (f"; compiled {compiled['forward']['median_ms']:.1f} ms, {compiled['speedup_vs_baseline']:.2f}x, "
            f"{compiled['graphs']} graph(s)")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON results")
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test with wan-tiny)")
    parser.add_argument("--models", default="wan1.3b,wan14b", help="comma-separated models for the latency part")
    parser.add_argument("--train-model", default="wan1.3b", help="model of the training-step part ('' skips it)")
    parser.add_argument("--train-frames", type=int, default=None, help="frames of the training clip (default 81)")
    parser.add_argument("--compile", action="store_true", help="also time every method under torch.compile")
    parser.add_argument("--dense", default=None,
                        help="comma-separated dense methods timed beside linvideo "
                             "(default cudnn,fa2 on CUDA, sdpa on CPU)")  # fmt: skip
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    default_dense = "cudnn,fa2" if device.type == "cuda" else "sdpa"
    dense = [name for name in (args.dense or default_dense).split(",") if name]

    errors = check_correctness(device)
    print("correctness:", json.dumps(errors), flush=True)
    if errors["hedgehog_linear_bf16"] > BF16_RELATIVE_TOLERANCE or errors["mixed_r1_vs_dense"] > 1e-3:
        raise SystemExit("correctness check failed: nothing timed")

    rows = []
    for model in [m for m in args.models.split(",") if m]:
        layers = list(PAPER_LAYERS[model])
        latency_path = args.out / f"linvideo_latency_{model}.json"
        result = run_latency(LatencyRequest(
            model=model, methods=[*dense, "linvideo"], weights="random", device=args.device,
            dtype="bfloat16" if device.type == "cuda" else "float32", warmup=1 if model == "wan14b" else 2,
            repeats=3 if model == "wan14b" else 5, method_params={"linvideo": {"linear_layers": layers}},
            compile=args.compile,
        ), out=latency_path, log=print)  # fmt: skip
        result["correctness_relative_error"] = errors
        save_latency(result, latency_path)
        for name, entry in result["methods"].items():
            rows.append({"model": model, "method": name, "forward_ms": entry["forward"]["median_ms"],
                         "attn_ms_per_layer": entry["attention_ms_per_layer"], "density": entry.get("density"),
                         "speedup": entry["speedup_vs_baseline"], "baseline": result["baseline"],
                         "compiled": entry.get("compiled")})  # fmt: skip
        if device.type == "cuda":
            torch.cuda.empty_cache()
    train = training_step(args.train_model, device, args.train_frames, args.out) if args.train_model else None
    write_json_atomic(args.out / "linvideo_summary.json", {"latency": rows, "training_step": train})
    for row in rows:
        print(f"{row['model']:>8} {row['method']:>9} forward {row['forward_ms']:9.1f} ms  attention "
              f"{row['attn_ms_per_layer']:7.2f} ms/layer  density {row['density']:.2f}  "
              f"speedup vs {row['baseline']} {row['speedup']:.2f}x" + _compiled_text(row["compiled"]))  # fmt: skip
    if train:
        print(
            f"training step ({train['model']}, {train['video']}): {train['step_s']:.2f} s, peak {train['peak_gib']} GiB"
        )


if __name__ == "__main__":
    main()
