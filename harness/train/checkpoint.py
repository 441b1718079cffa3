"""Resumable training checkpoints with ``torch.distributed.checkpoint`` (DCP), sharded and reshardable.

In a run's folder::

    training_state.json        config, step, per-step losses, layout, the task's log: the commit point
    checkpoint/step-0000100/   DCP's files (each rank writes its shards of the model and optimizer state)
                               and rng-shard{j}.safetensors, the generator of each data shard

A checkpoint is written to ``step-N.partial``, renamed once every rank has written, and only then named by
``training_state.json`` (atomically); the previous one is removed after that, so a run killed at any moment
resumes from the last complete checkpoint. Model and optimizer state go through
``get_state_dict``/``set_state_dict``, so a checkpoint of N ranks loads on M ranks (and without FSDP).
DCP's own ``.metadata`` file is pickled by torch; it is only ever read back from the run's own folder.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.atomic import write_json_atomic
from harness.checkpoints import TRAINING_META
from harness.distributed import Ranks, barrier
from harness.errors import HarnessError
from harness.train.task import Shard

CHECKPOINTS = "checkpoint"


def read_meta(out: Path) -> dict[str, Any] | None:
    """The run's record, or None when nothing was checkpointed yet."""
    path = out / TRAINING_META
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
        missing = {"step", "checkpoint", "config", "layout", "losses"} - set(meta)
    except (OSError, json.JSONDecodeError) as exc:
        missing, meta = {repr(exc)}, {}
    if missing == {"checkpoint", "layout"}:
        raise HarnessError(f"cannot resume from {out}: its state was written by a trainer before the training engine "
                           f"(no sharded checkpoint); remove {out / TRAINING_META} to start over")  # fmt: skip
    if missing:
        raise HarnessError(f"cannot resume from {out}: corrupt {TRAINING_META} (missing {sorted(missing)}); "
                           "remove it to start over")  # fmt: skip
    return meta


@contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it assumes a single process when no process group exists: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _rng_file(folder: Path, shard: int) -> Path:
    return folder / f"rng-shard{shard}.safetensors"


def save(out: Path, container: nn.Module, optimizers: list[torch.optim.Optimizer], shards: list[Shard],
         meta: dict[str, Any], ranks: Ranks) -> None:  # fmt: skip
    """Write step ``meta['step']`` (collective: every rank calls it); the lead commits it in ``training_state.json``."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = out / CHECKPOINTS
    name = f"step-{meta['step']:07d}"
    partial = root / f"{name}.partial"
    if ranks.lead:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier(ranks)
    model_state, optimizer_state = get_state_dict(container, optimizers)
    with _single_process_quiet():
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(partial))
    for shard in shards:
        save_file({"generator": shard.generator.get_state()}, str(_rng_file(partial, shard.index)))
    barrier(ranks)
    if ranks.lead:
        shutil.rmtree(root / name, ignore_errors=True)
        os.replace(partial, root / name)
        write_json_atomic(out / TRAINING_META, {**meta, "checkpoint": f"{CHECKPOINTS}/{name}"})
        for old in root.iterdir():
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    barrier(ranks)


def load(out: Path, meta: dict[str, Any], container: nn.Module, optimizers: list[torch.optim.Optimizer],
         shards: list[Shard]) -> str | None:  # fmt: skip
    """Restore model, optimizers and the shards' generators from the checkpoint ``meta`` names.

    A checkpoint with another number of data shards (another ranks x accumulation) restores everything but the
    generators, which restart from their seeds folded with the step; the returned note says so.
    """
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    from harness.train.parallel import shard_seed

    folder = out / meta["checkpoint"]
    model_state, optimizer_state = get_state_dict(container, optimizers)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(folder))
    except Exception as exc:  # DCP raises CheckpointException, RuntimeError or OSError on a missing/corrupt file
        raise HarnessError(f"cannot resume from {folder}: {exc}; remove {out / TRAINING_META} to start over") from exc
    # dcp.load already refused any key missing from the checkpoint; not strict here only because a stateless
    # optimizer (SGD without momentum) saves no per-parameter state.
    set_state_dict(container, optimizers, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(strict=False))  # fmt: skip
    saved = meta["layout"]["shards"]
    if saved != shards[0].count:
        for shard in shards:
            shard.generator.manual_seed(shard_seed(shard.seed, meta["step"]))
        return (f"resumed {saved} data shard(s) as {shards[0].count}: each shard's generator restarts from its seed "
                f"and the step, so later batches differ from an uninterrupted run's")  # fmt: skip
    for shard in shards:
        shard.generator.set_state(load_file(str(_rng_file(folder, shard.index)))["generator"])
    return None


def load_weights(out: Path, modules: dict[str, nn.Module]) -> int:
    """Load the weights of ``modules`` (named as the task named them) from the run's last checkpoint into plain,
    unsharded modules, on one process; returns the checkpoint's step. For inspection and export."""
    import torch.distributed.checkpoint as dcp

    meta = read_meta(out)
    if meta is None:
        raise HarnessError(f"{out} holds no training checkpoint ({TRAINING_META} is missing)")
    container = nn.ModuleDict(modules)
    state = {"model": container.state_dict()}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(out / meta["checkpoint"]))
    container.load_state_dict(state["model"])
    return int(meta["step"])
