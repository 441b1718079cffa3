"""The training engine's step on one GPU through the FSDP2 path (world size 1): step time and peak memory.

1. Correctness: three steps of the toy teacher through the engine with FSDP2 (bf16 mixed precision) and
   activation checkpointing, against the same steps without either: the per-step losses must agree to bf16
   precision (relative difference < 2e-2). A failure stops the script.
2. Timing, each case FSDP2 + activation checkpointing on and off: the toy teacher task, and a Wan-1.3B-shaped
   transformer (diffusers ``WanTransformer3DModel`` at the 1.3B config, random weights) trained with a plain
   flow-matching loss on random latents of 480p x 81 frames (16 x 21 x 60 x 104, 32,760 tokens) and random
   text embeddings (512 x 4096). Each case runs ``--warmup`` steps, then ``--steps`` timed ones (the mean, timed
   from the task's after-step hook, synchronised at both ends); peak memory is ``torch.cuda.max_memory_allocated``
   over the timed steps. A case out of memory is recorded as such. No checkpoint is written (the run stops first).

    python -m harness.benchmarks.train_fsdp_gpu --out $OUT
    python -m harness.benchmarks.train_fsdp_gpu --out /tmp/x --device cpu --wan tiny --toy-batch 16   # smoke mode

3. LinVideo's ADM step (learned selection, the paper's layer count) on the same Wan shape, random weights, from a
   one-prompt 2-step trajectory store collected first, FSDP2 + activation checkpointing on and off. Its own check
   first: three LinVideo steps of the toy teacher with FSDP2 + activation checkpointing against the plain path
   (the same tolerance); a failure skips the LinVideo timings only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.atomic import write_json_atomic
from harness.benchmarks.linvideo_gpu import PAPER_LAYERS
from harness.environment import capture_environment
from harness.models.base import MODELS, ModelAdapter
from harness.toyworld.train import ToyTeacherTask, ToyTrainConfig
from harness.train import engine
from harness.train.config import EngineConfig
from harness.train.engine import Run
from harness.train.task import Group, Modules, Shard, Task
from methods.linvideo.collect import CollectionSpec, TrajectoryStore, collect
from methods.linvideo.train import LinVideoTrainConfig, LinVideoTrainer

LOSS_RELATIVE_TOLERANCE = 2e-2  # bf16 compute (FSDP's bf16 parameters) against bf16 autocast over fp32 weights
# The Wan 2.1 VAE: 4x in time, 8x in space, 16 latent channels; T5 prompt embeddings of 512 x 4096.
WAN_SHAPES = {"1.3b": {"frames": 81, "height": 480, "width": 832, "text_length": 512},
              "tiny": {"frames": 9, "height": 64, "width": 64, "text_length": 8}}  # fmt: skip


class StopTiming(Exception):
    """Raised from the after-step hook once the timed steps are done (before the engine's final checkpoint)."""


class Timer:
    """Wall time of ``steps`` steps after ``warmup`` ones (synchronised at both ends only, so that a launch-bound
    step is not slowed by the measurement); peak memory over the timed steps."""

    def __init__(self, device: torch.device, warmup: int, steps: int) -> None:
        self.device, self.warmup, self.steps = device, warmup, steps
        self.started = 0.0

    def tick(self, step: int) -> None:
        """Called after optimizer step ``step`` (1-based); raises :class:`StopTiming` after the last timed one."""
        if step not in (self.warmup, self.warmup + self.steps):
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if step == self.warmup:
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            self.started = time.perf_counter()
            return
        self.seconds = (time.perf_counter() - self.started) / self.steps
        raise StopTiming

    def run(self, task: Task) -> dict[str, Any]:
        """Run ``task`` through the engine until the timed steps are done; out of memory is a result too."""
        try:
            engine.run(task, show_progress=False)
        except StopTiming:
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
            return {"status": "ok", "timed_steps": self.steps, "mean_step_seconds": self.seconds, "peak_gib": peak}
        except torch.OutOfMemoryError as exc:
            return {"status": "out of memory", "error": str(exc).splitlines()[0]}
        raise RuntimeError(f"{task.name} ended before {self.warmup + self.steps} steps")


class TimedToyTask(ToyTeacherTask):
    """The toy teacher task with a :class:`Timer` ticking after each step (``None``: untimed)."""

    def __init__(self, config: ToyTrainConfig, out: Path, device: torch.device, timer: Timer | None,
                 compile_model: bool = False) -> None:  # fmt: skip
        super().__init__(config, out, device, compile_model=compile_model)
        self.timer = timer

    def after_step(self, step: int, run: Run) -> None:
        super().after_step(step, run)
        if self.timer is not None:
            self.timer.tick(step)


class TimedLinVideo(LinVideoTrainer):
    """LinVideo's task with a :class:`Timer` ticking after each step (``None``: untimed)."""

    def __init__(self, config: LinVideoTrainConfig, teacher: ModelAdapter, store: TrajectoryStore, out: Path,
                 timer: Timer | None) -> None:  # fmt: skip
        super().__init__(config, teacher, store, out)
        self.timer = timer

    def after_step(self, step: int, run: Run) -> None:
        super().after_step(step, run)
        if self.timer is not None:
            self.timer.tick(step)


LINVIDEO_MODELS = {"1.3b": "wan1.3b", "tiny": "wan-tiny"}


def linvideo_store(model: str, device: torch.device, folder: Path) -> TrajectoryStore:
    """A one-prompt trajectory store of ``model`` (random weights, except the toy's builtin) on a 2-step grid at
    the model's clip shape."""
    from dataclasses import replace

    adapter_cls = MODELS.get(model)
    weights = "builtin" if model == "toy" else "random"
    teacher = adapter_cls.load(weights, device, torch.float32)
    prompts = adapter_cls.training_prompts(1, 0) if model == "toy" else ("a corgi surfing a wave at sunset",)
    spec = CollectionSpec(model, weights, replace(adapter_cls.defaults, steps=2), tuple(prompts), (0,), batch_size=1)
    return collect(teacher, spec, folder, show_progress=False)


def linvideo_task(model: str, store: TrajectoryStore, device: torch.device, fsdp: bool, steps: int, out: Path,
                  timer: Timer | None) -> TimedLinVideo:  # fmt: skip
    """LinVideo's task on a fresh teacher (the engine casts a frozen teacher to bf16 in place)."""
    teacher = MODELS.get(model).load("builtin" if model == "toy" else "random", device, torch.float32)
    target = len(PAPER_LAYERS[model]) if model in PAPER_LAYERS else 4  # the paper's 16 of Wan 1.3B's 30 layers
    config = LinVideoTrainConfig(target_layers=target, steps=steps, batch_size=1,
                                 checkpoint_every=steps, log_every=steps, fsdp="on" if fsdp else "off",
                                 activation_checkpointing=fsdp)  # fmt: skip
    return TimedLinVideo(config, teacher, store, out, timer)


def check_linvideo(device: torch.device, folder: Path, steps: int = 3) -> dict[str, Any]:
    """Per-step objectives of LinVideo on the toy teacher with FSDP2 + activation checkpointing against plain."""
    store = linvideo_store("toy", device, folder / "store")
    losses = {}
    for fsdp in (False, True):
        out = folder / f"fsdp-{fsdp}"
        engine.run(linvideo_task("toy", store, device, fsdp, steps, out, None), show_progress=False)
        losses[fsdp] = [entry["objective"] for entry in json.loads((out / "training_state.json").read_text())["losses"]]
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses[True], losses[False], strict=True))
    return {"plain_losses": losses[False], "fsdp_ac_losses": losses[True], "max_relative_difference": worst,
            "tolerance": LOSS_RELATIVE_TOLERANCE, "passed": worst < LOSS_RELATIVE_TOLERANCE}  # fmt: skip


@dataclass(frozen=True)
class FlowConfig(EngineConfig):
    lr: float = 1e-5
    model: str = "1.3b"


class LatentBatches:
    """Random latents and prompt embeddings of one data shard, drawn on the device."""

    def __init__(self, shape: tuple[int, ...], text: tuple[int, ...], generator: torch.Generator,
                 device: torch.device) -> None:  # fmt: skip
        self.shape, self.text, self.generator, self.device = shape, text, generator, device

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        latents = torch.randn(self.shape, generator=self.generator, device=self.device)
        return latents, torch.randn(self.text, generator=self.generator, device=self.device)


class WanFlowTask(Task):
    """A randomly initialised Wan transformer trained by rectified flow matching on random latents."""

    name = "wan flow"

    def __init__(self, config: FlowConfig, out: Path, device: torch.device, timer: Timer) -> None:
        self.config, self.out, self.device, self.timer, self.log = config, out, device, timer, {}

    def build(self, device: torch.device) -> Modules:
        from harness.models.wan import WAN_1_3B_CONFIG, WAN_TINY_CONFIG, build_transformer

        self.model_config = WAN_1_3B_CONFIG if self.config.model == "1.3b" else WAN_TINY_CONFIG
        self.transformer = build_transformer(self.model_config, device, torch.float32).train()
        return Modules(sharded={"transformer": self.transformer})

    def param_groups(self) -> list[Group]:
        return [Group("adamw", list(self.transformer.parameters()), self.config.lr, 1)]

    def data(self, shard: Shard, step: int) -> LatentBatches:
        shapes, batch = WAN_SHAPES[self.config.model], self.config.batch_size
        latent = (batch, self.model_config["in_channels"], (shapes["frames"] - 1) // 4 + 1, shapes["height"] // 8,
                  shapes["width"] // 8)  # fmt: skip
        return LatentBatches(latent, (batch, shapes["text_length"], self.model_config["text_dim"]), shard.generator,
                             self.device)  # fmt: skip

    def losses(self, batch: tuple[torch.Tensor, torch.Tensor], shard: Shard, step: int) -> dict[str, torch.Tensor]:
        x0, text = batch
        t = torch.rand(x0.shape[0], generator=shard.generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=shard.generator, device=x0.device)
        t_ = t.view(-1, 1, 1, 1, 1)
        velocity = self.transformer(hidden_states=(1 - t_) * x0 + t_ * noise, timestep=t * 1000,
                                    encoder_hidden_states=text, return_dict=False)[0]  # fmt: skip
        return {"objective": torch.nn.functional.mse_loss(velocity.float(), noise - x0)}

    def after_step(self, step: int, run: Run) -> None:
        self.timer.tick(step)

    def finish(self, run: Run) -> Path:
        return self.out


def toy_config(fsdp: bool, steps: int, batch: int) -> ToyTrainConfig:
    """The toy teacher at its shipped size (pool of 2,048 scenes; no evaluation, no compile)."""
    return ToyTrainConfig(
        steps=steps,
        batch_size=batch,
        pool_size=2048,
        eval_clips=0,
        fsdp="on" if fsdp else "off",
        activation_checkpointing=fsdp,
    )


def check_correctness(device: torch.device, batch: int, steps: int = 3) -> dict[str, Any]:
    """Per-step toy losses with FSDP2 + activation checkpointing against the plain path."""
    losses = {}
    for fsdp in (False, True):
        with tempfile.TemporaryDirectory() as folder:
            engine.run(TimedToyTask(toy_config(fsdp, steps, batch), Path(folder), device, None), show_progress=False)
            losses[fsdp] = [entry["objective"] for entry in json.loads((Path(folder) / "training_state.json")
                                                                       .read_text())["losses"]]  # fmt: skip
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses[True], losses[False], strict=True))
    return {"plain_losses": losses[False], "fsdp_ac_losses": losses[True], "max_relative_difference": worst,
            "tolerance": LOSS_RELATIVE_TOLERANCE, "passed": worst < LOSS_RELATIVE_TOLERANCE}  # fmt: skip


def time_case(name: str, device: torch.device, fsdp: bool, args: argparse.Namespace,
              store: TrajectoryStore | None = None) -> dict[str, Any]:  # fmt: skip
    """One timing case in a fresh engine run (stopped after the timed steps); out of memory is a result."""
    timer = Timer(device, args.warmup, args.steps)
    total = 1000  # the schedule's length: the timed steps run at a normal learning rate, far from its end
    case: dict[str, Any] = {"task": name, "fsdp": fsdp, "activation_checkpointing": fsdp, "warmup_steps": args.warmup}
    with tempfile.TemporaryDirectory() as folder:
        task: Task
        shape = WAN_SHAPES[args.wan]
        if name == "toy":
            task = TimedToyTask(toy_config(fsdp, total, args.toy_batch), Path(folder), device, timer)
            case["batch"] = args.toy_batch
        elif store is not None:
            task = linvideo_task(LINVIDEO_MODELS[args.wan], store, device, fsdp, total, Path(folder), timer)
            case |= {"batch": 1, "frames": shape["frames"], "height": shape["height"], "width": shape["width"],
                     "objective": "adm", "target_layers": task.config.target_layers}  # fmt: skip
        else:
            config = FlowConfig(steps=total, batch_size=1, checkpoint_every=total, log_every=total, model=args.wan,
                                fsdp="on" if fsdp else "off", activation_checkpointing=fsdp)  # fmt: skip
            task = WanFlowTask(config, Path(folder), device, timer)
            case |= {"batch": 1, "frames": shape["frames"], "height": shape["height"], "width": shape["width"]}
        case |= timer.run(task)
    del task
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return case


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")), help="folder for the JSON")
    parser.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (smoke mode)")
    parser.add_argument("--wan", choices=sorted(WAN_SHAPES), default="1.3b", help="Wan config and clip shape")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per case")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case")
    parser.add_argument("--toy-batch", type=int, default=256, help="the toy teacher's batch (its recipe's: 256)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "environment": capture_environment(device), "status": "incomplete"}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "train_fsdp_gpu.json"
    result["correctness"] = check_correctness(device, args.toy_batch)
    print(
        f"correctness: toy losses FSDP2+AC vs plain, max relative difference "
        f"{result['correctness']['max_relative_difference']:.2e} (< {LOSS_RELATIVE_TOLERANCE})",
        flush=True,
    )
    if not result["correctness"]["passed"]:
        result["status"] = "correctness failed"
        write_json_atomic(path, result)
        raise SystemExit("correctness check failed; nothing timed")
    with tempfile.TemporaryDirectory() as folder:
        result["linvideo_correctness"] = check_linvideo(device, Path(folder))
    linvideo_ok = result["linvideo_correctness"]["passed"]
    print(f"correctness: toy LinVideo objectives FSDP2+AC vs plain, max relative difference "
          f"{result['linvideo_correctness']['max_relative_difference']:.2e}"
          + ("" if linvideo_ok else ": FAILED, LinVideo not timed"), flush=True)  # fmt: skip
    result["cases"] = []
    print(f"{'task':<18} {'FSDP+AC':<8} {'mean step s':>12} {'peak GiB':>9}  status", flush=True)
    store_folder = tempfile.TemporaryDirectory()
    store = linvideo_store(LINVIDEO_MODELS[args.wan], device, Path(store_folder.name)) if linvideo_ok else None
    names = ["toy", f"wan-{args.wan}", *([f"linvideo-wan-{args.wan}"] if linvideo_ok else [])]
    for name in names:
        for fsdp in (True, False):
            case = time_case(name, device, fsdp, args, store if name.startswith("linvideo") else None)
            result["cases"].append(case)
            seconds = f"{case['mean_step_seconds']:.3f}" if "mean_step_seconds" in case else "-"
            peak = f"{case['peak_gib']:.1f}" if case.get("peak_gib") is not None else "-"
            print(f"{name:<18} {'on' if fsdp else 'off':<8} {seconds:>12} {peak:>9}  {case['status']}", flush=True)
            write_json_atomic(path, result)
    store_folder.cleanup()
    result["status"] = "complete"
    write_json_atomic(path, result)
    return result


if __name__ == "__main__":
    main()
