"""The block-sparse backend registry and the choice of the fastest backend that reproduces masked dense."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator

import pytest
import torch

from harness.errors import HarnessError, UnsupportedError
from methods.kernels import sparse_backends
from methods.kernels.block_sparse import BlockSparsePattern, masked_dense_attention, num_blocks
from methods.kernels.sparse_backends import (
    REGISTRY,
    BackendLog,
    check_backend,
    choose_backend,
    get_backend,
    measured_backend,
    register_backend,
)

N, BLOCK = 256, 32


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, BlockSparsePattern]:
    q, k, v = (torch.randn(1, 2, N, 16) for _ in range(3))
    kept = torch.rand(1, 2, num_blocks(N, BLOCK), num_blocks(N, BLOCK)) < 0.4
    kept[..., 0] = True
    return q, k, v, BlockSparsePattern(kept, N, BLOCK)


@pytest.fixture
def fakes() -> Iterator[None]:
    """Three fake backends: a wrong one and two correct ones (masked dense under other names)."""

    @register_backend("fake-wrong")
    def wrong(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern) -> torch.Tensor:
        return masked_dense_attention(q, k, v, pattern) + 0.1

    for name in ("fake-slow", "fake-fast"):  # distinct functions, so the fake timer can tell them apart
        register_backend(name)(lambda q, k, v, pattern: masked_dense_attention(q, k, v, pattern))
    yield
    for name in ("fake-wrong", "fake-slow", "fake-fast"):
        REGISTRY.pop(name)


def fake_timer(seconds: dict[str, float]) -> sparse_backends.Timer:
    """A timer that reads each backend's time from ``seconds`` by the function it is handed."""

    def timer(fn, device):
        name = next(n for n, b in REGISTRY.items() if b.run is fn.func and n in seconds)
        return seconds[name]

    return timer


def test_unknown_backend_is_refused_with_the_known_names() -> None:
    """get_backend, choose_backend and a method's BackendLog all name the choices."""
    with pytest.raises(HarnessError, match=r"must be one of .*'flex-tuned'.*got 'triton'"):
        get_backend("triton")
    q, k, v, pattern = inputs()
    with pytest.raises(HarnessError, match="triton"):
        choose_backend(q, k, v, pattern, ("masked", "triton"))
    with pytest.raises(HarnessError, match="triton"):
        BackendLog("triton", "xattn")


def test_a_wrong_backend_is_never_chosen_even_when_fastest(fakes: None) -> None:
    """The broken fake is timed fastest but its output differs from masked dense: it is reported, not chosen."""
    q, k, v, pattern = inputs()
    timer = fake_timer({"fake-wrong": 1e-6, "fake-slow": 2e-3})
    choice = choose_backend(q, k, v, pattern, ("fake-wrong", "fake-slow"), timer=timer)
    assert choice.name == "fake-slow"
    assert "differs" in choice.report["fake-wrong"]["skipped"]
    assert choice.report["fake-wrong"]["error"] > 1e-2


def test_a_nan_output_is_skipped_without_a_nan_in_the_report(fakes: None) -> None:
    """Records are strict JSON: a backend returning NaN is reported as not finite, with no error number."""
    register_backend("fake-nan")(lambda q, k, v, pattern: torch.full_like(q, float("nan")))
    try:
        q, k, v, pattern = inputs()
        choice = choose_backend(q, k, v, pattern, ("fake-nan", "fake-slow"), timer=lambda fn, device: 1.0)
    finally:
        REGISTRY.pop("fake-nan")
    assert choice.name == "fake-slow" and choice.report["fake-nan"] == {"skipped": "output not finite"}


def test_the_fastest_correct_backend_is_chosen(fakes: None) -> None:
    """With a fake timer the faster of two correct backends wins; the report carries both times in ms."""
    q, k, v, pattern = inputs()
    timer = fake_timer({"fake-slow": 2e-3, "fake-fast": 1e-3})
    choice = choose_backend(q, k, v, pattern, ("fake-slow", "fake-fast"), timer=timer)
    assert choice.name == "fake-fast"
    assert choice.report["fake-fast"]["ms"] == pytest.approx(1.0)
    assert choice.report["fake-slow"]["error"] <= 1e-6


def test_the_measured_choice_is_cached_per_label_and_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """A second call with the same label, shape, dtype and blocks does not measure again; a new label does."""
    calls: list[str] = []

    def counting(q, k, v, pattern):
        calls.append("measured")
        return sparse_backends.BackendChoice("masked", {"masked": {"error": 0.0, "ms": 1.0}})

    monkeypatch.setattr(sparse_backends, "choose_backend", counting)
    monkeypatch.setattr(sparse_backends, "_CHOICES", {})
    q, k, v, pattern = inputs()
    measured_backend(q, k, v, pattern, "svg")
    measured_backend(q, k, v, pattern, "svg")
    assert len(calls) == 1
    measured_backend(q, k, v, pattern, "xattn")
    assert len(calls) == 2


@pytest.fixture
def flashinfer_importable(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``import flashinfer`` succeeds (an empty module), so only the device and pattern decide."""
    monkeypatch.setitem(sys.modules, "flashinfer", types.ModuleType("flashinfer"))
    sparse_backends.import_failure.cache_clear()
    yield
    sparse_backends.import_failure.cache_clear()


def test_flashinfer_is_reported_unavailable_not_an_error(flashinfer_importable: None) -> None:
    """On a CPU machine flashinfer is skipped with the reason, and another backend chosen."""
    q, k, v, pattern = inputs()
    choice = choose_backend(q, k, v, pattern, ("masked", "flashinfer"), timer=lambda fn, device: 1.0)
    assert choice.name == "masked"
    assert choice.report["flashinfer"] == {"skipped": "runs on cuda, not cpu"}


def test_flashinfer_refuses_token_level_patterns_without_variable_blocks() -> None:
    """Partial tiles need a mask_mod FlashInfer's wrappers cannot apply: the registry says so."""
    *_, pattern = inputs()
    band = BlockSparsePattern(pattern.kept, N, BLOCK, full=torch.zeros_like(pattern.kept),
                              mask_mod=lambda b, h, qi, ki: (qi - ki).abs() < 9)  # fmt: skip
    refuses = get_backend("flashinfer").refuses
    assert refuses is not None and "token-level" in (refuses(band) or "")
    assert refuses(pattern) is None


def test_flex_tuned_matches_masked_dense_on_cpu() -> None:
    """flex-tuned (compiled Flex with the Hopper kernel options) reproduces masked dense where Flex compiles."""
    q, k, v, pattern = inputs()
    try:
        out = get_backend("flex-tuned").run(q, k, v, pattern)
    except Exception as exc:
        pytest.skip(f"compiled flex with kernel options does not run on this CPU torch: {exc}")
    ref = masked_dense_attention(q, k, v, pattern)
    assert float((out - ref).norm() / ref.norm()) <= 1e-5


def test_measure_records_the_chosen_backend_and_report() -> None:
    """A method's BackendLog on ``measure`` runs the chosen backend and names it (and the report) in params()."""
    q, k, v, pattern = inputs()
    log = BackendLog("measure", "test-log")
    out = log.attention(q, k, v, pattern)
    ref = masked_dense_attention(q, k, v, pattern)
    assert float((out - ref).norm() / ref.norm()) <= 1e-4
    params = log.params()
    chosen = params["backend_used"][str(N)]
    assert chosen in REGISTRY and "ms" in params["backend_report"][str(N)][chosen]
    assert "skipped" in params["backend_report"][str(N)]["flashinfer"]
    assert BackendLog("auto", "x").params() == {"backend_used": {}}


def test_svg2_variable_blocks_hold_the_same_token_mask() -> None:
    """svg2's clusters as variable blocks (what FlashInfer runs) keep exactly the tiles' token mask."""
    from methods.svg2 import cluster_pair_pattern

    tokens, sizes = 96, torch.tensor([[[30, 0, 50, 16], [10, 20, 30, 36]]])  # an empty cluster included
    labels = torch.stack([torch.arange(4).repeat_interleave(sizes[0, h]) for h in range(2)])[None]
    keep = torch.rand(1, 2, 4, 4) < 0.5
    keep[..., 0] = True
    pattern = cluster_pair_pattern(keep, sizes, sizes, labels, labels, block=16)
    assert pattern.variable is not None
    assert torch.equal(pattern.variable.dense_mask(), pattern.dense_mask())
    assert pattern.variable.dense_mask().shape == (1, 2, tokens, tokens)


def test_a_named_backend_that_cannot_run_is_a_clear_error(flashinfer_importable: None) -> None:
    """backend=flashinfer on the CPU says why instead of failing inside the kernel."""
    q, k, v, pattern = inputs()
    with pytest.raises(HarnessError, match=r"'flashinfer' cannot run this call: runs on cuda"):
        sparse_backends.block_sparse_attention(q, k, v, pattern, "flashinfer")


@pytest.mark.parametrize(("device", "dtype", "reasons"), [
    ("cpu", torch.float32, ["runs on cuda, not cpu", "takes float16/bfloat16, not float32"]),
    ("cuda", torch.float32, ["takes float16/bfloat16, not float32"]),
])  # fmt: skip
@pytest.mark.parametrize("name", ["flashinfer", "flashinfer-bsr"])
def test_a_backend_that_cannot_run_on_the_device_is_refused_before_any_call(
    flashinfer_importable: None, name: str, device: str, dtype: torch.dtype, reasons: list[str]
) -> None:
    """The preflight's check names every reason and the backends that can run there (no tensor needed)."""
    with pytest.raises(UnsupportedError) as info:
        check_backend(name, torch.device(device), dtype, "radial")
    message = str(info.value)
    assert message.startswith(f"radial: block-sparse backend {name!r} cannot run on {device} in float32: ")
    assert all(reason in message for reason in reasons) and message.endswith("Here use auto, measure, masked, flex, "
                                                                             "flex-tuned")  # fmt: skip


def test_a_missing_package_is_refused_on_the_device_the_backend_runs_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # import raises ImportError
    sparse_backends.import_failure.cache_clear()
    try:
        with pytest.raises(UnsupportedError, match=r"cannot run on cuda in bfloat16: package 'flashinfer' cannot be "
                                                   r"imported \(pip install flashinfer-python\)"):  # fmt: skip
            check_backend("flashinfer-bsr", torch.device("cuda"), torch.bfloat16, "svg")
    finally:
        sparse_backends.import_failure.cache_clear()


def test_the_backend_help_says_what_auto_runs_and_what_each_backend_needs() -> None:
    from methods.sparse import BACKEND

    assert BACKEND.help.startswith(
        "auto (flex-tuned on Hopper, sm_90, in fp16/bf16 up to head dim 128; flex on other "
        "CUDA calls; masked elsewhere)"
    )
    assert BACKEND.help.endswith("or one of masked, flex, flex-tuned, flashinfer (cuda; float16/bfloat16; pip "
                                 "install flashinfer-python), flashinfer-bsr (cuda; float16/bfloat16; pip install "
                                 "flashinfer-python)")  # fmt: skip


@pytest.mark.parametrize("name", ["auto", "measure", "masked", "flex", "flex-tuned"])
def test_a_backend_that_runs_anywhere_passes_the_check(name: str) -> None:
    check_backend(name, torch.device("cpu"), torch.float32, "radial")


def test_the_reference_on_sampled_rows_is_masked_dense_on_those_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past REFERENCE_ROWS the check compares evenly spaced rows, first and last included, against the same
    rows of masked dense."""
    monkeypatch.setattr(sparse_backends, "REFERENCE_ROWS", 10)
    q, k, v, pattern = inputs()
    rows = sparse_backends.reference_rows(N, q.device)
    assert len(rows) == 10 and rows[0] == 0 and rows[-1] == N - 1
    assert torch.equal(pattern.dense_mask(rows), pattern.dense_mask()[..., rows, :])
    full = masked_dense_attention(q, k, v, pattern)[..., rows, :]
    assert torch.allclose(sparse_backends.masked_reference(q, k, v, pattern, rows), full, atol=1e-6)


def test_masked_past_its_size_is_skipped_and_another_backend_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    """At Wan scale the masked backend cannot run (N x N mask): it is reported skipped, flex is checked on rows."""
    monkeypatch.setattr(sparse_backends, "MASKED_MAX_ENTRIES", 1000)
    q, k, v, pattern = inputs()
    choice = choose_backend(q, k, v, pattern, ("masked", "flex"), timer=lambda fn, device: 1.0)
    assert choice.name == "flex"
    assert "N x N" in choice.report["masked"]["skipped"]
