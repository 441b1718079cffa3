"""Dense methods against a hand-written reference; support checks; schedule; method state files."""

from __future__ import annotations

import os
from typing import ClassVar

import pytest
import torch

from harness.errors import HarnessError, UnsupportedError
from methods import AttentionContext, AttentionMethod, Schedule, TokenGrid, build_method
from methods.base import DensityLog

SHAPE = (2, 3, 50, 16)  # (B, H, N, D)
CPU = torch.device("cpu")


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v in float64, written out by hand."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    scores = scores - scores.amax(dim=-1, keepdim=True)
    weights = scores.exp()
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights @ v


def ctx(layer: int = 0, step: int = 0, num_layers: int = 2, num_steps: int = 3) -> AttentionContext:
    return AttentionContext(
        layer=layer, num_layers=num_layers, step=step, num_steps=num_steps, timestep=1.0 - step / num_steps,
        cfg_branch="cond", grid=TokenGrid(2, 5, 5),
    )  # fmt: skip


@pytest.mark.parametrize("name", ["sdpa", "math"])
def test_dense_method_matches_fp64_reference(name: str) -> None:
    """sdpa and math on CPU fp32 match an fp64 softmax reference to relative error <= 1e-5."""
    q, k, v = (torch.randn(SHAPE) for _ in range(3))
    method = build_method(name)
    method.check_supported(CPU, torch.float32)
    out = method(q, k, v, ctx())
    ref = reference_attention(q, k, v)
    assert out.shape == SHAPE and out.dtype == torch.float32
    rel = (out.double() - ref).norm() / ref.norm()
    assert rel <= 1e-5, f"{name}: relative error {rel:.3g}"
    assert method.density.mean() == 1.0


@pytest.mark.parametrize("name", ["fa2", "cudnn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_only_method_rejected_on_cpu(name: str, dtype: torch.dtype) -> None:
    """fa2 and cudnn raise UnsupportedError on CPU, naming the method and saying it needs cuda."""
    method = build_method(name)
    with pytest.raises(UnsupportedError) as info:
        method.check_supported(CPU, dtype)
    message = str(info.value)
    assert repr(name) in message
    assert "cannot run on cpu" in message
    assert "needs cuda" in message


@pytest.mark.parametrize("name", ["fa2", "cudnn"])
def test_cuda_only_method_refused_by_model(name: str, tiny_model) -> None:
    """Routing a model on CPU through fa2/cudnn fails before any processor is swapped."""
    originals = [layer.processor for layer in tiny_model.self_attention_layers()]
    with pytest.raises(UnsupportedError, match="needs cuda"), tiny_model.use_method(build_method(name)):
        pass
    assert [layer.processor for layer in tiny_model.self_attention_layers()] == originals


def test_unknown_method_parameter_is_a_user_error() -> None:
    """A parameter a method does not take is a HarnessError naming it."""
    with pytest.raises(HarnessError, match="bogus"):
        build_method("sdpa", bogus=1)


def test_fa2_rejects_bad_impl() -> None:
    """fa2's impl parameter only takes auto/torch/package."""
    with pytest.raises(HarnessError, match="impl must be one of"):
        build_method("fa2", impl="triton")


class ZeroMethod(AttentionMethod):
    """Returns zeros with density 0.25: anything non-zero in its output came from dense attention."""

    name: ClassVar[str] = "zeros-for-test"

    def attend(self, q, k, v, ctx):  # type: ignore[no-untyped-def]
        return torch.zeros_like(q), 0.25


def test_schedule_runs_dense_on_warmup_steps_and_dense_layers() -> None:
    """With dense_warmup_steps=1 and dense_layers=(1,), only step 0 and layer 1 run dense attention."""
    method = ZeroMethod(schedule=Schedule(dense_warmup_steps=1, dense_layers=(1,)))
    q, k, v = (torch.randn(SHAPE) for _ in range(3))
    ref = reference_attention(q, k, v).float()
    for step in range(3):
        for layer in range(2):
            out = method(q, k, v, ctx(layer=layer, step=step))
            if step == 0 or layer == 1:
                torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            else:
                assert torch.count_nonzero(out) == 0, (layer, step)


def test_schedule_density_is_measured_per_layer_and_step() -> None:
    """The density log records 1.0 where the schedule ran dense and the method's 0.25 elsewhere."""
    method = ZeroMethod(schedule=Schedule(dense_warmup_steps=1, dense_layers=(1,)))
    q, k, v = (torch.randn(1, 1, 4, 8) for _ in range(3))
    for step in range(3):
        for layer in range(2):
            method(q, k, v, ctx(layer=layer, step=step))
    summary = method.density.summary()
    assert summary["per_layer"] == pytest.approx({0: (1.0 + 0.25 + 0.25) / 3, 1: 1.0})
    assert summary["per_step"] == pytest.approx({0: 1.0, 1: (0.25 + 1.0) / 2, 2: (0.25 + 1.0) / 2})
    assert summary["mean"] == pytest.approx((4 * 1.0 + 2 * 0.25) / 6)


def test_tensor_densities_are_read_when_the_log_is_read_not_at_each_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """A density given as a tensor (a device tensor in a sparse method's plan) is not read back at the call, which
    on CUDA would wait for the GPU at every call; reading the log gives the same sums as reading each call's value,
    floats and tensors of two dtypes mixed."""
    log = DensityLog()
    given = [(0, 0, torch.tensor(0.25)), (1, 0, 1.0), (0, 1, torch.tensor(0.5, dtype=torch.float64)),
             (0, 1, torch.tensor(0.125)), (1, 1, 0.75)]  # fmt: skip

    def refuse(*args: object) -> None:
        raise AssertionError("a density was read back during a call")

    with monkeypatch.context() as patch:
        for name in ("__float__", "item", "tolist"):
            patch.setattr(torch.Tensor, name, refuse)
        for layer, step, density in given:
            log.add(ctx(layer=layer, step=step), density)
    assert log.entries() == [(0, 0, 0.25, 1), (0, 1, 0.625, 2), (1, 0, 1.0, 1), (1, 1, 0.75, 1)]
    assert log.mean() == pytest.approx((0.25 + 1.0 + 0.5 + 0.125 + 0.75) / 5)
    assert log.per_layer() == pytest.approx({0: 0.875 / 3, 1: 1.75 / 2})


def test_a_density_of_several_numbers_is_refused_at_the_call() -> None:
    """A tensor density must hold one number: refused when logged, so the log stays readable."""
    log = DensityLog()
    with pytest.raises(ValueError, match="one number"):
        log.add(ctx(), torch.tensor([0.25, 0.5]))
    log.add(ctx(), torch.tensor([0.25]))
    assert log.mean() == 0.25


def test_method_without_schedule_never_runs_dense() -> None:
    """The default schedule leaves every call to the method."""
    method = ZeroMethod()
    q, k, v = (torch.randn(1, 1, 4, 8) for _ in range(3))
    assert torch.count_nonzero(method(q, k, v, ctx(layer=1, step=0))) == 0
    assert method.density.mean() == 0.25


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        (Schedule(dense_layers=(2,)), "do not exist"),
        (Schedule(dense_layers=(0, 5)), r"\[5\] do not exist"),
        (Schedule(dense_warmup_steps=4), "exceed the number of steps"),
    ],
)
def test_schedule_validate_for_rejects_impossible_schedules(schedule: Schedule, message: str) -> None:
    """Dense layers >= num_layers and warm-up steps > steps are rejected for a 2-layer, 3-step model."""
    with pytest.raises(HarnessError, match=message):
        schedule.validate_for(num_layers=2, num_steps=3)


@pytest.mark.parametrize("schedule", [Schedule(dense_layers=(0, 1)), Schedule(dense_warmup_steps=3), Schedule()])
def test_schedule_validate_for_accepts_boundaries(schedule: Schedule) -> None:
    """The last layer and warm-up over every step are valid."""
    schedule.validate_for(num_layers=2, num_steps=3)


@pytest.mark.parametrize("kwargs", [{"dense_warmup_steps": -1}, {"dense_layers": (-1,)}])
def test_schedule_rejects_negative_values(kwargs: dict) -> None:
    """Negative warm-up steps or layer indices are a HarnessError at construction."""
    with pytest.raises(HarnessError, match=">= 0"):
        Schedule(**kwargs)


class StatefulMethod(AttentionMethod):
    """A method with one per-layer tensor of state."""

    name: ClassVar[str] = "stateful-for-test"

    def __init__(self, schedule: Schedule | None = None, **params) -> None:  # type: ignore[no-untyped-def]
        super().__init__(schedule, **params)
        self.maps = {"layer0.feature_map": torch.zeros(4, 8), "layer1.feature_map": torch.zeros(4, 8)}

    def attend(self, q, k, v, ctx):  # type: ignore[no-untyped-def]
        return torch.zeros_like(q), 0.0

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return self.maps

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if set(tensors) != set(self.maps):
            raise HarnessError(f"unexpected state keys {sorted(tensors)}")
        self.maps = dict(tensors)


class OtherStatefulMethod(StatefulMethod):
    name: ClassVar[str] = "other-stateful-for-test"


def test_method_state_round_trip(tmp_path) -> None:
    """save_state then load_state into a fresh instance restores the tensors exactly."""
    saved = StatefulMethod()
    saved.maps = {key: torch.randn(4, 8) for key in saved.maps}
    path = tmp_path / "state.safetensors"
    saved.save_state(path)
    loaded = StatefulMethod()
    loaded.load_state(path)
    assert set(loaded.maps) == set(saved.maps)
    for key, tensor in saved.maps.items():
        assert torch.equal(loaded.maps[key], tensor)
    assert [p.name for p in tmp_path.iterdir()] == ["state.safetensors"]


def test_method_state_of_another_method_is_rejected(tmp_path) -> None:
    """A state file written by another method is refused, naming both methods."""
    path = tmp_path / "state.safetensors"
    OtherStatefulMethod().save_state(path)
    with pytest.raises(HarnessError, match="belongs to method 'other-stateful-for-test'"):
        StatefulMethod().load_state(path)


def test_stateless_method_rejects_state_with_tensors(tmp_path) -> None:
    """A method without state refuses a state file holding tensors."""
    path = tmp_path / "state.safetensors"
    StatefulMethod().save_state(path)
    ZeroMethod.name = "stateful-for-test"  # same name, so only the tensor check can refuse it
    try:
        with pytest.raises(HarnessError, match="has no state"):
            ZeroMethod().load_state(path)
    finally:
        ZeroMethod.name = "zeros-for-test"


@pytest.mark.parametrize("content", ["random", "empty", "truncated", "missing"])
def test_corrupt_method_state_raises_harness_error(tmp_path, content: str) -> None:
    """Random bytes, an empty file, a truncated file or no file at all raise HarnessError."""
    path = tmp_path / "state.safetensors"
    if content == "random":
        path.write_bytes(os.urandom(4096))
    elif content == "empty":
        path.write_bytes(b"")
    elif content == "truncated":
        StatefulMethod().save_state(path)
        path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(HarnessError, match="cannot read method state"):
        StatefulMethod().load_state(path)
