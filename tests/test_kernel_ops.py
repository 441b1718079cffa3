"""The Triton kernels' ops launch on their inputs' GPU, whichever device is current (a training dealt onto a
host's second GPU by `bench ablate --jobs` failed in the linear attention kernel: "Pointer argument (at 0) cannot
be accessed from Triton (cpu tensor?)"). The CPU tests hold the mechanism; the two-GPU test runs the kernels."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import Invoke, normalise
from torch import Tensor
from torch._library.custom_ops import CustomOpDef
from torch._subclasses.fake_tensor import FakeTensorMode

from methods.kernels import (
    kernel_op,
    kmeans_triton,
    linear_attention_triton,
    on_input_device,
    permute_triton,
    popularity_triton,
    ranked_selection_triton,
    sla_linear_triton,
    xattn_scoring_triton,
)

KERNEL_MODULES = (linear_attention_triton, kmeans_triton, xattn_scoring_triton, ranked_selection_triton,
                  sla_linear_triton, permute_triton, popularity_triton)  # fmt: skip


def _ops(module: ModuleType) -> list[CustomOpDef]:
    return [value for value in vars(module).values() if isinstance(value, CustomOpDef)]


@pytest.mark.parametrize("module", KERNEL_MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_every_kernel_op_launches_on_its_inputs_device(module: ModuleType) -> None:
    ops = _ops(module)
    assert ops, f"{module.__name__} registers no op"
    for op in ops:
        assert getattr(op._init_fn, "launches_on_input_device", False), op._name


def test_the_direct_eager_linear_forward_launches_on_its_inputs_device() -> None:
    """fused_linear_attention calls the forward's implementation without its op on plain no-grad eager calls."""
    assert linear_attention_triton._forward.launches_on_input_device


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                    reason="a fake cuda:1 tensor asks the driver for a second GPU (run_b134675)")  # fmt: skip
def test_a_cuda_input_makes_its_device_current_for_the_call(monkeypatch: pytest.MonkeyPatch) -> None:
    entered: list[str] = []

    @contextmanager
    def device(target: torch.device) -> Iterator[None]:
        entered.append(f"enter {target}")
        yield
        entered.append(f"exit {target}")

    monkeypatch.setattr(torch.cuda, "device", device)
    launch = on_input_device(lambda scale, x: entered.append(f"launch {x.device}"))
    with FakeTensorMode():
        launch(2.0, torch.empty(3, device="cuda:1"))
    assert entered == ["enter cuda:1", "launch cuda:1", "exit cuda:1"]


def test_cpu_inputs_leave_the_current_device_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def device(target: torch.device) -> None:
        raise AssertionError(f"no device should be entered, got {target}")

    monkeypatch.setattr(torch.cuda, "device", device)
    assert on_input_device(lambda x: x + 1)(torch.zeros(2)).tolist() == [1.0, 1.0]


def test_wrapping_twice_wraps_once() -> None:
    once = on_input_device(lambda x: x)
    assert on_input_device(once) is once


def test_a_kernel_op_keeps_its_schema_and_runs() -> None:
    """The schema comes from the function's own annotations (strings, resolved in its own module: ``Tensor`` is
    a name of this one, not of the module that wraps it)."""

    def scaled(x: Tensor, factor: float, mode: str = "fast") -> Tensor:
        return x * factor

    op = kernel_op("test_kernel_ops_scaled")(scaled)
    assert str(op._opoverload._schema) == (
        'attention_bench::test_kernel_ops_scaled(Tensor x, float factor, str mode="fast") -> Tensor'
    )
    assert op(torch.ones(2), 3.0).tolist() == [3.0, 3.0]


def test_a_kernel_variable_set_to_a_value_it_does_not_take_is_refused_before_the_run(
    bench: Invoke, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A typo in BENCH_KMEANS_UPDATE stops any run at its preflight, naming the variable and its values (it was
    refused only at svg2's first k-means call, after the model loaded)."""
    monkeypatch.setenv(kmeans_triton.VARIANT_ENV, "sortd")
    result = bench("run", "--method", "sdpa", "--model", "toy", "--device", "cpu", "--runs-dir", tmp_path,
                   "--no-progress", expect=2)  # fmt: skip
    assert "BENCH_KMEANS_UPDATE must be one of onehot, sorted, got 'sortd'" in normalise(result.output)
    assert not list(tmp_path.iterdir())


TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2 and linear_attention_triton.triton is not None


@pytest.mark.skipif(not TWO_GPUS, reason="needs two CUDA GPUs and triton")
def test_kernels_run_on_a_gpu_that_is_not_current() -> None:
    """Each kernel on cuda:1 with cuda:0 current: the linear attention forward and backward, k-means (both update
    steps), xattn's scores, each against the same call made with cuda:1 current."""
    from methods.kernels.linear_attention import build_feature_map

    torch.manual_seed(0)
    second = torch.device("cuda:1")
    q, k, v = (torch.randn(1, 2, 256, 64, device=second, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    q_map, k_map = (build_feature_map("hedgehog", 2, 64, trainable=True).to(second) for _ in range(2))
    x = torch.randn(2, 512, 64, device=second, dtype=torch.bfloat16)

    def results() -> list[torch.Tensor]:
        out = linear_attention_triton.fused_linear_attention(q, k, v, q_map, k_map)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        clusters = [kmeans_triton.kmeans_lloyd(x, x[:, :16].float(), 3, update)[:2]
                    for update in kmeans_triton.VARIANTS]  # fmt: skip
        masses = xattn_scoring_triton.block_masses(q.detach(), k.detach(), 64, 8)
        return [out, *grads, *(t for pair in clusters for t in pair), masses]

    with torch.cuda.device(second):
        expected = results()
    torch.cuda.set_device(0)
    for got, want in zip(results(), expected, strict=True):
        assert got.device == second
        torch.testing.assert_close(got, want)


def test_methods_name_the_kernel_variables_their_calls_read() -> None:
    """What a finished run is checked against (bench run refuses one made with other values of these): xattn its
    scoring's and the ranked selection's, svg its permutation's, svg2 its k-means', the ranked selection's, the
    permutation's and the popularity order's, the linear methods the fused
    kernel's, SLA its linear branch's, LinVideo its own and its softmax method's; every one a declared kernel
    choice."""
    from methods import METHODS, build_method
    from methods.kernels import kernel_settings

    assert build_method("xattn").kernel_variables_used == (xattn_scoring_triton.BACKEND_ENV,
                                                           xattn_scoring_triton.VARIANT_ENV,
                                                           ranked_selection_triton.BACKEND_ENV)  # fmt: skip
    mixed = build_method("linvideo", softmax_method="svg2")
    assert mixed.kernel_variables_used == (linear_attention_triton.BACKEND_ENV, kmeans_triton.BACKEND_ENV,
                                           kmeans_triton.VARIANT_ENV, ranked_selection_triton.BACKEND_ENV,
                                           permute_triton.BACKEND_ENV, popularity_triton.BACKEND_ENV)  # fmt: skip
    assert build_method("svg").kernel_variables_used == (permute_triton.BACKEND_ENV,)
    assert build_method("sla").kernel_variables_used == (sla_linear_triton.BACKEND_ENV,)
    assert build_method("sdpa").kernel_variables_used == ()
    declared = set(kernel_settings())
    assert all(set(METHODS.get(name).kernel_variables) <= declared for name in METHODS.names())
