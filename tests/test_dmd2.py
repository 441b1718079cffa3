"""DMD2 (issue 23 item 1): the few-step sampler, the task on the engine, the checkpoint `bench run` samples, refusals.

The task's tests distil a tiny toy-world teacher (2 blocks of width 32, one head) on CPU; the CLI tests distil the
shipped toy teacher for one step (batch 1, one fake-score update), which is enough to check the path, not the
quality (``harness/benchmarks/fewstep_toy.py`` measures that on a GPU).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Invoke, invoke_cli, normalise, records_in
from safetensors.torch import load_file

from harness.checkpoints import save_tensors
from harness.errors import HarnessError
from harness.models.toy import ToyModel
from harness.report import table3
from harness.toyworld.checkpoint import SHIPPED_CONVERSIONS, TOY_ENCODER_CONFIG, TOY_TRANSFORMER_CONFIG, build_modules
from harness.train import engine
from harness.train.checkpoint import load_weights
from harness.train.engine import Run
from harness.train.task import Shard
from methods.dmd2.sampler import FewStepScheduler, generator_times
from methods.dmd2.train import Dmd2Config, Dmd2Task, resolve_init
from methods.linvideo.attention import LinVideo, TransferState

PROMPT = "a small white disk moves up on a black background"


TINY = TOY_TRANSFORMER_CONFIG | {"num_attention_heads": 1, "num_layers": 2, "ffn_dim": 64}


def tiny_teacher() -> ToyModel:
    torch.manual_seed(0)
    transformer, encoder = build_modules(TINY, TOY_ENCODER_CONFIG)
    return ToyModel(transformer, encoder, torch.device("cpu"), torch.float32)


def tiny_config(**settings: Any) -> Dmd2Config:
    return Dmd2Config(**{"steps": 2, "batch_size": 2, "fake_updates": 2, "checkpoint_every": 1, "log_every": 1,
                         "lr": 1e-3, "fake_lr": 1e-3, **settings})  # fmt: skip


class CountingTask(Dmd2Task):
    """Counts the generator's and the fake score's updates; raises KeyboardInterrupt (a kill) after a step."""

    def __init__(self, *args: Any, crash_after: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls = {"generator": 0, "fake_score": 0}
        self.crash_after = crash_after

    def losses(self, batch: torch.Tensor, shard: Shard, step: int) -> dict[str, torch.Tensor]:
        self.calls["generator"] += 1
        return super().losses(batch, shard, step)

    def inner_losses(self, batch: torch.Tensor, shard: Shard, step: int, index: int) -> dict[str, torch.Tensor]:
        self.calls["fake_score"] += 1
        return super().inner_losses(batch, shard, step, index)

    def after_step(self, step: int, run: Run) -> None:
        super().after_step(step, run)
        if step == self.crash_after:
            raise KeyboardInterrupt


def distil(out: Path, teacher: ToyModel, crash_after: int = 0, init: str = "dense", **settings: Any) -> CountingTask:
    task = CountingTask(tiny_config(init=init, **settings), teacher, ToyModel.training_prompts(6, 0),
                        resolve_init(init, "toy"), out, crash_after=crash_after)  # fmt: skip
    engine.run(task, show_progress=False)
    return task


def trained(out: Path) -> dict[str, torch.Tensor]:
    """The run's last checkpointed generator and fake score."""
    modules = {name: build_modules(TINY, TOY_ENCODER_CONFIG)[0] for name in ("generator", "fake_score")}
    load_weights(out, modules)
    return {f"{name}.{key}": value for name, module in modules.items() for key, value in module.state_dict().items()}


# -- the sampler ------------------------------------------------------------------------------------------------


def test_generator_times_are_dmd2s_quarters_after_the_models_shift() -> None:
    assert generator_times(4, 3.0) == pytest.approx((1.0, 0.9, 0.75, 0.5))
    assert generator_times(4, 1.0) == pytest.approx((1.0, 0.75, 0.5, 0.25))


def test_a_step_predicts_x0_then_renoises_with_noise_seeded_by_the_sample_and_not_by_its_batch() -> None:
    times = generator_times(4, 3.0)
    noise = torch.randn(3, 3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    velocity = torch.randn_like(noise)

    def rollout(rows: torch.Tensor, u: torch.Tensor) -> list[torch.Tensor]:
        scheduler, x, states = FewStepScheduler(times), rows, []
        scheduler.set_timesteps(4)
        for t in scheduler.timesteps:
            x = scheduler.step(u, t, x)[0]
            states.append(x)
        return states

    batched = rollout(noise, velocity)
    alone = [rollout(noise[i : i + 1], velocity[i : i + 1]) for i in range(3)]
    for step in range(4):
        assert torch.equal(batched[step], torch.cat([states[step] for states in alone]))
    x0 = noise - 1.0 * velocity
    eps = (batched[0] - (1 - times[1]) * x0) / times[1]  # the fresh noise of the first re-noising
    assert not torch.allclose(eps, noise, atol=0.1) and abs(float(eps.std()) - 1) < 0.2
    last = batched[2]
    assert torch.allclose(batched[3], last - times[3] * velocity)  # the last step returns x0 itself
    with pytest.raises(HarnessError, match="samples in 4 steps, not 20"):
        FewStepScheduler(times).set_timesteps(20)


# -- the task on the engine -------------------------------------------------------------------------------------


@pytest.mark.parametrize("target_layers", [0, 1], ids=["dense", "st+dmd2"])
def test_updates_are_finite_change_generator_and_fake_score_and_leave_the_teacher_bitwise(
    tmp_path: Path, target_layers: int
) -> None:
    teacher = tiny_teacher()
    before = {key: value.clone() for key, value in teacher.transformer.state_dict().items()}
    task = distil(tmp_path, teacher, target_layers=target_layers)
    assert task.calls == {"generator": 2, "fake_score": 2 * 2}  # N fake-score updates per generator step
    losses = json.loads((tmp_path / "training_state.json").read_text())["losses"]
    expected = {"objective", "fake_score"} | ({"constraint", "regulariser", "total"} if target_layers else set())
    assert len(losses) == 2 and all(set(step) == expected for step in losses)
    assert all(torch.isfinite(torch.tensor(list(step.values()))).all() for step in losses)
    assert all(torch.equal(before[key], value) for key, value in teacher.transformer.state_dict().items())
    weights = trained(tmp_path)
    for model in ("generator", "fake_score"):
        assert any(not torch.equal(weights[f"{model}.{key}"], value) for key, value in before.items()), model
    spec = json.loads((tmp_path / "spec.json").read_text())
    assert spec["fixed_sampling"] == {"steps": 4, "cfg": 1.0, "shift": 3.0} and "left out" in spec["gan"]
    assert spec["init_attention"] == ("linvideo" if target_layers else "sdpa")
    if target_layers:
        assert "ST + DMD2" in spec["generator"] and (tmp_path / "linvideo.safetensors").is_file()


def test_the_optional_regression_loss_uses_teacher_ode_pairs_made_once(tmp_path: Path) -> None:
    """DMD's regression term: the teacher sampled (20 steps, CFG) from seeded noise once, kept for a resume."""
    teacher = tiny_teacher()
    distil(tmp_path, teacher, steps=1, regression_pairs=2)
    losses = json.loads((tmp_path / "training_state.json").read_text())["losses"]
    assert set(losses[0]) == {"objective", "regression", "total", "fake_score"} and losses[0]["regression"] > 0
    [pairs] = (tmp_path / "regression").iterdir()
    saved = load_file(str(pairs))
    assert saved["noise"].shape == saved["output"].shape == (2, 3, 8, 32, 32)
    assert not torch.allclose(saved["noise"], saved["output"])


def test_an_interrupted_distillation_resumes_bit_identically(tmp_path: Path) -> None:
    teacher = tiny_teacher()
    distil(tmp_path / "straight", teacher, steps=3)
    with pytest.raises(KeyboardInterrupt):
        distil(tmp_path / "resumed", teacher, steps=3, crash_after=2)
    assert json.loads((tmp_path / "resumed" / "training_state.json").read_text())["step"] == 1  # killed in step 2
    distil(tmp_path / "resumed", teacher, steps=3)
    straight, resumed = trained(tmp_path / "straight"), trained(tmp_path / "resumed")
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)
    logs = [
        json.loads((tmp_path / run / "training_state.json").read_text())["losses"] for run in ("straight", "resumed")
    ]
    assert logs[0] == logs[1]


def test_a_linvideo_init_keeps_its_linear_layers_and_trains_their_feature_maps(tmp_path: Path) -> None:
    """The generator starts from the conversion's transformer; its layer 0 stays linear (r fixed), its maps train."""
    teacher = tiny_teacher()
    conversion = tmp_path / "conversion"
    conversion.mkdir()
    tc = teacher.transformer.config
    state = TransferState(tc.num_layers, tc.num_attention_heads, tc.attention_head_dim)
    state.set_linear((0,))
    method = LinVideo()
    method.attach(state, converted=True)
    method.save_state(conversion / "linvideo.safetensors")
    converted = {key: value + 0.01 for key, value in teacher.transformer.state_dict().items()}
    save_tensors(converted, conversion / "transformer.safetensors")
    (conversion / "spec.json").write_text(json.dumps({"method": "linvideo", "trajectory_store": {"model": "toy"}}))
    task = distil(tmp_path / "out", teacher, init=str(conversion), steps=1)
    assert task.method.state is not None and task.method.state.linear_layers() == (0,)
    assert torch.equal(task.method.state.rho, torch.tensor([0.0, 1.0]))
    maps = [(list(trained_.q_maps[layer].parameters()), list(state.q_maps[layer].parameters()))
            for trained_ in [task.method.state] for layer in (0, 1)]  # fmt: skip
    assert any(not torch.equal(a, b) for a, b in zip(*maps[0], strict=True))  # the linear layer's maps trained
    assert all(torch.equal(a, b) for a, b in zip(*maps[1], strict=True))  # a softmax layer's have no gradient
    spec = json.loads((tmp_path / "out" / "spec.json").read_text())
    assert spec["init"]["kind"] == "checkpoint" and spec["init"]["checkpoint_id"] in spec["generator"]
    assert spec["linear_layers"] == [0]


@pytest.mark.parametrize(("make", "fragment"), [
    (lambda root: root / "missing", "not 'dense' nor a checkpoint folder"),
    (lambda root: _spec_folder(root, {"method": "dmd2"}), "is a DMD2 generator already"),
    (lambda root: _spec_folder(root, {"method": "sdpa"}), "not a trained method's checkpoint"),
    (lambda root: _spec_folder(root, {"method": "linvideo", "trajectory_store": {"model": "toy"}}),
     "checkpoint file"),
])  # fmt: skip
def test_a_wrong_init_is_refused_before_any_model_is_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           make: Any, fragment: str) -> None:  # fmt: skip
    def no_build(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was built")

    monkeypatch.setattr(ToyModel, "load", no_build)
    result = invoke_cli(["train", "--method", "dmd2", "--init", make(tmp_path), "--out", tmp_path / "out"], expect=2)
    assert fragment in normalise(result.stderr)
    assert not (tmp_path / "out").exists()


def test_a_conversion_of_another_model_is_refused_as_init(tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match="is a checkpoint of model 'toy'; this distillation's teacher is 'wan-tiny'"):
        resolve_init(str(next(SHIPPED_CONVERSIONS.iterdir())), "wan-tiny")


def _spec_folder(root: Path, spec: dict[str, Any]) -> Path:
    folder = root / "init"
    folder.mkdir()
    (folder / "spec.json").write_text(json.dumps(spec))
    return folder


# -- the CLI: bench train --method dmd2, then bench run and bench report ------------------------------------------


@pytest.fixture(scope="module")
def generator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped toy teacher distilled for one step (batch 1, one fake-score update)."""
    out = tmp_path_factory.mktemp("dmd2") / "generator"
    invoke_cli(["train", "--method", "dmd2", "--steps", "1", "--batch-size", "1", "--fake-updates", "1", "--prompts",
                "2", "--device", "cpu", "--no-progress", "--out", out])  # fmt: skip
    return out


def test_bench_run_samples_the_checkpoint_in_4_steps_without_cfg(generator: Path, bench: Invoke,
                                                                 tmp_path: Path) -> None:  # fmt: skip
    runs = tmp_path / "runs"
    bench("run", "--method", "dmd2", "--checkpoint", generator, "--prompt", PROMPT, "--seeds", "0", "--eval", "none",
          "--device", "cpu", "--no-progress", "--runs-dir", runs)  # fmt: skip
    bench("run", "--method", "sdpa", "--steps", "2", "--prompt", PROMPT, "--seeds", "0", "--eval", "none", "--device",
          "cpu", "--no-progress", "--runs-dir", runs)  # fmt: skip
    dense, few = sorted(records_in(runs), key=lambda record: record["spec"]["method"] == "dmd2")
    assert few["spec"]["sampling"]["steps"] == 4 and few["spec"]["sampling"]["cfg"] == 1.0
    step = few["latency"]["stages"]["denoise_step"]
    assert step["repeats"] + len(step["warmup_ms"]) == 4
    assert few["method_params_resolved"]["generator"] == "4-step DMD2 generator, no CFG, from dense toy (builtin)"
    table = table3([dense, few])
    assert list(table["method"]) == ["sdpa", "dmd2"] and table["baseline"].iloc[1] == "sdpa 2 steps"
    assert table["speedup"].iloc[1] == pytest.approx(table["latency_s"].iloc[0] / table["latency_s"].iloc[1])


@pytest.mark.parametrize(("options", "fragment"), [
    (["--steps", "20"], "fixes steps = 4 (its generator was trained so); this run asks for steps = 20: drop --steps"),
    (["--cfg", "4"], "fixes cfg = 1.0"),
    (["--model", "wan-tiny"], "was trained on model 'toy'; this run uses 'wan-tiny'"),
    (["--param", "attention=linvideo"], "dmd2: attention 'linvideo' runs linear attention"),
])  # fmt: skip
def test_bench_run_refuses_a_run_the_generator_does_not_fit(generator: Path, bench: Invoke, tmp_path: Path,
                                                            options: list[str], fragment: str) -> None:  # fmt: skip
    result = bench("run", "--method", "dmd2", "--checkpoint", generator, *options, "--runs-dir", tmp_path, expect=2)
    assert fragment in normalise(result.stderr) and len(result.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_a_generator_of_another_init_refuses_an_attention_it_does_not_take(generator: Path, tmp_path: Path) -> None:
    """An SLA-initialised generator runs SLA everywhere: ``attention`` does not apply to it."""
    import shutil

    from harness.checkpoints import inspect_checkpoint
    from methods import build_method

    folder = tmp_path / "sla-generator"
    shutil.copytree(generator, folder)
    spec = json.loads((folder / "spec.json").read_text())
    (folder / "spec.json").write_text(json.dumps({**spec, "init_attention": "sla"}))
    build_method("sla").save_state(folder / "sla.safetensors")
    with pytest.raises(HarnessError, match=r"running sla in every layer .* drop it"):
        build_method("dmd2", attention="radial").check_checkpoint(inspect_checkpoint(folder, "dmd2", folder=True))
