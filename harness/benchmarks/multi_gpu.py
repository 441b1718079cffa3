"""Issue 24's runs on one host with several GPUs: NCCL-sharded generation against one GPU, checked, then timed.

Run 1, generation: ``bench run --model wan1.3b --random-weights`` on ``--prompts`` prompts x 1 seed, once on one GPU
and once under ``torchrun --nproc-per-node N`` (NCCL, each rank every N-th video on ``cuda:LOCAL_RANK``). The check:
both runs end with a record, the sharded one joined by rank 0 (``ranks: N``, every video listed once) and its
decoded uint8 frames equal to the single GPU's (the noise comes from the seed, so sharding must not change a clip;
the largest difference is recorded, and at most 1 level passes, as between two CPU processes in
tests/test_distributed.py). The figures: each run's wall time, the sharded run's per-rank wall time, the speedup.

    python -m harness.benchmarks.multi_gpu --out $OUT                 # on a machine with 2 or more GPUs
    python -m harness.benchmarks.multi_gpu --out /tmp/x --device cpu --model wan-tiny --nproc 2   # smoke (gloo)

Each step is a ``bench`` process (an argument list, no shell) whose log is kept under ``OUT/logs``; a finished
step is not run again when the command is repeated with the same ``--work`` (bench run resumes by itself).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from harness.atomic import write_json_atomic
from harness.benchmarks.children import spawn

# Plain scene descriptions: random weights draw noise whatever the text, but the text encoder still runs on them.
PROMPTS = (
    "a red car drives along a coastal road at sunset",
    "a cat jumps onto a wooden table in a sunny kitchen",
    "waves crash against rocks under a grey sky",
    "a person rides a bicycle through a city park in autumn",
    "a hot air balloon rises over green hills",
    "snow falls on a quiet village street at night",
    "a dog runs across a beach chasing a ball",
    "a train passes over a stone bridge in the mountains",
)


def _bench(args: argparse.Namespace, *options: str, ranks: int = 1) -> list[str]:
    if ranks == 1:
        return [sys.executable, "-m", "harness.cli", *options]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m",
            "harness.cli", *options]  # fmt: skip


def _step(name: str, command: list[str], args: argparse.Namespace) -> float:
    """Run one step to its end (its output in OUT/logs/NAME.log); its wall seconds. Raises on a failed step."""
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"[{name}] {' '.join(command)}", flush=True)
    started = time.perf_counter()
    with (logs / f"{name}.log").open("wb") as log:
        code = spawn(command, stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"}).wait()
    seconds = time.perf_counter() - started
    if code != 0:
        tail = (logs / f"{name}.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"step {name} failed (exit {code}):\n{tail}")
    return seconds


def _record(runs_dir: Path) -> dict[str, Any]:
    records = sorted(runs_dir.glob("*.json"))
    if len(records) != 1:
        raise RuntimeError(f"{runs_dir} holds {len(records)} run records, expected 1")
    return json.loads(records[0].read_text())


def _frame_differences(one: dict[str, Any], one_dir: Path, other: dict[str, Any], other_dir: Path) -> dict[str, int]:
    """The largest absolute difference of each video's decoded uint8 frames between two runs, by frames key
    (a video missing from ``other``: 256)."""
    from harness.eval.run_suites import load_frames

    theirs = load_frames(other, other_dir)
    return {key: int((frames.int() - theirs[key].int()).abs().max()) if key in theirs else 256
            for key, frames in load_frames(one, one_dir).items()}  # fmt: skip


def generation(args: argparse.Namespace) -> dict[str, Any]:
    """Run 1: the same spec on one device and on ``args.nproc`` ranks; identical frames, one joined record."""
    spec = ["run", "--model", args.model, "--random-weights", "--method", args.method, "--seeds", "0",
            "--steps", str(args.steps), "--eval", "none", "--no-progress", "--json",
            *[arg for prompt in PROMPTS[: args.prompts] for arg in ("--prompt", prompt)]]  # fmt: skip
    if args.frames:
        spec += ["--frames", str(args.frames), "--height", str(args.height), "--width", str(args.width)]
    single_dir, sharded_dir = args.work / "gen_1", args.work / f"gen_{args.nproc}"
    device = "cuda" if args.device == "cuda" else args.device
    single_s = _step("gen_1", _bench(args, *spec, "--device", device, "--runs-dir", str(single_dir)), args)
    sharded_s = _step(f"gen_{args.nproc}", _bench(args, *spec, "--device", device, "--runs-dir", str(sharded_dir),
                                                  ranks=args.nproc), args)  # fmt: skip
    single, sharded = _record(single_dir), _record(sharded_dir)
    differences = _frame_differences(single, single_dir, sharded, sharded_dir)
    videos = sharded["artifacts"]["videos"]
    checks = {
        "joined_record_ranks": sharded.get("ranks") == args.nproc,
        "every_video_once": sorted(v["prompt_index"] for v in videos) == list(range(args.prompts)),
        "same_frames": len(differences) == args.prompts and max(differences.values()) <= 1,
    }
    return {
        "checks": checks,
        "passed": all(checks.values()),
        "videos": args.prompts,
        "wall_s": {
            "one_process": single.get("wall_seconds"),
            "sharded": sharded.get("wall_seconds"),
            "one_process_command": single_s,
            "sharded_command": sharded_s,
        },
        "per_rank": sharded.get("rank_wall_seconds"),
        "speedup": single["wall_seconds"] / sharded["wall_seconds"] if sharded.get("wall_seconds") else None,
        "frame_max_difference": differences,
        "identical_frames": all(value == 0 for value in differences.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")), help="results folder ($OUT)")
    parser.add_argument("--work", type=Path, default=Path("checkpoints/multi_gpu"), help="runs and checkpoints")
    parser.add_argument("--nproc", type=int, default=0, help="ranks (0: every visible GPU)")
    parser.add_argument("--model", default="wan1.3b", help="model adapter (wan1.3b; wan-tiny for a CPU smoke run)")
    parser.add_argument("--method", default="cudnn", help="attention method of the generation run")
    parser.add_argument("--prompts", type=int, default=8, help="prompts, one seed each (the issue: 8)")
    parser.add_argument("--steps", type=int, default=8, help="sampler steps per video (the issue names none)")
    parser.add_argument("--frames", type=int, default=0, help="frames (0: the model's; with --height, --width)")
    parser.add_argument("--height", type=int, default=480, help="height in pixels, with --frames")
    parser.add_argument("--width", type=int, default=832, help="width in pixels, with --frames")
    parser.add_argument("--device", default="cuda", help="cuda (NCCL) or cpu (gloo, smoke runs)")
    args = parser.parse_args()
    if args.nproc == 0:
        args.nproc = torch.cuda.device_count() if args.device == "cuda" else 2
    if args.nproc < 2:
        parser.error(f"needs 2 or more ranks, got {args.nproc} (visible GPUs: set --nproc or use a larger machine)")
    if not 1 <= args.prompts <= len(PROMPTS):
        parser.error(f"--prompts must be in [1, {len(PROMPTS)}]")
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "nproc": args.nproc,
        "model": args.model,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    from harness.environment import capture_environment

    result["environment"] = capture_environment(torch.device(args.device))
    result["generation"] = generation(args)
    write_json_atomic(args.out / "multi_gpu.json", result)
    gen = result["generation"]
    print(f"\ngeneration, {gen['videos']} videos: checks {gen['checks']}; wall {gen['wall_s']['one_process']:.1f} s on "
          f"1 rank, {gen['wall_s']['sharded']:.1f} s on {args.nproc} (speedup {gen['speedup']:.2f}x)")  # fmt: skip
    sys.exit(0 if gen["passed"] else 1)


if __name__ == "__main__":
    main()
