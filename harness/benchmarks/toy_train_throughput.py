"""Training throughput of the toy teacher on this device: optimizer steps per second, eager vs compiled.

At the toy size one step is a few hundred small kernels, so the eager GPU step is bound by launches;
this script measures what ``torch.compile`` buys and sizes a training run to a time budget.

    python -m harness.benchmarks.toy_train_throughput --widths 128 --out throughput.json
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from harness.atomic import write_json_atomic
from harness.toyworld.checkpoint import TOY_ENCODER_CONFIG, build_modules
from harness.toyworld.train import ScenePool, ToyTrainConfig, flow_matching_loss


def steps_per_second(config: ToyTrainConfig, device: torch.device, compile_model: bool, steps: int) -> float:
    """Median-free simple rate: ``steps`` timed steps after 5 warm-up steps (compilation excluded)."""
    transformer, encoder = (m.to(device) for m in build_modules(config.transformer_config(), TOY_ENCODER_CONFIG))
    params = [*transformer.parameters(), *encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    generator = torch.Generator(device=device).manual_seed(0)
    pool = ScenePool(max(config.batch_size * 4, 1024), random.Random(0), device)
    forward = torch.compile(transformer) if compile_model else transformer

    def step() -> None:
        clips, ids = pool.batch(config.batch_size, generator)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = flow_matching_loss(forward, encoder, clips, ids, generator, 0.1, config.timestep_shift)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    for _ in range(5):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps / (time.perf_counter() - started)


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
