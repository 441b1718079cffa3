"""Issue 24's runs on one host with several GPUs: NCCL-sharded generation against one GPU, checked, then timed.

Run 1, generation: ``bench run --model wan1.3b --random-weights`` on ``--prompts`` prompts x 1 seed, once on one GPU
and once under ``torchrun --nproc-per-node N`` (NCCL, each rank every N-th video on ``cuda:LOCAL_RANK``). The check:
both runs end with a record, the sharded one joined by rank 0 (``ranks: N``, every video listed once) and its
decoded uint8 frames equal to the single GPU's (the noise comes from the seed, so sharding must not change a clip;
the largest difference is recorded, and at most 1 level passes, as between two CPU processes in
tests/test_distributed.py). The figures: each run's wall time, the sharded run's per-rank wall time, the speedup.

Run 2, LinVideo training with FSDP2 (``bench train --method linvideo --fsdp on --activation-checkpointing``, random
weights, the model's own 480p x 81 clips for Wan 1.3B, a 2-prompt trajectory store on a 4-step grid collected once):
``--train-steps`` ADM steps on N ranks at batch 1 each, and on one rank at the same global batch through gradient
accumulation (N micro-batches: the same samples, since each micro-batch is a data shard). The check: the per-step
losses of the two agree (relative difference below ``LOSS_TOLERANCE``). The figures: seconds per step of each (the
median of the engine's ``step_seconds``: no compilation, no checkpoint save), the
scaling efficiency (one rank's time per step over N times the N ranks'), each rank's peak memory, both loss curves.

Run 3, a rank killed: the N-rank run again, one rank SIGKILLed once the first checkpoint (``--checkpoint-every``) is
committed; torchrun ends the run and the same command resumes it from that checkpoint. Nothing may be lost: the
resumed run keeps, bit for bit, the losses of the steps its checkpoint holds, and ends at ``--train-steps``. Its
later losses must agree with run 2's uninterrupted N-rank run (``--reference``) within ``LOSS_TOLERANCE``: not bit
for bit, since two CUDA runs of the same seeds already differ by ~1e-3 before any kill (bf16 kernels that reduce
in a varying order; the gloo tests in tests/test_train_engine.py do compare bit for bit). The same difference
before the kill is recorded beside it as the run-to-run floor. A copy of the killed run's folder is then resumed on
one rank (accumulation N) to the end: its losses within ``LOSS_TOLERANCE`` too.

    python -m harness.benchmarks.multi_gpu --out $OUT                 # on a machine with 2 or more GPUs
    python -m harness.benchmarks.multi_gpu --out $OUT --runs train,kill   # a part (each run resumes in --work)
    python -m harness.benchmarks.multi_gpu --out /tmp/x --device cpu --model wan-tiny --method sdpa --nproc 2 \
        --target-layers 1 --train-steps 4 --checkpoint-every 2          # smoke (gloo)

Each step is a ``bench`` process (an argument list, no shell) whose log is kept under ``OUT/logs``; a finished
step is not run again when the command is repeated with the same ``--work`` (bench run and bench train resume by
themselves), and each run's result is written to ``OUT/multi_gpu.json`` as soon as it is known.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from harness.atomic import write_json_atomic
from harness.benchmarks.children import child_pids, spawn

RUNS = ("gen", "train", "kill")
TRAIN_PROMPTS = "train_prompts.txt"  # under --work: the first two of PROMPTS, written once per command
LOSS_TOLERANCE = 1e-2  # per-step relative difference of the losses, N ranks vs one rank with accumulation N (bf16)
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
    single_s = _step("gen_1", _bench(args, *spec, "--device", args.device, "--runs-dir", str(single_dir)), args)
    sharded_s = _step(f"gen_{args.nproc}", _bench(args, *spec, "--device", args.device, "--runs-dir",
                                                  str(sharded_dir),
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


def _meta(out: Path) -> dict[str, Any]:
    from harness.checkpoints import TRAINING_META

    return json.loads((out / TRAINING_META).read_text())


def _train_command(args: argparse.Namespace, out: Path, ranks: int, steps: int) -> list[str]:
    """``bench train --method linvideo`` at batch 1 per rank and a global batch of ``args.nproc`` on ``ranks``."""
    weights = ("--weights", "random") if args.model in ("wan1.3b", "wan14b") else ()
    options = ["train", "--method", "linvideo", "--model", args.model, *weights, "--target-layers",
               str(args.target_layers), "--steps", str(steps), "--batch-size", "1", "--accumulation",
               str(args.nproc // ranks), "--prompt-file", str(args.work / TRAIN_PROMPTS), "--sampler-steps", "4",
               "--store", str(args.work / "store"), "--collect-batch", "1", "--fsdp", "on",
               "--activation-checkpointing", "--checkpoint-every", str(args.checkpoint_every), "--device", args.device,
               "--no-progress", "--out", str(out)]  # fmt: skip
    return _bench(args, *options, ranks=ranks)


def _curve(meta: dict[str, Any]) -> list[float]:
    return [step.get("total", step["objective"]) for step in meta["losses"]]


def _median_step_seconds(meta: dict[str, Any]) -> float:
    """A step's wall time in the steady state: the median over the run's steps, so that the first step's
    compilation (and a resume's) and the checkpoints' saves do not count."""
    return statistics.median(meta["step_seconds"])


def _largest_difference(one: list[float], other: list[float]) -> float:
    if len(one) != len(other):
        return math.inf
    return max(abs(a - b) / max(abs(a), abs(b), 1e-12) for a, b in zip(one, other, strict=True))


def training(args: argparse.Namespace) -> dict[str, Any]:
    """Run 2: LinVideo on N ranks against one rank with accumulation N; the same losses, the scaling."""
    one_dir, many_dir = args.work / "train_1", args.work / f"train_{args.nproc}"
    _step("train_1", _train_command(args, one_dir, 1, args.train_steps), args)
    _step(f"train_{args.nproc}", _train_command(args, many_dir, args.nproc, args.train_steps), args)
    one, many = _meta(one_dir), _meta(many_dir)
    per_step = {"one_rank": _median_step_seconds(one), f"{args.nproc}_ranks": _median_step_seconds(many)}
    mean = {"one_rank": one["seconds"] / one["step"], f"{args.nproc}_ranks": many["seconds"] / many["step"]}
    difference = _largest_difference(_curve(one), _curve(many))
    return {
        "checks": {"same_losses": difference <= LOSS_TOLERANCE},
        "passed": difference <= LOSS_TOLERANCE,
        "largest_loss_difference": difference,
        "steps": args.train_steps,
        "global_batch": args.nproc,
        "seconds_per_step": per_step,
        "mean_seconds_per_step_with_warmup_and_checkpoints": mean,
        "scaling_efficiency": per_step["one_rank"] / (args.nproc * per_step[f"{args.nproc}_ranks"]),
        "peak_gib_per_rank": {
            "one_rank": one.get("peak_gib_per_rank"),
            f"{args.nproc}_ranks": many.get("peak_gib_per_rank"),
        },
        "losses": {"one_rank": one["losses"], f"{args.nproc}_ranks": many["losses"]},
        "layout": {"one_rank": one["layout"], f"{args.nproc}_ranks": many["layout"]},
    }


def _kill_one_rank_after_first_checkpoint(command: list[str], out: Path, args: argparse.Namespace) -> int:
    """Start ``command`` (torchrun), SIGKILL one of its ranks once a checkpoint is committed, wait for torchrun to
    end the run; the step of the checkpoint left behind."""
    from harness.checkpoints import TRAINING_META

    logs = args.out / "logs"
    with (logs / "kill.log").open("wb") as log:
        launcher = spawn(command, stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + args.kill_timeout_s
        while not (out / TRAINING_META).exists() and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = child_pids(launcher.pid)
        if launcher.poll() is not None or not workers:
            raise RuntimeError(f"the run ended before a rank could be killed (exit {launcher.poll()}); see kill.log")
        os.kill(workers[-1], signal.SIGKILL)
        code = launcher.wait()
    meta = _meta(out)
    if code == 0 or meta.get("finished"):
        raise RuntimeError("the run finished although a rank was killed: kill earlier (a larger --train-steps)")
    return meta["step"]


def resume_checks(kept: list[dict[str, float]], resumed: dict[str, Any], on_one: dict[str, Any],
                  reference: list[float], steps: int) -> dict[str, Any]:  # fmt: skip
    """Run 3's verdict from the losses the kill left in its checkpoint (``kept``, one entry per step), the metas of
    the run resumed on N ranks and of its copy resumed on one, and the uninterrupted run's loss curve."""
    step = len(kept)
    resumed_curve, on_one_curve = _curve(resumed), _curve(on_one)
    checks = {
        "killed_mid_way": 0 < step < steps,
        "nothing_lost": resumed["losses"][:step] == kept and on_one["losses"][:step] == kept,
        "resumed_to_the_end": all(meta.get("finished") and meta["step"] == steps for meta in (resumed, on_one)),
        "resumed_close": _largest_difference(resumed_curve[step:], reference[step:]) <= LOSS_TOLERANCE,
        "resumed_on_one_rank_close": _largest_difference(on_one_curve[step:], reference[step:]) <= LOSS_TOLERANCE,
    }
    return {
        "checks": checks,
        "passed": all(checks.values()),
        "killed_at_checkpoint_step": step,
        "largest_loss_difference": {
            "before_the_kill": _largest_difference(_curve({"losses": kept}), reference[:step]),
            "resumed": _largest_difference(resumed_curve[step:], reference[step:]),
            "resumed_on_one_rank": _largest_difference(on_one_curve[step:], reference[step:]),
        },
        "notes": {"resumed": resumed.get("notes"), "resumed_on_one_rank": on_one.get("notes")},
    }


def killed(args: argparse.Namespace) -> dict[str, Any]:
    """Run 3: a rank SIGKILLed after the first checkpoint, the run resumed on N ranks, then a copy on one rank."""
    killed_dir, single_dir = args.work / "kill", args.work / "kill_resumed_on_1"
    reference = args.reference or args.work / f"train_{args.nproc}" / "training_state.json"
    if not reference.exists():
        raise RuntimeError(f"run 3 compares with run 2's uninterrupted run, and {reference} does not exist: run "
                           f"--runs train first, or pass --reference")  # fmt: skip
    command = _train_command(args, killed_dir, args.nproc, args.train_steps)
    kept_path = killed_dir / "kill_step.json"
    if not kept_path.exists():
        shutil.rmtree(killed_dir, ignore_errors=True)
        step = _kill_one_rank_after_first_checkpoint(command, killed_dir, args)
        shutil.rmtree(single_dir, ignore_errors=True)
        shutil.copytree(killed_dir, single_dir)
        write_json_atomic(kept_path, {"step": step, "losses": _meta(killed_dir)["losses"]})
    _step("kill_resume", command, args)
    _step("kill_resume_on_1", _train_command(args, single_dir, 1, args.train_steps), args)
    kept = json.loads(kept_path.read_text())["losses"]
    return resume_checks(kept, _meta(killed_dir), _meta(single_dir), _curve(json.loads(reference.read_text())),
                         args.train_steps)  # fmt: skip


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
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {', '.join(RUNS)}")
    parser.add_argument("--target-layers", type=int, default=16, help="LinVideo's linear layers (paper, 1.3B: 16)")
    parser.add_argument("--train-steps", type=int, default=20, help="ADM steps of runs 2 and 3 (the issue: 20)")
    parser.add_argument("--checkpoint-every", type=int, default=5, help="steps between checkpoints (run 3 kills "
                        "a rank after the first)")  # fmt: skip
    parser.add_argument("--reference", type=Path, default=None, help="run 3: training_state.json of run 2's "
                        "uninterrupted N-rank run (default: WORK/train_N/; a committed one spares run 2)")  # fmt: skip
    parser.add_argument("--kill-timeout-s", type=float, default=900.0, help="run 3: longest wait for a checkpoint")
    args = parser.parse_args()
    args.runs = tuple(part for part in args.runs.split(",") if part)
    if set(args.runs) - set(RUNS):
        parser.error(f"unknown runs {sorted(set(args.runs) - set(RUNS))}; choose from {', '.join(RUNS)}")
    if args.nproc == 0:
        args.nproc = torch.cuda.device_count() if args.device == "cuda" else 2
    if args.nproc < 2:
        parser.error(f"needs 2 or more ranks, got {args.nproc} (visible GPUs: set --nproc or use a larger machine)")
    if not 1 <= args.prompts <= len(PROMPTS):
        parser.error(f"--prompts must be in [1, {len(PROMPTS)}]")
    (args.out / "logs").mkdir(parents=True, exist_ok=True)  # every step's log, the killed run's among them
    from harness.environment import capture_environment

    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / TRAIN_PROMPTS).write_text("\n".join(PROMPTS[:2]) + "\n")
    path = args.out / "multi_gpu.json"
    result: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    result.update({"nproc": args.nproc, "model": args.model, "args": {k: str(v) for k, v in vars(args).items()},
                   "environment": capture_environment(torch.device(args.device))})  # fmt: skip
    for name, measure in (("gen", generation), ("train", training), ("kill", killed)):
        if name in args.runs:
            result[name] = measure(args)
            write_json_atomic(path, result)
            print(f"\n{name}: passed {result[name]['passed']}; checks {result[name]['checks']}", flush=True)
    summary(result, args.nproc)
    sys.exit(0 if all(result[name]["passed"] for name in args.runs) else 1)


def summary(result: dict[str, Any], nproc: int) -> None:
    """The short table at the end: each run's check and its headline figures."""
    if "gen" in result:
        gen = result["gen"]
        print(f"generation, {gen['videos']} videos: wall {gen['wall_s']['one_process']:.1f} s on 1 rank, "
              f"{gen['wall_s']['sharded']:.1f} s on {nproc} (speedup {gen['speedup']:.2f}x), per rank "
              f"{gen['per_rank']}, frames identical {gen['identical_frames']}")  # fmt: skip
    if "train" in result:
        train = result["train"]
        print(f"training, {train['steps']} ADM steps, global batch {train['global_batch']}: s/step "
              f"{train['seconds_per_step']}, scaling efficiency {train['scaling_efficiency']:.2f}, peak GiB "
              f"{train['peak_gib_per_rank']}, largest loss difference "
              f"{train['largest_loss_difference']:.2e}")  # fmt: skip
    if "kill" in result:
        kill = result["kill"]
        print(f"kill -9 of a rank after step {kill['killed_at_checkpoint_step']}: {kill['checks']}")


if __name__ == "__main__":
    main()
