"""The training engine: NaN stop, exact resume, experiment identity, and 2 gloo ranks under torchrun (FSDP2).

The distributed tests train a debug-sized toy teacher (2 blocks of width 32) through ``bench toy train``. A
global batch draws the same samples however it is laid out (each micro-batch is a data shard with its own
seed), so 2 ranks x batch b is compared with 1 process x batch b x accumulation 2: the same global batch 2b of
the same samples; they agree to float rounding (FSDP2's reduce-scatter sums in another order than local
accumulation). FSDP2 runs on CPU with gloo in torch 2.13, in fp32 (bf16 compute is used on CUDA only).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import invoke_cli, normalise
from torch import nn
from torchrun_helpers import kill_after_first_checkpoint, run_two_ranks

from harness.errors import HarnessError
from harness.train import engine
from harness.train.checkpoint import load_weights
from harness.train.config import EngineConfig
from harness.train.engine import Run, lr_factor
from harness.train.task import Group, Modules, Shard, Task

# -- a debug task: two layers, a replicated scale trained by SGD, an extra loss term ------------------------------


@dataclass(frozen=True)
class DebugConfig(EngineConfig):
    lr: float = 0.05
    nan_at: int = 0  # the 1-based step whose loss is NaN (0: none)


class DebugBatches:
    def __init__(self, generator: torch.Generator, size: int) -> None:
        self.generator, self.size = generator, size

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(self.size, 4, generator=self.generator)
        return x, x.sum(dim=1, keepdim=True).sin()


class DebugTask(Task):
    name = "debug"

    def __init__(self, config: DebugConfig, out: Path, crash_after: int = 0) -> None:
        self.config, self.out, self.device, self.log = config, out, torch.device("cpu"), {}
        self.crash_after = crash_after

    def build(self, device: torch.device) -> Modules:
        self.model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.scale = nn.Linear(1, 1, bias=False)
        return Modules(sharded={"model": self.model}, replicated={"scale": self.scale})

    def param_groups(self) -> list[Group]:
        return [Group("weights", list(self.model.parameters()), self.config.lr, 2),
                Group("scale", list(self.scale.parameters()), 0.1, 1, optimizer="sgd", decay="constant")]  # fmt: skip

    def data(self, shard: Shard, step: int) -> DebugBatches:
        return DebugBatches(shard.generator, self.config.batch_size)

    def losses(self, batch: tuple[torch.Tensor, torch.Tensor], shard: Shard, step: int) -> dict[str, torch.Tensor]:
        x, y = batch
        objective = torch.nn.functional.mse_loss(self.scale(self.model(x)), y)
        if step + 1 == self.config.nan_at:
            objective = objective * float("nan")
        return {"objective": objective, "penalty": 0.01 * self.scale.weight.square().sum()}

    def after_step(self, step: int, run: Run) -> None:
        if step == self.crash_after:
            raise KeyboardInterrupt  # as a killed process: nothing after this step is written

    def finish(self, run: Run) -> Path:
        return self.out


def weights(out: Path) -> dict[str, torch.Tensor]:
    task = DebugTask(DebugConfig(), out)
    modules = task.build(torch.device("cpu"))
    load_weights(out, {**modules.sharded, **modules.replicated})
    return {f"{name}.{key}": value for name, module in {**modules.sharded, **modules.replicated}.items()
            for key, value in module.state_dict().items()}  # fmt: skip


@pytest.mark.parametrize("sync_every", [1, 2])
def test_nan_stops_naming_its_step_and_keeps_the_last_checkpoint(tmp_path: Path, sync_every: int) -> None:
    """A NaN at step 3 stops the run with 'step 3' (read at once or at the next sync); step 2's checkpoint stays."""
    config = DebugConfig(steps=6, batch_size=4, checkpoint_every=2, log_every=2, sync_every=sync_every, nan_at=3)
    with pytest.raises(HarnessError, match=r"non-finite loss at step 3 .*last good checkpoint is kept"):
        engine.run(DebugTask(config, tmp_path), show_progress=False)
    meta = json.loads((tmp_path / "training_state.json").read_text())
    assert meta["step"] == 2 and [p.name for p in (tmp_path / "checkpoint").iterdir()] == ["step-0000002"]
    assert all(bool(value.isfinite().all()) for value in weights(tmp_path).values())


def test_interrupted_run_resumes_bit_identically(tmp_path: Path) -> None:
    """Stopped after step 3 (checkpoint at 2) and rerun, the end state equals an uninterrupted run's exactly."""
    config = DebugConfig(steps=6, batch_size=4, checkpoint_every=2, accumulation=2)
    engine.run(DebugTask(config, tmp_path / "straight"), show_progress=False)
    with pytest.raises(KeyboardInterrupt):
        engine.run(DebugTask(config, tmp_path / "resumed", crash_after=3), show_progress=False)
    assert json.loads((tmp_path / "resumed" / "training_state.json").read_text())["step"] == 2
    engine.run(DebugTask(config, tmp_path / "resumed"), show_progress=False)
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)
    logs = [json.loads((tmp_path / run / "training_state.json").read_text()) for run in ("straight", "resumed")]
    assert logs[0]["losses"] == logs[1]["losses"] and set(logs[0]["losses"][0]) == {"objective", "penalty", "total"}
    assert len(logs[1]["step_seconds"]) == 6, "one wall time per step, kept across the resume"
    assert all(seconds > 0 for seconds in logs[1]["step_seconds"])


def test_resume_refuses_another_experiment_and_another_global_batch(tmp_path: Path) -> None:
    engine.run(DebugTask(DebugConfig(steps=2, batch_size=4), tmp_path), show_progress=False)
    with pytest.raises(HarnessError, match="another config"):
        engine.run(DebugTask(DebugConfig(steps=2, batch_size=4, lr=0.01), tmp_path), show_progress=False)
    with pytest.raises(HarnessError, match="global batch 4, this launch makes 8"):
        engine.run(DebugTask(DebugConfig(steps=2, batch_size=4, accumulation=2), tmp_path), show_progress=False)


class InnerTask(DebugTask):
    """The scale also trained by 2 inner updates per step, from a loss that reaches the model's weights too."""

    inner_groups = ("scale",)
    inner_updates = 2

    def __init__(self, config: DebugConfig, out: Path, detached: bool) -> None:
        super().__init__(config, out)
        self.detached, self.inner_calls = detached, 0

    def inner_losses(self, batch: tuple[torch.Tensor, torch.Tensor], shard: Shard, step: int,
                     index: int) -> dict[str, torch.Tensor]:  # fmt: skip
        self.inner_calls += 1
        x, y = batch
        features = self.model(x).detach() if self.detached else self.model(x)
        return {"inner": torch.nn.functional.mse_loss(self.scale(features), y)}


def test_inner_updates_step_their_groups_alone_before_each_step(tmp_path: Path) -> None:
    """Each step runs the inner group's updates first (logged as their mean); their gradients on other groups are
    dropped, so the model ends where it ends when the inner loss never reaches it."""
    config = DebugConfig(steps=3, batch_size=4, accumulation=2)
    reaching, detached = InnerTask(config, tmp_path / "a", detached=False), InnerTask(config, tmp_path / "b", True)
    for task in (reaching, detached):
        engine.run(task, show_progress=False)
    assert reaching.inner_calls == 3 * 2 * 2  # steps x inner updates x micro-batches
    a, b, plain = weights(tmp_path / "a"), weights(tmp_path / "b"), tmp_path / "plain"
    engine.run(DebugTask(config, plain), show_progress=False)
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not torch.equal(a["scale.weight"], weights(plain)["scale.weight"])
    losses = json.loads((tmp_path / "a" / "training_state.json").read_text())["losses"]
    assert list(losses[0]) == ["objective", "penalty", "total", "inner"]


def test_named_global_batch_must_match_the_launch() -> None:
    with pytest.raises(HarnessError, match=r"global batch 48 asked, but batch 2 x 8 rank\(s\) x accumulation 2 = 32"):
        EngineConfig(batch_size=2, accumulation=2, global_batch=48).resolved_global_batch(8)
    assert EngineConfig(batch_size=1, accumulation=6, global_batch=48).resolved_global_batch(8) == 48


def test_schedules_warm_up_then_decay_or_hold() -> None:
    cosine, constant = Group("a", [], 1.0, 4), Group("b", [], 1.0, 4, decay="constant")
    assert [lr_factor(cosine, step, 12) for step in (0, 3)] == [0.25, 1.0]
    assert lr_factor(cosine, 8, 12) == pytest.approx(0.5) and lr_factor(cosine, 12, 12) == 0.0
    assert lr_factor(constant, 11, 12) == 1.0


def test_scene_pool_built_at_a_step_holds_the_clips_of_one_that_ran_there() -> None:
    """The toy's pool rebuilt at step 4 (refreshes at 2 and 4 replayed) equals one refreshed while running."""
    from harness.toyworld.train import ScenePool

    def pool(step: int) -> ScenePool:
        return ScenePool(8, seed=3, refresh_every=2, batch_size=2, generator=torch.Generator(),
                         device=torch.device("cpu"), step=step)  # fmt: skip

    running = pool(0)
    before = running.clips.clone()
    for step in range(5):
        running.batch(step)
    rebuilt = pool(4)
    assert not torch.equal(before, running.clips)
    assert torch.equal(rebuilt.clips, running.clips) and torch.equal(rebuilt.ids, running.ids)


# -- two gloo ranks under torchrun: the toy teacher at debug size --------------------------------------------------

STEPS = 6
TOY_ARGS = ["toy", "train", "--steps", STEPS, "--batch-size", 2, "--width", 32, "--layers", 2, "--ffn-dim", 32,
            "--pool-size", 16, "--lr", 1e-2, "--warmup-steps", 1, "--eval-clips", 0, "--checkpoint-every", 2,
            "--sync-every", 1, "--log-every", 1, "--no-progress", "--device", "cpu"]  # fmt: skip
# Max |difference| of any weight, 2 ranks vs 1 process after 6 steps: the gradients differ by float rounding only
# (~1e-7), which Adam's normalised step turns into up to ~3e-5 where a gradient is near zero; the weights themselves
# move by more than 100x this over the run (asserted below).
TOLERANCE = 1e-4


def _toy_weights(out: Path) -> dict[str, torch.Tensor]:
    from harness.toyworld.checkpoint import TOY_ENCODER_CONFIG, build_modules
    from harness.toyworld.train import ToyTrainConfig

    transformer, encoder = build_modules(ToyTrainConfig(width=32, layers=2, ffn_dim=32).transformer_config(),
                                         TOY_ENCODER_CONFIG)  # fmt: skip
    load_weights(out, {"transformer": transformer, "encoder": encoder})
    return {**{f"t.{k}": v for k, v in transformer.state_dict().items()},
            **{f"e.{k}": v for k, v in encoder.state_dict().items()}}  # fmt: skip


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[key] - b[key]).abs().max()) for key in a)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-rank run of the debug-sized toy teacher."""
    out = tmp_path_factory.mktemp("two_ranks")
    run_two_ranks([*TOY_ARGS, "--out", out])
    return out


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-rank run killed with SIGKILL (torchrun and both ranks) once its first checkpoint is committed."""
    out = tmp_path_factory.mktemp("killed")
    kill_after_first_checkpoint([*TOY_ARGS, "--out", out], out, STEPS)
    return out


def test_two_ranks_end_where_one_process_with_the_same_global_batch_ends(two_ranks: Path, tmp_path: Path) -> None:
    """2 ranks x batch 2 (FSDP2, gloo) and 1 process x batch 2 x accumulation 2: same losses and weights."""
    invoke_cli([*TOY_ARGS, "--accumulation", 2, "--out", tmp_path])
    sharded, single = (json.loads((out / "training_state.json").read_text()) for out in (two_ranks, tmp_path))
    assert sharded["layout"] | {"ranks": 1, "accumulation": 2, "fsdp": False} == single["layout"]
    assert sharded["layout"]["global_batch"] == 4 and sharded["layout"]["fsdp"]
    for a, b in zip(sharded["losses"], single["losses"], strict=True):
        assert a["objective"] == pytest.approx(b["objective"], rel=1e-5)
    assert _max_difference(_toy_weights(two_ranks), _toy_weights(tmp_path)) < TOLERANCE


def test_killed_two_rank_run_resumes_to_the_same_end(two_ranks: Path, killed: Path, tmp_path: Path) -> None:
    """kill -9 after a checkpoint, then the same command: the end state of the uninterrupted run, bit for bit."""
    out = tmp_path / "run"
    shutil.copytree(killed, out)
    midway = _toy_weights(out)
    run_two_ranks([*TOY_ARGS, "--out", out])
    end, reference = _toy_weights(out), _toy_weights(two_ranks)
    assert _max_difference(end, midway) > 100 * TOLERANCE, "the resumed steps moved the weights"
    assert all(torch.equal(end[key], reference[key]) for key in end)


def test_two_rank_checkpoint_resumes_on_one_rank(two_ranks: Path, killed: Path, tmp_path: Path) -> None:
    """The 2-rank checkpoint resumes in one process (accumulation 2 keeps the global batch and the data shards)."""
    out = tmp_path / "run"
    shutil.copytree(killed, out)
    result = invoke_cli([*TOY_ARGS, "--accumulation", 2, "--out", out])
    assert "resumed" not in result.output, "same data shards: no note about re-seeded streams"
    meta = json.loads((out / "training_state.json").read_text())
    assert meta["step"] == STEPS and meta["layout"]["ranks"] == 1
    assert _max_difference(_toy_weights(out), _toy_weights(two_ranks)) < TOLERANCE
    refused = invoke_cli([*TOY_ARGS, "--out", out], expect=2)
    assert "global batch 4, this launch makes 2" in normalise(refused.output)


def test_checkpoints_record_each_ranks_peak_memory_only_on_cuda(tmp_path: Path) -> None:
    """training_state.json names each rank's CUDA peak (peak_gib_per_rank); a CPU run has none: null, not 0."""
    engine.run(DebugTask(DebugConfig(steps=2, batch_size=4, checkpoint_every=1), tmp_path), show_progress=False)
    meta = json.loads((tmp_path / "training_state.json").read_text())
    assert "peak_gib_per_rank" in meta and meta["peak_gib_per_rank"] is None
