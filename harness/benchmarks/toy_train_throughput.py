"""Training throughput of the toy teacher on this device: optimizer steps per second, eager vs compiled.

At the toy size one step is a few hundred small kernels, so the eager GPU step is bound by launches;
this script measures what ``torch.compile`` buys and sizes a training run to a time budget. The steps are the
training engine's (:mod:`harness.train`), timed by :class:`~harness.benchmarks.train_fsdp_gpu.Timer`.

    python -m harness.benchmarks.toy_train_throughput --widths 128 --out throughput.json
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import torch

from harness.atomic import write_json_atomic
from harness.benchmarks.train_fsdp_gpu import TimedToyTask, Timer
from harness.toyworld.train import ToyTrainConfig

WARMUP_STEPS = 5  # compilation happens in these


def steps_per_second(config: ToyTrainConfig, device: torch.device, compile_model: bool, steps: int) -> float:
    """``steps`` timed engine steps after 5 warm-up steps (compilation excluded)."""
    config = dataclasses.replace(config, steps=1000, pool_size=max(config.batch_size * 4, 1024), eval_clips=0)
    timer = Timer(device, WARMUP_STEPS, steps)
    with tempfile.TemporaryDirectory() as folder:
        result = timer.run(TimedToyTask(config, Path(folder), device, timer, compile_model=compile_model))
    if result["status"] != "ok":
        raise RuntimeError(f"width {config.width}: {result}")
    return 1.0 / result["mean_step_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[128], help="transformer widths to measure")
    parser.add_argument("--ffn-ratio", type=int, default=2, help="ffn_dim = ratio * width")
    parser.add_argument("--batch-size", type=int, default=256, help="clips per step")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per variant")
    parser.add_argument("--eager", action="store_true", help="also time the eager (uncompiled) step")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for width in args.widths:
        config = ToyTrainConfig(width=width, ffn_dim=args.ffn_ratio * width, batch_size=args.batch_size)
        for compiled in ([False] if args.eager else []) + [True]:
            rate = steps_per_second(config, device, compiled, args.steps)
            rows.append({"width": width, "ffn_dim": config.ffn_dim, "batch_size": args.batch_size,
                         "compiled": compiled, "steps_per_s": rate})  # fmt: skip
            print(f"width {width} ffn {config.ffn_dim} compiled {compiled}: {rate:.1f} steps/s", flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if args.out:
        write_json_atomic(args.out, {"device": name, "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
