"""LinVideo under torchrun: 2 gloo ranks (the trajectory store's shards collected by both, FSDP2 per block of the
student) against one process, a kill -9 mid-way and its resume, and the 2-rank checkpoint resumed on one rank.

A global batch draws the same stored states however it is laid out (each micro-batch is a data shard with its own
seed), so 2 ranks x batch 2 is compared with 1 process x batch 2 x accumulation 2: the same global batch of 4, the
same states. FSDP2 runs on CPU with gloo in fp32; the two layouts agree to float rounding (the gradient reductions
sum in another order).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import invoke_cli, normalise
from safetensors.torch import load_file
from torchrun_helpers import kill_after_first_checkpoint, run_two_ranks

from methods.linvideo.collect import TrajectoryStore

STEPS = 6
# The toy teacher, a 3-step sampler grid, 2 prompts in 2 collection shards (one per rank); lr 1e-4 (10x the toy
# recipe's, so that the weights move well beyond the tolerance, yet the objective stays smooth enough for rounding
# differences not to be amplified), learned selection (r by SGD) so that the replicated transfer state trains too.
ARGS = ["train", "--method", "linvideo", "--model", "toy", "--target-layers", 2, "--steps", STEPS, "--batch-size", 2,
        "--prompts", 2, "--collect-batch", 1, "--sampler-steps", 3, "--lr", 1e-4, "--checkpoint-every", 2,
        "--device", "cpu", "--no-progress"]  # fmt: skip
# Max |difference| of any converted weight (transformer, feature maps), 2 ranks vs 1 process after 6 steps: the
# gradients differ by float rounding, which Adam turns into differences of ~3e-6 (measured) where one is near 0.
TOLERANCE = 1e-4
# ADM's objective is half the squared difference of teacher and student velocities at x_hat, which starts near 0: a
# rounding difference of the weights shows in it ~100x magnified (measured: up to 2e-5 relative over 6 steps).
OBJECTIVE_TOLERANCE = 1e-4


def _converted(out: Path) -> dict[str, torch.Tensor]:
    """The converted checkpoint's tensors (transformer and LinVideo state) and its final r."""
    tensors = {f"t.{key}": value for key, value in load_file(str(out / "transformer.safetensors")).items()}
    tensors |= {f"s.{key}": value for key, value in load_file(str(out / "linvideo.safetensors")).items()}
    tensors["final_r"] = torch.tensor(json.loads((out / "spec.json").read_text())["final_r"])
    return tensors


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[key].float() - b[key].float()).abs().max()) for key in a)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("linvideo_store")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory, store: Path) -> Path:
    """1 process x batch 2 x accumulation 2 (it also collects the store the 2-rank runs share)."""
    out = tmp_path_factory.mktemp("one_process")
    invoke_cli([*ARGS, "--accumulation", 2, "--store", store, "--out", out])
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-rank run that collects its own store (OUT/trajectories), a shard per rank."""
    out = tmp_path_factory.mktemp("two_ranks")
    run_two_ranks([*ARGS, "--out", out])
    return out


def test_two_ranks_collect_the_store_one_process_collects(two_ranks: Path, one_process: Path, store: Path) -> None:
    """Each rank sampled its shard of the prompts: the same index and shard files, tensor for tensor."""
    shared, own = TrajectoryStore(store), TrajectoryStore(two_ranks / "trajectories")
    assert shared.spec == own.spec and sorted(p.name for p in store.iterdir()) == sorted(
        p.name for p in (two_ranks / "trajectories").iterdir())  # fmt: skip
    assert all(torch.equal(shared.tensors[key], own.tensors[key]) for key in shared.tensors)


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory, one_process: Path, store: Path) -> Path:
    out = tmp_path_factory.mktemp("killed")
    kill_after_first_checkpoint([*ARGS, "--store", store, "--out", out], out, STEPS)
    return out


def test_two_ranks_end_where_one_process_with_the_same_global_batch_ends(two_ranks: Path, one_process: Path) -> None:
    """2 ranks x batch 2 (FSDP2 on the student, gloo) and 1 process x batch 2 x accumulation 2: the same losses, the
    same converted checkpoint within TOLERANCE, written once (by rank 0) with the layout in its spec."""
    sharded, single = (json.loads((out / "training_state.json").read_text()) for out in (two_ranks, one_process))
    assert sharded["layout"] | {"ranks": 1, "accumulation": 2, "fsdp": False} == single["layout"]
    assert sharded["layout"]["global_batch"] == 4 and sharded["layout"]["fsdp"]
    for a, b in zip(sharded["losses"], single["losses"], strict=True):
        assert a["objective"] == pytest.approx(b["objective"], rel=OBJECTIVE_TOLERANCE)
    a, b = _converted(two_ranks), _converted(one_process)
    assert _max_difference(a, b) < TOLERANCE
    untrained = json.loads((two_ranks / "spec.json").read_text())["config"]["r_init"]
    assert float((a["final_r"] - untrained).abs().max()) > 100 * TOLERANCE, "r was trained"
    assert json.loads((two_ranks / "spec.json").read_text())["layout"]["ranks"] == 2


def test_killed_two_rank_run_resumes_to_the_same_end(two_ranks: Path, killed: Path, tmp_path: Path,
                                                      store: Path) -> None:  # fmt: skip
    """kill -9 after a checkpoint, then the same command: the uninterrupted run's converted checkpoint, bit for bit."""
    out = tmp_path / "run"
    shutil.copytree(killed, out)
    run_two_ranks([*ARGS, "--store", store, "--out", out])
    end, reference = _converted(out), _converted(two_ranks)
    assert all(torch.equal(end[key], reference[key]) for key in end)
    resumed, straight = (json.loads((path / "training_state.json").read_text()) for path in (out, two_ranks))
    assert resumed["losses"] == straight["losses"] and resumed["task"]["r"] == straight["task"]["r"]


def test_two_rank_checkpoint_resumes_on_one_rank(two_ranks: Path, killed: Path, tmp_path: Path, store: Path) -> None:
    """The 2-rank checkpoint resumes in one process (accumulation 2 keeps the global batch and the data shards);
    another global batch is refused before training."""
    out = tmp_path / "run"
    shutil.copytree(killed, out)
    refused = invoke_cli([*ARGS, "--store", store, "--out", out], expect=2)
    assert "global batch 4, this launch makes 2" in normalise(refused.output)
    invoke_cli([*ARGS, "--accumulation", 2, "--store", store, "--out", out])
    meta = json.loads((out / "training_state.json").read_text())
    assert meta["step"] == STEPS and meta["layout"]["ranks"] == 1
    assert _max_difference(_converted(out), _converted(two_ranks)) < TOLERANCE
