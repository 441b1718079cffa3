"""The training loop every trained method runs through: :func:`run` drives a :class:`~harness.train.task.Task`.

Per optimizer step: each group's learning rate from its warm-up + cosine (or constant) schedule; for each of the
rank's micro-batches (its data shards), in the task's parts of it (:meth:`~harness.train.task.Task.parts`), the
task's loss terms under autocast, their sum x the part's share / accumulation backpropagated (FSDP2 reduces
gradients on the last pass only); replicated side modules' gradients
averaged across ranks; each clip group clipped; every optimizer stepped; the task's after-step hook (EMA, r
projection). A task with a two time-scale rule (DMD2's fake score) has its ``inner_updates`` of some groups
run the same way before that, each on fresh batches. Every ``sync_every`` steps the loss terms, averaged over
micro-batches and ranks, are read on the host: a non-finite value stops the run with a message naming its step,
before anything is written, so the last checkpoint stays good. Every ``checkpoint_every`` steps (and at the end)
a resumable DCP checkpoint; a rerun of the same command resumes it. At the end the divergence note
(:func:`harness.training.divergence_note`), the task's result, and the record ``training_state.json`` (config,
layout with the global batch, per-step losses).
Progress (rich, with ETA) and log lines come from the lead rank only.
"""

from __future__ import annotations

import functools
import json
import math
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.distributed import Ranks, barrier, current_ranks, rank_device, rank_group
from harness.errors import HarnessError
from harness.optim import warmup_constant, warmup_cosine
from harness.train import checkpoint, parallel
from harness.train.parallel import Layout
from harness.train.task import Group, Modules, Shard, Task


@dataclass
class Run:
    """What the task's hooks see of the running loop."""

    ranks: Ranks
    layout: Layout
    device: torch.device
    modules: Modules
    step: int = 0
    seconds: float = 0.0
    losses: list[dict[str, float]] = field(default_factory=list)
    # Wall seconds of each step, its update and after-step hook (not a checkpoint's save); a step that ends at a
    # sync point (every step at sync_every 1) includes the device's work, the others only their launches.
    step_seconds: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    console: Any = None  # rich console of the progress display (lead rank)
    peak_gib_per_rank: list[float] | None = None  # CUDA peaks at the last checkpoint, in rank order

    def print(self, text: str) -> None:
        """A log line, printed by the lead rank only."""
        if self.ranks.lead and self.console is not None:
            self.console.print(text)

    def gather(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The module's full state on CPU on the lead (collective under FSDP; empty on the other ranks)."""
        return parallel.full_state_dict(module)

    def record(self, config: Any, task_log: dict[str, Any]) -> dict[str, Any]:
        return {"config": asdict(config), "step": self.step, "seconds": self.seconds, "losses": self.losses,
                "step_seconds": self.step_seconds,
                "layout": {**self.layout.record(), "shards": self.layout.shard_count}, "task": task_log,
                "notes": self.notes, "peak_gib_per_rank": self.peak_gib_per_rank}  # fmt: skip


def lr_factor(group: Group, step: int, steps: int) -> float:
    """Linear warm-up over the group's warm-up steps, then cosine to 0 at the last step (or constant)."""
    warmup = max(1, group.warmup_steps)
    return warmup_cosine(step, warmup, steps) if group.decay == "cosine" else warmup_constant(step, warmup)


def run(task: Task, show_progress: bool = True) -> Path:
    """Train ``task`` to ``task.config.steps`` (resuming a half-done run in ``task.out``); returns its result.

    Under torchrun every rank calls this; outside it, it runs in this process. Raises :class:`HarnessError`
    on a config that does not fit the launch, on a checkpoint of another experiment, and on a non-finite loss.
    """
    config = task.config
    config.validate()
    ranks = current_ranks()
    device = rank_device(task.device, ranks)
    task.device = device
    # Wan returns its output as a view; no task modifies a module's output in place, which is what FSDP2 warns of.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    with rank_group(ranks, device), ExitStack() as stack:
        layout = Layout.resolve(config, ranks, device)
        stack.enter_context(parallel.process_group(layout, device))
        task.out.mkdir(parents=True, exist_ok=True)
        meta = checkpoint.read_meta(task.out)
        if meta is not None:
            _check_same_experiment(task, meta, layout)
            if meta.get("finished"):
                return Path(meta["result"])
        torch.manual_seed(config.seed)
        modules = task.build(device)
        parallel.apply(modules, layout, device)
        groups = task.param_groups()
        optimizers = {group.name: group.build() for group in groups}
        container = nn.ModuleDict({**modules.sharded, **modules.replicated})
        generator_device = task.generator_device or device
        shards = [_shard(config.seed, index, layout.shard_count, generator_device) for index in layout.shards()]
        state = Run(ranks, layout, device, modules, notes=list(layout.notes))
        if meta is not None:
            note = checkpoint.load(task.out, meta, container, list(optimizers.values()), shards)
            state.step, state.seconds, state.losses = meta["step"], meta["seconds"], meta["losses"]
            state.step_seconds = meta.get("step_seconds", [])
            state.notes = [*meta.get("notes", []), *([note] if note else [])]
            task.log = meta["task"]
        data = [task.data(shard, state.step) for shard in shards]
        replicated = [p for m in modules.replicated.values() for p in m.parameters() if p.requires_grad]
        clip_sets: dict[str, list[nn.Parameter]] = {}
        for group in groups:
            clip_sets.setdefault(group.clip_with or group.name, []).extend(group.params)
        with task.session():
            _loop(task, state, groups, optimizers, container, shards, data, replicated, clip_sets, show_progress)
            result = task.finish(state)
        from harness.training import divergence_note

        note = divergence_note([step["objective"] for step in state.losses])
        if note:
            state.notes.append(note)
            state.print(f"[yellow]note:[/] {note}")
        if ranks.lead:
            from harness.atomic import write_json_atomic
            from harness.checkpoints import TRAINING_META

            saved = json.loads((task.out / TRAINING_META).read_text())
            write_json_atomic(task.out / TRAINING_META, {**saved, "notes": state.notes, "finished": True,
                                                         "result": str(result)})  # fmt: skip
        barrier(ranks)
        return result


def _loop(task: Task, state: Run, groups: list[Group], optimizers: dict[str, torch.optim.Optimizer],
          container: nn.Module, shards: list[Shard], data: list[Any], replicated: list[nn.Parameter],
          clip_sets: dict[str, list[nn.Parameter]], show_progress: bool) -> None:  # fmt: skip
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    config, layout, device = task.config, state.layout, state.device
    sharded = list(state.modules.sharded.values())
    every = _Updated(list(optimizers.values()), replicated, list(clip_sets.values()))
    inner = _inner_updated(task, groups, optimizers, replicated)

    def update(losses: Callable[[Any, Shard, int], dict[str, torch.Tensor]], step: int, updated: _Updated
               ) -> dict[str, torch.Tensor]:  # fmt: skip
        """One update: each micro-batch's loss terms backpropagated (gradients reduced on the last), the replicated
        gradients averaged, each clip set clipped, the optimizers stepped; the terms' means over micro-batches."""
        terms: dict[str, torch.Tensor] = {}
        for micro, (shard, source) in enumerate(zip(shards, data, strict=True)):
            parts = list(task.parts(source.batch(step)))
            for index, (part, share) in enumerate(parts):
                parallel.set_gradient_sync(sharded, micro == len(shards) - 1 and index == len(parts) - 1)
                with layout.autocast(device):
                    loss_terms = losses(part, shard, step)
                total = sum(loss_terms.values(), torch.zeros((), device=device))
                (total * share / len(shards)).backward()
                for key, value in {**loss_terms, **({"total": total} if len(loss_terms) > 1 else {})}.items():
                    terms[key] = terms.get(key, 0.0) + value.detach().float() * share / len(shards)
        parallel.average_gradients(updated.replicated, layout)
        for params in updated.clip_sets:
            parallel.clip_grad_norm(params, config.grad_clip)
        for optimizer in updated.optimizers:
            optimizer.step()
        for optimizer in optimizers.values():  # an inner loss's gradients on other groups do not reach their update
            optimizer.zero_grad(set_to_none=True)
        return terms

    columns = (TextColumn(f"[bold]{task.name}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"))
    progress = Progress(*columns, TimeRemainingColumn(), disable=not (show_progress and state.ranks.lead))
    state.console = progress.console
    for note in state.notes:
        state.print(f"[yellow]note:[/] {note}")
    pending: list[dict[str, torch.Tensor]] = []
    with progress:
        bar = progress.add_task("train", total=config.steps, completed=state.step, info="")
        started, first_step, resumed_at = time.time() - state.seconds, state.step, time.time()
        while state.step < config.steps:
            step, step_started = state.step, time.perf_counter()
            for group in groups:
                for param_group in optimizers[group.name].param_groups:
                    param_group["lr"] = group.lr * lr_factor(group, step, config.steps)
            inner_terms: dict[str, torch.Tensor] = {}
            for index in range(task.inner_updates):
                for key, value in update(functools.partial(task.inner_losses, index=index), step, inner).items():
                    inner_terms[key] = inner_terms.get(key, 0.0) + value / task.inner_updates
            pending.append({**update(task.losses, step, every), **inner_terms})
            if (step + 1) % config.sync_every == 0 or step + 1 == config.steps:
                _check_and_log(pending, state, task.out, step + 1 - len(pending))
                pending.clear()
            state.step += 1
            task.after_step(state.step, state)
            state.step_seconds.append(time.perf_counter() - step_started)
            if state.losses and len(state.losses) == state.step:
                info = " ".join(f"{key} {value:.4g}" for key, value in state.losses[-1].items())
                progress.update(bar, completed=state.step, info=info)
            else:
                progress.update(bar, completed=state.step)
            if state.step % config.log_every == 0 or state.step == config.steps:
                rate = (state.step - first_step) / max(time.time() - resumed_at, 1e-9)
                recent = state.losses[-config.log_every :]
                means = {key: sum(entry[key] for entry in recent) / len(recent) for key in recent[-1]}
                state.print(f"step {state.step}/{config.steps}: "
                            + " ".join(f"{key} {value:.4g}" for key, value in means.items())
                            + f", {rate:.2f} steps/s")  # fmt: skip
            if state.step % config.checkpoint_every == 0 or state.step == config.steps:
                state.seconds = time.time() - started
                state.peak_gib_per_rank = parallel.peak_gib_per_rank(device, layout)
                meta = state.record(config, task.log)
                checkpoint.save(task.out, container, list(optimizers.values()), shards, meta, state.ranks)
                task.on_checkpoint(state.step, state)


@dataclass(frozen=True)
class _Updated:
    """What one update steps: optimizers, the replicated parameters whose gradients it averages, its clip sets."""

    optimizers: list[torch.optim.Optimizer]
    replicated: list[nn.Parameter]
    clip_sets: list[list[nn.Parameter]]


def _inner_updated(task: Task, groups: list[Group], optimizers: dict[str, torch.optim.Optimizer],
                   replicated: list[nn.Parameter]) -> _Updated:  # fmt: skip
    """The part of the run the task's inner updates step: its ``inner_groups`` alone, each clipped by itself."""
    names = {group.name for group in groups}
    unknown = sorted(set(task.inner_groups) - names)
    if task.inner_updates < 0 or unknown or (task.inner_updates > 0) != bool(task.inner_groups):
        raise HarnessError(f"{task.name}: inner updates ({task.inner_updates}) need inner groups among "
                           f"{sorted(names)}, got {list(task.inner_groups)}")  # fmt: skip
    chosen = [group for group in groups if group.name in task.inner_groups]
    owned = {id(p) for group in chosen for p in group.params}
    return _Updated([optimizers[group.name] for group in chosen], [p for p in replicated if id(p) in owned],
                    [group.params for group in chosen])  # fmt: skip


def _check_and_log(pending: list[dict[str, torch.Tensor]], state: Run, out: Path, first: int) -> None:
    """Read the pending steps' loss terms (rank means) on the host; stop at the first non-finite one."""
    keys = list(pending[0])
    values = parallel.mean_across_ranks(torch.stack([torch.stack([t[k] for k in keys]) for t in pending]),
                                        state.layout).cpu().tolist()  # fmt: skip
    for offset, row in enumerate(values):
        entry = dict(zip(keys, row, strict=True))
        if not all(math.isfinite(v) for v in row):
            shown = ", ".join(f"{k} {v:.4g}" for k, v in entry.items())
            raise HarnessError(f"non-finite loss at step {first + offset + 1} ({shown}); "
                               f"the last good checkpoint is kept in {out}")  # fmt: skip
        state.losses.append(entry)


def _shard(seed: int, index: int, count: int, device: torch.device) -> Shard:
    shard_seed = parallel.shard_seed(seed, index)
    return Shard(index, count, shard_seed, torch.Generator(device=device).manual_seed(shard_seed))


def _check_same_experiment(task: Task, meta: dict[str, Any], layout: Layout) -> None:
    saved = {key: value for key, value in meta["config"].items() if key in task.config.identity()}
    if saved != json.loads(json.dumps(task.config.identity())):
        raise HarnessError(f"{task.out} holds a {task.name} run with another config; use another --out or the same "
                           "settings")  # fmt: skip
    if meta["layout"]["global_batch"] != layout.global_batch:
        raise HarnessError(f"{task.out} holds a run at global batch {meta['layout']['global_batch']}, this launch "
                           f"makes {layout.global_batch}; match it with --batch-size or --accumulation")  # fmt: skip
