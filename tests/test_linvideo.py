"""LinVideo: mixed attention, the transfer state, data-free collection, the trainer and converted checkpoints."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import Invoke, normalise, records_in

from harness.errors import HarnessError
from harness.models.toy import ToyModel
from harness.train.engine import lr_factor
from methods import build_method
from methods.kernels.linear_attention import KERNELS, naive_linear_attention
from methods.linvideo.attention import LinVideo, TransferState
from methods.linvideo.collect import CollectionSpec, TrajectoryStore, collect
from methods.linvideo.train import LinVideoTrainConfig, LinVideoTrainer

B, H, N, D = 2, 3, 29, 8
PROMPT = "a small red disk moves left on a gray background"


def _qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.randn(B, H, N, D), torch.randn(B, H, N, D), torch.randn(B, H, N, D)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("kernel", KERNELS)
def test_mixed_attention_at_r_1_is_dense_and_at_r_0_is_linear(kernel: str) -> None:
    """Eq. 8 at its ends: r = 1 gives softmax attention, r = 0 the layer's linear attention (naive reference)."""
    state = TransferState(2, H, D, kernel)
    q, k, v = _qkv()
    with torch.no_grad():
        state.rho.copy_(torch.tensor([1.0, 0.0]))
        assert _rel(state.mixed(0, q, k, v), F.scaled_dot_product_attention(q, k, v)) <= 1e-6
        reference = naive_linear_attention(state.q_maps[1](q), state.k_maps[1](k), v)
        assert _rel(state.mixed(1, q, k, v), reference) <= 1e-5


def test_mixed_attention_interpolates_linearly_in_r() -> None:
    state = TransferState(1, H, D)
    q, k, v = _qkv()
    with torch.no_grad():
        state.rho.fill_(0.3)
        expected = 0.3 * F.scaled_dot_product_attention(q, k, v) + 0.7 * state.linear(0, q, k, v)
        assert _rel(state.mixed(0, q, k, v), expected) <= 1e-6


def test_scores_are_clamped_and_layers_below_half_are_linear() -> None:
    state = TransferState(4, H, D)
    with torch.no_grad():
        state.rho.copy_(torch.tensor([1.2, 0.49, 0.5, -0.3]))
    assert state.r().tolist() == pytest.approx([1.0, 0.49, 0.5, 0.0])
    assert state.linear_layers() == (1, 3)


def test_a_projected_score_keeps_its_gradient_at_either_end() -> None:
    """Issue 20's smallest case: rho = [1.05, -0.02, 0.6] passed L_con + L_reg no gradient on the first two; after
    the projection into [0, 1] every layer has one: STE count (1 - 2) -> +2 each, L_reg at alpha 2 -> -4 (2 r - 1)."""
    from methods.linvideo.losses import binarization_loss, constraint_loss

    state = TransferState(3, 1, 4)
    with torch.no_grad():
        state.rho.copy_(torch.tensor([1.05, -0.02, 0.6]))
    state.project_()
    r = state.r()
    (constraint_loss(r, 2) + binarization_loss(r, 2.0)).backward()
    assert state.rho.tolist() == pytest.approx([1.0, 0.0, 0.6])
    assert state.rho.grad.tolist() == pytest.approx([-2.0, 6.0, 1.2])


def test_hedgehog_maps_are_separate_for_queries_and_keys() -> None:
    state = TransferState(2, H, D)
    assert state.q_maps[0].weight is not state.k_maps[0].weight
    assert torch.equal(state.q_maps[0].weight, torch.eye(D).repeat(H, 1, 1))  # identity init


def test_gradient_reaches_r_and_both_feature_maps() -> None:
    state = TransferState(1, H, D)
    q, k, v = _qkv()
    state.mixed(0, q, k, v).square().sum().backward()
    assert state.rho.grad is not None and state.rho.grad.abs().item() > 0
    assert state.q_maps[0].weight.grad.abs().sum() > 0 and state.k_maps[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("changes", "message"), [
    ({"target_layers": 9}, "target layers must be in 1..8"), ({"target_layers": 0}, "target layers must be in 1..8"),
    ({"objective": "dmd"}, "unknown objective"), ({"kernel": "hedgehgo"}, "Did you mean 'hedgehog'"),
    ({"steps": 0}, ">= 1"), ({"r_lr_schedule": "step"}, "unknown r schedule"),
    ({"adm_weighting": "dmd"}, "unknown ADM weighting"), ({"alpha_anneal_fraction": 0.0}, "anneal fraction"),
    ({"map_lr": 0.0}, "map_lr must be a finite number > 0"), ({"adm_jump": "far"}, "unknown ADM jump"),
    ({"objective": "mse", "adm_jump": "any"}, "not to mse"), ({"score_guided": True}, "needs the adm-extra-score"),
    ({"adm_step_fraction": 0.0}, "step fraction must be a finite number > 0 and <= 1"),
    ({"objective": "mse", "adm_step_fraction": 0.5}, "not to mse"),
    ({"adm_reduction": "sum"}, "unknown objective reduction"), ({"score_updates": 0}, "score updates must be >= 1"),
    ({"micro_batch": -1}, "micro batch must be >= 0"), ({"t_min": 0.0}, "t_min must be a finite number > 0 and < 1"),
    ({"lr": math.nan}, "lr must be a finite number > 0, got nan"), ({"r_init": math.inf}, "r_init must be a finite"),
    ({"alpha_end": math.nan}, "alpha_end must be a finite number > 0"), ({"lam": -1.0}, "lam must be a finite"),
    ({"t_min": math.nan}, "t_min must be a finite number"), ({"grad_clip": math.inf}, "grad clip must be a finite"),
])  # fmt: skip
def test_impossible_training_settings_are_refused(changes: dict, message: str) -> None:
    config = LinVideoTrainConfig(**{"target_layers": 4, **changes})
    with pytest.raises(HarnessError, match=message):
        config.validate(num_layers=8)


# -- collection and training on the toy teacher (tiny settings) ------------------------------------


@pytest.fixture(scope="module")
def teacher() -> ToyModel:
    return ToyModel.load("builtin", torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def store(teacher: ToyModel, tmp_path_factory: pytest.TempPathFactory) -> TrajectoryStore:
    """Three prompts, 3 sampler steps, two shards."""
    sampling = ToyModel.defaults.__class__(**{**vars(ToyModel.defaults), "steps": 3})
    spec = CollectionSpec("toy", "builtin", sampling, ToyModel.training_prompts(3, 0), (0, 1, 2), batch_size=2)
    return collect(teacher, spec, tmp_path_factory.mktemp("store"), show_progress=False)


def test_store_holds_every_step_of_every_prompt(store: TrajectoryStore) -> None:
    """3 prompts x 3 steps; times decrease along a trajectory and the last step's next time is 0."""
    assert len(store) == 9
    t, t_next = store.tensors["t"], store.tensors["t_next"]
    assert torch.all(t_next < t) and (t_next == 0).sum() == 3
    assert store.tensors["x"].shape == (9, *ToyModel.latent_shape(ToyModel.defaults))
    assert store.cond.shape[0] == 3


def test_collection_resumes_a_missing_shard_identically(store: TrajectoryStore, teacher: ToyModel,
                                                        tmp_path: Path) -> None:  # fmt: skip
    import shutil

    from methods.linvideo.collect import _shard_path

    copy = tmp_path / "store"
    shutil.copytree(store.path, copy)
    _shard_path(copy, 1).unlink()
    spec = CollectionSpec(**{**store.spec, "sampling": ToyModel.defaults.__class__(**store.spec["sampling"]),
                             "prompts": tuple(store.spec["prompts"]), "seeds": tuple(store.spec["seeds"])})  # fmt: skip
    resumed = collect(teacher, spec, copy, show_progress=False)
    assert torch.equal(resumed.tensors["x"], store.tensors["x"])


def test_store_sampling_draws_every_sampler_step_including_the_last(store: TrajectoryStore) -> None:
    """Issue 20, fault 3: the last step (t_next = 0) is drawn like the others, so ADM and MSE train it."""
    batch = store.sample(64, torch.Generator().manual_seed(0))
    low, mid, high = sorted(set(store.tensors["t"].tolist()))
    assert set(zip(batch["t"].tolist(), batch["t_next"].tolist(), strict=True)) == {(high, mid), (mid, low), (low, 0.0)}
    assert batch["cond"].shape[0] == 64


def test_store_sampling_with_any_jump_draws_every_later_grid_time(store: TrajectoryStore) -> None:
    """3-step grid: a state may land on any later sampler time, 0 included (ADM then lands it at t_min)."""
    batch = store.sample(256, torch.Generator().manual_seed(0), jump="any")
    low, mid, high = sorted(set(store.tensors["t"].tolist()))
    assert set(zip(batch["t"].tolist(), batch["t_next"].tolist(), strict=True)) == {
        (high, mid), (high, low), (high, 0.0), (mid, low), (mid, 0.0), (low, 0.0)}  # fmt: skip


def _config(**changes: object) -> LinVideoTrainConfig:
    return LinVideoTrainConfig(**{"target_layers": 4, "steps": 4, "batch_size": 2, "checkpoint_every": 2,
                                  "score_updates": 1, **changes})  # fmt: skip


def _groups(teacher: ToyModel, store: TrajectoryStore, tmp_path: Path, **changes: object) -> dict[str, object]:
    trainer = LinVideoTrainer(_config(**changes), teacher, store, tmp_path)
    return {group.name: group for group in trainer.param_groups()}


def test_lr_schedule_warms_up_over_a_tenth_then_decays_to_zero(teacher: ToyModel, store: TrajectoryStore,
                                                               tmp_path: Path) -> None:  # fmt: skip
    groups = _groups(teacher, store, tmp_path, steps=100, r_lr_schedule="cosine")
    for name in ("weights", "maps", "r"):
        assert lr_factor(groups[name], 0, 100) == pytest.approx(0.1) and lr_factor(groups[name], 9, 100) == 1.0
        assert lr_factor(groups[name], 99, 100) < 0.01


def test_a_constant_r_schedule_keeps_rs_lr_after_warm_up_while_the_weights_decay(
    teacher: ToyModel, store: TrajectoryStore, tmp_path: Path
) -> None:
    groups = _groups(teacher, store, tmp_path, steps=100, r_lr_schedule="constant")
    assert lr_factor(groups["r"], 0, 100) == pytest.approx(0.1) and lr_factor(groups["r"], 99, 100) == 1.0
    assert lr_factor(groups["weights"], 99, 100) < 0.01


def test_weights_and_maps_are_clipped_together_and_r_apart(teacher: ToyModel, store: TrajectoryStore,
                                                           tmp_path: Path) -> None:  # fmt: skip
    groups = _groups(teacher, store, tmp_path, r_optimizer="adamw", objective="adm-extra-score")
    assert [(name, group.optimizer, group.clip_with) for name, group in groups.items()] == [
        ("weights", "adamw", ""), ("maps", "adamw", "weights"), ("r", "adamw", ""), ("score", "adamw", "")]  # fmt: skip


def _one_step(trainer: LinVideoTrainer) -> None:
    """One engine step of ``trainer`` (its config: one step without warm-up, so every group steps at its lr)."""
    assert trainer.config.steps == 1 and lr_factor(trainer.param_groups()[0], 0, 1) == 1.0
    trainer.run(show_progress=False)


def _first_batch(store: TrajectoryStore, size: int = 2) -> dict[str, torch.Tensor]:
    """The batch a one-process run of seed 0 draws first (its data shard 0 is seeded with the run's seed)."""
    return store.sample(size, torch.Generator().manual_seed(0))


def _total(trainer: LinVideoTrainer, batch: dict[str, torch.Tensor], step: int = 0) -> torch.Tensor:
    return sum(trainer.losses(batch, None, step).values())


@pytest.mark.parametrize("objective", ["adm", "mse", "adm-extra-score"])
def test_trainer_writes_a_converted_checkpoint_and_logs_r(objective: str, teacher: ToyModel, store: TrajectoryStore,
                                                          tmp_path: Path) -> None:  # fmt: skip
    out = LinVideoTrainer(_config(objective=objective), teacher, store, tmp_path).run(show_progress=False)
    spec = json.loads((out / "spec.json").read_text())
    log = json.loads((out / "training_state.json").read_text())
    assert spec["steps"] == 4 and len(log["task"]["r"]) == 4 and len(log["task"]["r"][0]) == 8
    assert {"objective", "constraint", "regulariser", "total"} <= set(log["losses"][0])
    assert (out / "linvideo.safetensors").is_file() and (out / "transformer.safetensors").is_file()


def test_sgd_moves_each_score_by_its_own_gradient_and_adamw_moves_all_alike(
    teacher: ToyModel, store: TrajectoryStore, tmp_path: Path
) -> None:
    """r's optimizer: SGD keeps the per-layer gradient size (the ranking signal); AdamW's first step is lr * sign."""
    moves = {}
    for name in ("sgd", "adamw"):
        trainer = LinVideoTrainer(_config(r_optimizer=name, r_lr=0.05, steps=1, warmup_fraction=0.0), teacher, store,
                                  tmp_path / name)  # fmt: skip
        with trainer.session():
            grad = torch.autograd.grad(_total(trainer, _first_batch(store)), trainer.state.rho)[0]
        grad = grad * min(1.0, trainer.config.grad_clip / (float(grad.norm()) + 1e-6))  # r is clipped alone
        before = trainer.state.rho.detach().clone()
        _one_step(trainer)
        moves[name] = (trainer.state.rho.detach() - before, grad)
    step, grad = moves["sgd"]
    assert torch.allclose(step, -0.05 * grad, atol=1e-7) and grad.std() > 0
    assert torch.allclose(moves["adamw"][0].abs(), torch.full((8,), 0.05), atol=1e-4)


def test_feature_maps_take_their_own_learning_rate(teacher: ToyModel, store: TrajectoryStore, tmp_path: Path) -> None:
    """--map-lr: Adam's first step moves the maps' entries by map_lr and the transformer's by at most lr."""
    trainer = LinVideoTrainer(_config(lr=1e-5, map_lr=1e-2, steps=1, warmup_fraction=0.0), teacher, store, tmp_path)
    maps_before = [p.detach().clone() for p in trainer.state.q_maps.parameters()]
    weights_before = [p.detach().clone() for p in trainer.student.transformer.parameters()]
    _one_step(trainer)
    map_moves = torch.cat([(p.detach() - b).abs().flatten() for p, b in zip(trainer.state.q_maps.parameters(),
                                                                              maps_before, strict=True)])  # fmt: skip
    weight_moves = [(p.detach() - b).abs().max() for p, b in zip(trainer.student.transformer.parameters(),
                                                                  weights_before, strict=True)]  # fmt: skip
    assert map_moves.max() == pytest.approx(1e-2, rel=1e-3)
    assert max(weight_moves) <= 1e-5 * 1.05  # fp32 rounding of entries near 1


def test_extra_score_model_trains_beside_the_student(teacher: ToyModel, store: TrajectoryStore, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """adm-extra-score: score_updates inner updates per step (each on its own batch) train the separate score model
    (initialised from the teacher) and leave the teacher as it was; their loss is logged beside the student's."""
    calls: list[int] = []
    original = LinVideoTrainer.inner_losses

    def counted(self, batch, shard, step, index):  # type: ignore[no-untyped-def]
        calls.append(index)
        return original(self, batch, shard, step, index)

    monkeypatch.setattr(LinVideoTrainer, "inner_losses", counted)
    trainer = LinVideoTrainer(_config(objective="adm-extra-score", score_updates=2, steps=2), teacher, store, tmp_path)
    assert trainer.score_model is not None and trainer.inner_groups == ("score",)
    before = [p.detach().clone() for p in trainer.score_model.transformer.parameters()]
    trainer.run(show_progress=False)
    assert calls == [0, 1, 0, 1]
    after = list(trainer.score_model.transformer.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    for t, b in zip(teacher.transformer.parameters(), before, strict=True):
        assert torch.equal(t, b)
    log = json.loads((tmp_path / "training_state.json").read_text())
    assert math.isfinite(log["losses"][0]["score"])
    assert json.loads((tmp_path / "spec.json").read_text())["score_seconds_per_step"] > 0


def test_interrupted_training_resumes_to_the_same_weights(teacher: ToyModel, store: TrajectoryStore, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Stopping after the step-2 checkpoint and rerunning gives bit-identical results to one straight run."""
    straight = LinVideoTrainer(_config(), teacher, store, tmp_path / "a")
    straight.run(show_progress=False)

    original = LinVideoTrainer.losses
    calls = {"n": 0}

    def interrupt_after_two(self, batch, shard, step):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return original(self, batch, shard, step)

    monkeypatch.setattr(LinVideoTrainer, "losses", interrupt_after_two)
    with pytest.raises(KeyboardInterrupt):
        LinVideoTrainer(_config(), teacher, store, tmp_path / "b").run(show_progress=False)
    monkeypatch.setattr(LinVideoTrainer, "losses", original)
    resumed = LinVideoTrainer(_config(), teacher, store, tmp_path / "b")
    resumed.run(show_progress=False)
    assert torch.equal(resumed.state.rho, straight.state.rho)
    for a, b in zip(resumed.student.transformer.parameters(), straight.student.transformer.parameters(), strict=True):
        assert torch.equal(a, b)


def test_non_finite_loss_stops_with_a_message_and_keeps_the_checkpoint(
    teacher: ToyModel, store: TrajectoryStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = LinVideoTrainer.losses

    def nan_at_step_three(self, batch, shard, step):  # type: ignore[no-untyped-def]
        terms = original(self, batch, shard, step)
        if step == 2:
            terms["objective"] = terms["objective"] * float("nan")
        return terms

    monkeypatch.setattr(LinVideoTrainer, "losses", nan_at_step_three)
    with pytest.raises(HarnessError, match=r"non-finite loss at step 3 .*last good checkpoint is kept"):
        LinVideoTrainer(_config(), teacher, store, tmp_path).run(show_progress=False)
    assert json.loads((tmp_path / "training_state.json").read_text())["step"] == 2


def test_an_old_single_process_checkpoint_is_refused_with_what_to_do(teacher: ToyModel, store: TrajectoryStore,
                                                                     tmp_path: Path) -> None:  # fmt: skip
    """A run folder of the trainer before the engine (its state in training_state.json + .safetensors) is not
    resumed: the message names the file to remove to start over."""
    (tmp_path / "training_state.json").write_text(json.dumps({"config": _config().record(), "step": 2, "seconds": 1.0,
                                                              "losses": [], "r": []}))  # fmt: skip
    message = r"written by a trainer before the training engine .* remove .*training_state"
    with pytest.raises(HarnessError, match=message):
        LinVideoTrainer(_config(), teacher, store, tmp_path).run(show_progress=False)


def test_a_conversion_finished_before_the_engine_is_returned_as_it_is(teacher: ToyModel, store: TrajectoryStore,
                                                                      tmp_path: Path) -> None:  # fmt: skip
    """A rerun over a run the trainer before the engine finished (a sweep's variant) returns its conversion."""
    (tmp_path / "training_state.json").write_text(json.dumps({"config": _config().record(), "step": 4, "seconds": 1.0,
                                                              "losses": [], "r": []}))  # fmt: skip
    (tmp_path / "spec.json").write_text("{}")
    assert LinVideoTrainer(_config(), teacher, store, tmp_path).run(show_progress=False) == tmp_path
    assert not (tmp_path / "checkpoint").exists() and (tmp_path / "spec.json").read_text() == "{}"


def test_converted_checkpoint_reloads_to_the_same_outputs_bit_for_bit(teacher: ToyModel, store: TrajectoryStore,
                                                                      tmp_path: Path) -> None:  # fmt: skip
    """The trained student in memory and a fresh toy model + the loaded checkpoint give identical velocities."""
    trainer = LinVideoTrainer(_config(steps=2), teacher, store, tmp_path)
    with torch.no_grad():
        trainer.state.rho.copy_(torch.tensor([0.2, 0.9, 0.1, 0.8, 0.3, 0.7, 0.45, 0.95]))
    trainer.write_converted(trainer.student.transformer.state_dict(), 0, 0.0, {})
    x, t = store.tensors["x"][:2], store.tensors["t"][:2] * 1000
    cond = store.cond[store.tensors["prompt"][:2]]
    trainer.student.transformer.eval()
    with trainer.student.use_method(trainer.method), torch.no_grad():
        expected = trainer.student.forward(x, t, cond)

    fresh = ToyModel.load("builtin", torch.device("cpu"), torch.float32)
    method = LinVideo()
    method.load_checkpoint(tmp_path, fresh.transformer)
    assert method.state is not None and method.state.linear_layers() == (0, 2, 4, 6)
    with fresh.use_method(method), torch.no_grad():
        assert torch.equal(fresh.forward(x, t, cond), expected)
    assert method.density.per_layer() == {0: 0.0, 1: 1.0, 2: 0.0, 3: 1.0, 4: 0.0, 5: 1.0, 6: 0.0, 7: 1.0}


def test_bench_run_linvideo_on_a_real_model_without_checkpoint_fails_early(bench: Invoke, tmp_path: Path) -> None:
    result = bench("run", "--method", "linvideo", "--model", "wan-tiny", "--random-weights", "--eval", "none",
                   "--runs-dir", tmp_path, expect=2)  # fmt: skip
    assert "bench train --method linvideo" in normalise(result.output)


def test_bench_run_linvideo_on_toy_trains_the_default_once_and_caches_it(
    bench: Invoke, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No --checkpoint on the toy: the default conversion is trained into the cache, recorded by its files' hashes
    (not the training state), then reused."""
    import harness.training as training
    from harness.checkpoints import file_sha256

    monkeypatch.setenv(training.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(training, "DEFAULT_PROMPT_COUNT", 2)
    monkeypatch.setattr(training, "default_recipe", lambda layers: _config(target_layers=layers // 2, steps=2))
    args = ("run", "--method", "linvideo", "--model", "toy", "--prompt", PROMPT, "--seeds", "0", "--no-progress")
    first = bench(*args, "--runs-dir", tmp_path / "a")
    [cached] = (tmp_path / "cache" / "linvideo").iterdir()
    [record] = records_in(tmp_path / "a")
    assert (cached / "spec.json").is_file() and str(cached) in record["spec"]["checkpoint"]
    assert record["checkpoint_identity"] == {
        "linvideo.safetensors": file_sha256(cached / "linvideo.safetensors"),
        "spec.json": file_sha256(cached / "spec.json"),
        "transformer.safetensors": file_sha256(cached / "transformer.safetensors"),
    }
    trained_at = (cached / "spec.json").stat().st_mtime_ns
    bench(*args, "--runs-dir", tmp_path / "b")
    assert (cached / "spec.json").stat().st_mtime_ns == trained_at, "the second run reuses the cached conversion"
    assert "default LinVideo conversion" in normalise(first.output)


def test_the_shipped_conversion_is_used_when_its_name_matches_the_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A conversion shipped beside the teacher under the recipe's name is returned; nothing is trained."""
    import harness.toyworld.checkpoint as toy_checkpoint
    import harness.training as training

    trained: list[Path] = []
    monkeypatch.setenv(training.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(toy_checkpoint, "SHIPPED_CONVERSIONS", tmp_path / "shipped")
    monkeypatch.setattr(training, "train", lambda request: trained.append(request.out) or request.out)
    monkeypatch.setattr(training, "default_recipe", lambda layers: _config(target_layers=layers // 2, steps=2))
    cache_folder = training.default_checkpoint("toy", "cpu", show_progress=False)
    assert trained == [cache_folder] and cache_folder.parent == tmp_path / "cache" / "linvideo"
    shipped = tmp_path / "shipped" / cache_folder.name
    shipped.mkdir(parents=True)
    (shipped / "spec.json").write_text("{}")
    assert training.default_checkpoint("toy", "cpu", show_progress=False) == shipped
    assert trained == [cache_folder], "nothing trained once a matching conversion ships"


def test_the_shipped_toy_conversion_is_the_current_default_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    """A change to the recipe's config must come with a reshipped (or renamed) conversion, else the demo trains."""
    import harness.training as training
    from harness.toyworld.checkpoint import SHIPPED_CONVERSIONS

    monkeypatch.setattr(training, "train", lambda request: pytest.fail(f"would train {request.out}"))
    shipped = training.default_checkpoint("toy", "cpu", show_progress=False)
    assert shipped.parent == SHIPPED_CONVERSIONS
    recorded = json.loads((shipped / "spec.json").read_text())["config"]
    assert recorded == training.default_recipe(8).record()


def test_bench_train_says_when_the_target_was_missed(bench: Invoke, tmp_path: Path) -> None:
    """Two steps from r = 0.95 convert nothing: the summary says so next to the target."""
    result = bench("train", "--method", "linvideo", "--model", "toy", "--target-layers", "2", "--steps", "2",
                   "--batch-size", "2", "--prompts", "2", "--device", "cpu", "--no-progress", "--out", tmp_path / "o",
                   "--store", tmp_path / "store")  # fmt: skip
    assert "0 layer(s) ended linear, not the target 2" in normalise(result.output)


def test_bench_train_says_which_layers_ended_between_the_branches(bench: Invoke, tmp_path: Path) -> None:
    """From r = 0.7 two steps leave every r mixed: the summary names the layers that rounding will switch."""
    result = bench("train", "--method", "linvideo", "--model", "toy", "--target-layers", "2", "--steps", "2",
                   "--r-init", "0.7", "--batch-size", "2", "--prompts", "2", "--device", "cpu", "--no-progress",
                   "--out", tmp_path / "o", "--store", tmp_path / "store")  # fmt: skip
    final_r = json.loads((tmp_path / "o" / "spec.json").read_text())["final_r"]
    assert all(0.1 < r < 0.9 for r in final_r)
    output = normalise(result.output)
    assert "ended between the two branches" in output and f"0 (r = {final_r[0]:.2f})" in output


TRIALS = Path(__file__).resolve().parents[1] / "reports" / "toy" / "linvideo_trials"


@pytest.mark.parametrize(("run", "diverged"), [
    ("round6_data/l01_3k", True),  # ADM, 3K steps at lr 1e-5: objective ~20 -> ~1,300, clips noise
    ("round7_stability/rl01_lr3", True),  # lr 3e-5: blew up at step ~480
    ("round7_stability/a3e6_l03", False),  # lr 3e-6: stable, prompt correctness 78.1
    ("round6_data/man_mse_3k_lr3", False),  # MSE, 93.8
])  # fmt: skip
def test_divergence_note_tells_the_blown_up_trainings_from_the_stable_ones(run: str, diverged: bool) -> None:
    """On recorded H100 trainings: a note for each run whose objective blew up, none for the stable ones."""
    from harness.training import divergence_note

    losses = json.loads(gzip.decompress((TRIALS / run / "training_state.json.gz").read_bytes()))["losses"]
    note = divergence_note([step["objective"] for step in losses])
    assert (note is not None) == diverged
    if diverged:
        assert "the objective diverged" in note and "--lr" in note


def test_divergence_note_waits_for_two_windows_after_the_first_tenth() -> None:
    """Too short to compare two windows past its first tenth: no note; longer, with the same jump: a note."""
    from harness.training import DIVERGENCE_WINDOW, divergence_note

    short = [1.0] * DIVERGENCE_WINDOW + [1e4] * DIVERGENCE_WINDOW
    assert divergence_note(short) is None
    assert divergence_note([1.0] * 2 * DIVERGENCE_WINDOW + [1e4] * 2 * DIVERGENCE_WINDOW) is not None


def test_bench_train_refuses_more_target_layers_than_the_model_has(bench: Invoke, tmp_path: Path) -> None:
    result = bench("train", "--model", "toy", "--target-layers", "12", "--out", tmp_path / "o", expect=2)
    assert "target layers must be in 1..8" in normalise(result.output)
    assert not (tmp_path / "o").exists()


def test_greedy_selection_replaces_the_least_harmful_layer_first() -> None:
    """With per-layer harms 0.5, 0.1, 0.3 (additive), greedy picks 1 then 2; each round lists every candidate."""
    from methods.linvideo.selection import greedy_selection

    harm = torch.tensor([0.5, 0.1, 0.3], dtype=torch.float64)
    reference = torch.ones(4, dtype=torch.float64)

    def output_with(layers: tuple[int, ...]) -> torch.Tensor:
        return reference + harm[list(layers)].sum()

    layers, rounds = greedy_selection(output_with, reference, num_layers=3, target=2)
    assert layers == (1, 2)
    assert rounds[0] == pytest.approx({"0": 0.5, "1": 0.1, "2": 0.3}) and set(rounds[1]) == {"0", "2"}


@pytest.mark.parametrize(("layers", "message"), [((1, 1, 2, 3), "distinct"), ((1, 9, 2, 3), "distinct indices"),
                                                 ((1, 2), "names 2 layers but the target is 4")])  # fmt: skip
def test_manual_selection_must_name_target_distinct_layers(layers: tuple[int, ...], message: str) -> None:
    with pytest.raises(HarnessError, match=message):
        LinVideoTrainConfig(target_layers=4, selection="manual", layers=layers).validate(num_layers=8)


@pytest.mark.parametrize("selection", ["manual", "heuristic"])
def test_fixed_selections_convert_exactly_target_layers_and_freeze_r(
    selection: str, teacher: ToyModel, store: TrajectoryStore, tmp_path: Path
) -> None:
    layers = (0, 3, 5, 6) if selection == "manual" else ()
    trainer = LinVideoTrainer(_config(selection=selection, layers=layers, steps=2), teacher, store, tmp_path)
    out = trainer.run(show_progress=False)
    spec = json.loads((out / "spec.json").read_text())
    assert len(spec["linear_layers"]) == 4 and not trainer.state.rho.requires_grad
    if selection == "manual":
        assert spec["linear_layers"] == [0, 3, 5, 6]
    else:
        assert len(spec["greedy_rounds"]) == 4 and len(spec["greedy_rounds"][0]) == 8


def test_latency_times_an_untrained_linvideo_state_at_a_given_layer_set(bench: Invoke) -> None:
    """`bench latency --param linvideo.linear_layers=[1]` times linear attention on layer 1 (density 0.5)."""
    result = bench("latency", "--model", "wan-tiny", "--device", "cpu", "--methods", "sdpa,linvideo", "--param",
                   "linvideo.linear_layers=[1]", "--repeats", "1", "--warmup", "0", "--json")  # fmt: skip
    entry = json.loads(result.stdout)["methods"]["linvideo"]
    assert entry["density"] == pytest.approx(0.5)


def test_latency_param_needs_a_method_prefix(bench: Invoke) -> None:
    result = bench("latency", "--model", "wan-tiny", "--methods", "sdpa", "--param", "linear_layers=[1]", expect=2)
    assert "METHOD.KEY=VALUE" in normalise(result.output)


# -- issue 20: the trainer's faults, ADM's landing step, the objective's scale, accumulation, the sampler grid ------


def _states(store: TrajectoryStore, last: bool, count: int = 2) -> dict[str, torch.Tensor]:
    """``count`` stored states of the last sampler step (t_next = 0) or of the others, with their prompts."""
    rows = torch.nonzero((store.tensors["t_next"] == 0) == last).flatten()[:count]
    batch = {key: value[rows] for key, value in store.tensors.items()}
    batch["cond"] = store.cond[batch["prompt"]]
    return batch


def test_the_trainer_projects_an_overshooting_score_back_and_it_keeps_training(
    teacher: ToyModel, store: TrajectoryStore, tmp_path: Path
) -> None:
    """Issue 20, fault 1: from r = 0.999 L_reg's pull (alpha 20) at lr 1 overshoots 1; the score stays at 1, and the
    next step's gradient still reaches every layer (a clamp-only r passed none there)."""
    trainer = LinVideoTrainer(_config(r_init=0.999, r_lr=1.0, steps=1, warmup_fraction=0.0), teacher, store, tmp_path)
    _one_step(trainer)
    assert trainer.state.rho.tolist() == [1.0] * 8
    with trainer.session():
        _total(trainer, _states(store, last=False), 1).backward()
    assert bool((trainer.state.rho.grad != 0).all())


def test_adm_lands_the_last_sampler_step_at_t_min(teacher: ToyModel, store: TrajectoryStore, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Issue 20, fault 3: a state of the last step (t_next = 0) trains the student; both models are read at t_min."""
    import methods.linvideo.train as train

    times: set[float] = set()
    original = train.guided_velocity

    def recording(model, x, t, *args):  # type: ignore[no-untyped-def]
        times.update(t.tolist())
        return original(model, x, t, *args)

    monkeypatch.setattr(train, "guided_velocity", recording)
    trainer = LinVideoTrainer(_config(adm_weighting="analytic"), teacher, store, tmp_path)
    batch = _states(store, last=True)
    with trainer.teacher.use_method(build_method("sdpa")), trainer.student.use_method(trainer.method):
        objective = trainer.losses(batch, None, 0)["objective"]
        objective.backward()
    assert sorted(times) == pytest.approx([0.02, batch["t"][0].item()])
    assert math.isfinite(objective.item()) and objective.item() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.student.transformer.parameters())


def test_t_min_must_lie_below_the_smallest_sampler_time(teacher: ToyModel, store: TrajectoryStore,
                                                        tmp_path: Path) -> None:  # fmt: skip
    smallest = float(store.grid[0])
    with pytest.raises(HarnessError, match="must lie below the sampler's smallest time"):
        LinVideoTrainer(_config(t_min=smallest), teacher, store, tmp_path)


def test_step_fraction_1_reproduces_the_next_step_objective_exactly(teacher: ToyModel, store: TrajectoryStore,
                                                                    tmp_path: Path) -> None:  # fmt: skip
    """kappa = 1: x_hat one student step to t_next, uniform weight, mean surrogate, bit for bit (the code before it)."""
    from methods.linvideo.losses import adm_loss, step_normalized_adm_gradient
    from methods.linvideo.train import guided_velocity, trajectory_objective

    trainer = LinVideoTrainer(_config(selection="manual", layers=(0, 1, 2, 6)), teacher, store, tmp_path)
    batch = _states(store, last=False)
    x_s, s, t, cond = batch["x"], batch["t"], batch["t_next"], batch["cond"]
    with trainer.teacher.use_method(build_method("sdpa")), trainer.student.use_method(trainer.method):
        objective = trajectory_objective(trainer.student, teacher, batch, trainer.uncond, trainer.cfg,
                                         trainer.settings)  # fmt: skip
        u_student = guided_velocity(trainer.student, x_s, s, cond, trainer.uncond, trainer.cfg)
        x_hat = x_s - (s - t).view(-1, 1, 1, 1, 1) * u_student
        with torch.no_grad():
            u_teacher = guided_velocity(teacher, x_hat, t, cond, trainer.uncond, trainer.cfg)
            u_fake = guided_velocity(trainer.student, x_hat, t, cond, trainer.uncond, trainer.cfg)
        expected = adm_loss(x_hat, step_normalized_adm_gradient(u_teacher, u_fake, s - t), "mean")
    assert torch.equal(objective, expected)


def test_a_small_step_fraction_turns_adms_gradient_towards_mses(teacher: ToyModel, store: TrajectoryStore,
                                                                tmp_path: Path) -> None:  # fmt: skip
    """kappa -> 0 makes ADM a weighted MSE at x_s: on one state the cosine of their weight gradients rises to 1."""
    from dataclasses import replace

    from methods.linvideo.diagnostics import gradient_cosine

    trainer = LinVideoTrainer(_config(selection="manual", layers=(0, 1, 2, 6)), teacher, store, tmp_path)
    batch = _states(store, last=False, count=1)
    cosines = []
    with trainer.teacher.use_method(build_method("sdpa")), trainer.student.use_method(trainer.method):
        for kappa in (1.0, 0.1, 0.003):
            trainer.settings = replace(trainer.settings, step_fraction=kappa)
            cosines.append(gradient_cosine(trainer, batch))
    assert cosines[0] < cosines[1] < cosines[2] and cosines[2] > 0.99, cosines


@pytest.mark.parametrize(("weighting", "plain_mse_cosine_below"), [("uniform", 1.0), ("analytic", 0.9)])
def test_at_a_small_step_adm_is_the_mse_weighted_by_its_limit_weights(
    weighting: str, plain_mse_cosine_below: float, teacher: ToyModel, store: TrajectoryStore, tmp_path: Path
) -> None:
    """Issue 20, E1's cause: on states of every sampler time (the last included) ADM's gradient at kappa 0.003 is the
    gradient of the MSE weighted per state by limit_weights (cosine > 0.998; fp32); under the analytic weighting those
    weights span decades, so it is not plain MSE's direction."""
    from dataclasses import replace

    from methods.linvideo.diagnostics import gradient_cosine, gradient_norms, limit_cosine, limit_weights

    trainer = LinVideoTrainer(_config(selection="manual", layers=(0, 1, 2, 6), adm_weighting=weighting), teacher,
                              store, tmp_path)  # fmt: skip
    batch = {key: value.clone() for key, value in store.tensors.items()}
    batch["cond"] = store.cond[batch["prompt"]]
    trainer.settings = replace(trainer.settings, step_fraction=0.003)
    with trainer.teacher.use_method(build_method("sdpa")), trainer.student.use_method(trainer.method):
        assert limit_cosine(trainer, batch) > 0.998
        assert gradient_cosine(trainer, batch) < plain_mse_cosine_below
        norms = gradient_norms(trainer, batch)
    spread = limit_weights(trainer, batch)
    assert spread.shape == (len(batch["t"]),) and bool((spread > 0).all())
    assert set(norms) == {"adm", "mse"} and all(math.isfinite(n) and n > 0 for n in norms.values())


@pytest.mark.parametrize("weighting", ["uniform", "analytic"])
def test_adms_gradient_on_r_is_eq_12s_not_divided_by_the_sample_size(
    weighting: str, teacher: ToyModel, store: TrajectoryStore, tmp_path: Path
) -> None:
    """sample-sum: d objective / d rho = mean over samples of sum(g * d x_hat / d rho) (Eq. 12); mean: that divided
    by the elements of a sample (C F H W), the documented scale, and nothing else."""
    from dataclasses import replace

    from methods.linvideo.losses import adm_gradient, step_normalized_adm_gradient
    from methods.linvideo.train import guided_velocity, student_step, trajectory_objective

    trainer = LinVideoTrainer(_config(adm_weighting=weighting, adm_reduction="sample-sum"), teacher, store, tmp_path)
    with torch.no_grad():
        trainer.state.rho.fill_(0.6)
    batch, rho = _states(store, last=False), trainer.state.rho
    with trainer.teacher.use_method(build_method("sdpa")), trainer.student.use_method(trainer.method):
        gradients = {}
        for reduction in ("sample-sum", "mean"):
            settings = replace(trainer.settings, adm_reduction=reduction)
            objective = trajectory_objective(trainer.student, teacher, batch, trainer.uncond, trainer.cfg, settings)
            gradients[reduction] = torch.autograd.grad(objective, rho)[0]
        _, x_hat, t = student_step(trainer.student, batch, trainer.uncond, trainer.cfg, trainer.settings)
        with torch.no_grad():
            cond = batch["cond"]
            u_teacher = guided_velocity(teacher, x_hat, t, cond, trainer.uncond, trainer.cfg)
            u_fake = guided_velocity(trainer.student, x_hat, t, cond, trainer.uncond, trainer.cfg)
            g = (adm_gradient(u_teacher, u_fake, t) if weighting == "analytic"
                 else step_normalized_adm_gradient(u_teacher, u_fake, batch["t"] - t))  # fmt: skip
        eq12 = torch.autograd.grad((g * x_hat).sum() / len(x_hat), rho)[0]
    assert eq12.abs().max() > 0
    assert torch.allclose(gradients["sample-sum"], eq12, rtol=1e-4, atol=1e-9)
    assert torch.allclose(gradients["mean"], eq12 / x_hat[0].numel(), rtol=1e-4, atol=1e-12)


def test_micro_batches_accumulate_to_the_whole_batch_step(teacher: ToyModel, store: TrajectoryStore,
                                                          tmp_path: Path) -> None:  # fmt: skip
    """A step in micro-batches of 1 (the engine's parts of one batch) ends where the one-pass step ends, with the
    same logged losses."""
    ends = []
    for micro in (0, 1):
        trainer = LinVideoTrainer(_config(micro_batch=micro, r_init=0.7, batch_size=3, steps=1, warmup_fraction=0.0),
                                  teacher, store, tmp_path / str(micro))  # fmt: skip
        assert [share for _, share in trainer.parts(_first_batch(store, 3))] == ([1.0] if micro == 0 else [1 / 3] * 3)
        rho_before = trainer.state.rho.detach().clone()
        _one_step(trainer)
        losses = json.loads((tmp_path / str(micro) / "training_state.json").read_text())["losses"][0]
        ends.append((losses, trainer.state.rho.detach() - rho_before,
                     [p.detach().clone() for p in trainer.student.transformer.parameters()]))  # fmt: skip
    (one, r_whole, whole), (many, r_parts, parts) = ends
    assert one == pytest.approx(many, rel=1e-5)
    assert float(r_whole.abs().max()) > 0 and _rel(r_parts, r_whole) <= 1e-4  # SGD: the step is the gradient
    for a, b in zip(whole, parts, strict=True):
        assert _rel(b, a) <= 1e-6  # fp32 sums in another order


def test_a_config_record_leaves_later_fields_out_at_their_defaults() -> None:
    """Settings added after the shipped conversion appear in a record (a run's name) only when set."""
    assert "adm_step_fraction" not in LinVideoTrainConfig(target_layers=4).record()
    assert LinVideoTrainConfig(target_layers=4, adm_step_fraction=0.3).record()["adm_step_fraction"] == 0.3


def test_diagnostics_measure_every_sampler_time_and_see_a_converted_students_error(
    teacher: ToyModel, store: TrajectoryStore, tmp_path: Path
) -> None:
    """Velocity error at every sampler time (the last included): 0 for a student equal to its teacher, > 0 once
    layers are linear; the cosines are cosines."""
    from methods.linvideo.diagnostics import fixed_states, measure, velocity_error

    states = fixed_states(store, states=2, prompts_per_step=2)
    measured = {}
    for name, changes in (("teacher", {"r_init": 1.0}), ("linear", {"selection": "manual", "layers": (0, 1, 2, 6)})):
        trainer = LinVideoTrainer(_config(**changes), teacher, store, tmp_path / name)
        with trainer.teacher.use_method(build_method("sdpa")), trainer.student.use_method(trainer.method):
            if name == "linear":
                measured[name] = measure(trainer, states)
            else:  # equal to its teacher: no gradient to compare, only the errors
                measured[name] = {"velocity_error": velocity_error(trainer, states["per_step"])}
    times = [f"{time:.4f}" for time in sorted(store.grid.tolist(), reverse=True)]
    assert list(measured["teacher"]["velocity_error"]) == times
    assert all(error == 0.0 for error in measured["teacher"]["velocity_error"].values())
    assert all(error > 0.0 for error in measured["linear"]["velocity_error"].values())
    for cosine in ("gradient_cosine", "limit_cosine", "error_cosine"):
        assert -1.0 <= measured["linear"][cosine] <= 1.0, cosine


def test_bench_train_collects_on_the_sampler_grid_it_is_given(bench: Invoke, tmp_path: Path) -> None:
    """--sampler-steps / --sampler-shift: the store holds the teacher's trajectories on that grid (Wan's scheduler)."""
    bench("train", "--method", "linvideo", "--model", "toy", "--target-layers", "2", "--steps", "1", "--batch-size",
          "1", "--prompts", "1", "--sampler-steps", "5", "--sampler-shift", "5", "--objective", "mse", "--device",
          "cpu", "--no-progress", "--out", tmp_path / "o", "--store", tmp_path / "store")  # fmt: skip
    store = TrajectoryStore(tmp_path / "store")
    assert (store.spec["sampling"]["steps"], store.spec["sampling"]["shift"]) == (5, 5.0)
    scheduler = ToyModel.load("builtin", torch.device("cpu"), torch.float32).make_scheduler(5.0)
    scheduler.set_timesteps(5)
    assert torch.allclose(store.grid.flip(0), scheduler.timesteps.float() / 1000)


def test_bench_train_recipe_paper_sets_the_appendix_values_and_options_override(bench: Invoke, tmp_path: Path) -> None:
    bench("train", "--method", "linvideo", "--model", "toy", "--recipe", "paper", "--target-layers", "2", "--steps",
          "1", "--batch-size", "2", "--prompts", "2", "--device", "cpu", "--no-progress", "--out", tmp_path / "o",
          "--store", tmp_path / "store")  # fmt: skip
    config = json.loads((tmp_path / "o" / "spec.json").read_text())["config"]
    assert (config["steps"], config["batch_size"]) == (1, 2)  # given explicitly
    assert {key: config[key] for key in ("lr", "map_lr", "alpha_anneal_fraction", "adm_weighting", "lam",
                                         "warmup_fraction")} == {
        "lr": 1e-4, "map_lr": 1e-4, "alpha_anneal_fraction": 1.0, "adm_weighting": "analytic", "lam": 0.01,
        "warmup_fraction": 0.1}  # fmt: skip


@pytest.mark.parametrize("weighting", ["uniform", "normalized", "analytic"])
def test_mse_limit_is_the_stored_velocity_mse_weighted_by_adms_limit_weights(
    weighting: str, teacher: ToyModel, store: TrajectoryStore, tmp_path: Path
) -> None:
    """Issue 20, E1c's arm: ``mse-limit`` equals the plain MSE's per-state terms times limit_weights (by hand, fp32),
    so a training with it differs from ADM at a small step only in what ADM adds beyond its limit."""
    from methods.linvideo.diagnostics import limit_weights
    from methods.linvideo.train import guided_velocity, trajectory_objective

    trainer = LinVideoTrainer(_config(objective="mse-limit", adm_weighting=weighting, adm_reduction="sample-sum",
                                      adm_step_fraction=0.1), teacher, store, tmp_path)  # fmt: skip
    other, last = _states(store, last=False), _states(store, last=True)
    batch = {key: torch.cat([other[key], last[key]]) for key in other}
    with trainer.teacher.use_method(build_method("sdpa")), trainer.student.use_method(trainer.method):
        objective = trajectory_objective(trainer.student, teacher, batch, trainer.uncond, trainer.cfg,
                                         trainer.settings)  # fmt: skip
        with torch.no_grad():
            u_student = guided_velocity(trainer.student, batch["x"], batch["t"], batch["cond"], trainer.uncond,
                                        trainer.cfg)  # fmt: skip
    per_state = ((u_student - batch["u"].float()) ** 2).flatten(1).sum(dim=1)
    expected = (limit_weights(trainer, batch) * per_state).mean()
    assert float(objective.detach()) == pytest.approx(float(expected), rel=1e-5)
    weights = limit_weights(trainer, batch)
    assert bool((weights > 0).all()) and not torch.allclose(weights, weights[0].expand_as(weights))


def test_mse_limit_refuses_a_jump_past_its_own_sampler_step() -> None:
    with pytest.raises(HarnessError, match="adm-jump next"):
        _config(objective="mse-limit", adm_jump="any").validate(8)
