"""The block-sparse backend registry and the choice of the fastest backend that reproduces masked dense."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch

from harness.errors import HarnessError, UnsupportedError
from methods import build_method
from methods.kernels import sparse_backends
from methods.kernels.block_sparse import (
    FLEX_TILE,
    KIND_DESCRIPTIONS,
    PATTERN_KINDS,
    BlockSparsePattern,
    flex_tile,
    masked_dense_attention,
    num_blocks,
    rectangle_counts,
)
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
    flashinfer = get_backend("flashinfer")
    assert (flashinfer.refusal(band) or "").startswith("token-level pattern (partial tiles): FlashInfer's wrappers")
    assert flashinfer.refusal(pattern) is None


def test_flex_tuned_matches_masked_dense_on_cpu() -> None:
    """flex-tuned (compiled Flex with the Hopper kernel options) reproduces masked dense where Flex compiles."""
    q, k, v, pattern = inputs()
    try:
        out = get_backend("flex-tuned").run(q, k, v, pattern)
    except Exception as exc:
        pytest.skip(f"compiled flex with kernel options does not run on this CPU torch: {exc}")
    ref = masked_dense_attention(q, k, v, pattern)
    assert float((out - ref).norm() / ref.norm()) <= 1e-5


@pytest.mark.parametrize(("block", "training", "small"), [(64, False, True), (64, True, False), (128, False, False),
                                                        (192, False, True), (32, False, False)])  # fmt: skip
def test_flex_tuned_runs_64_token_blocks_on_64_token_tiles(block: int, training: bool, small: bool) -> None:
    """Blocks that are multiples of 64 but not of 128 (SLA's 64) take 64 x 64 tiles, unregrouped, in a call without
    gradients; 128-multiples, smaller blocks and calls that train keep the Hopper tiles (Flex's backward takes 128)."""
    pattern = BlockSparsePattern(torch.ones(1, 1, 2, 2, dtype=torch.bool), 2 * block, block)
    options = sparse_backends.tuned_flex_options(pattern, training)
    assert options is (sparse_backends.SMALL_TILE_FLEX_OPTIONS if small else sparse_backends.HOPPER_FLEX_OPTIONS)
    assert flex_tile(options) == (64 if small else FLEX_TILE)
    assert flex_tile(None) == FLEX_TILE


def test_a_64_token_block_pattern_on_64_token_tiles_matches_masked_dense() -> None:
    """flex-tuned on a 64-block pattern: its BlockMask for 64 x 64 kernel tiles keeps the pattern's blocks (no
    regrouping), and compiled Flex on it reproduces masked dense."""
    kept = torch.rand(1, 2, 5, 5, generator=torch.Generator().manual_seed(0)) < 0.4
    kept[..., 0] = True
    pattern = BlockSparsePattern(kept, 300, 64)  # a ragged last block of 44 tokens
    q, k, v = (torch.randn(1, 2, 300, 16) for _ in range(3))
    try:
        out = get_backend("flex-tuned").run(q, k, v, pattern)
    except Exception as exc:
        pytest.skip(f"compiled flex with kernel options does not run on this CPU torch: {exc}")
    ran = pattern._flex_masks[((1, 2), False, 64)]  # the mask the call built and kept: 64-token tiles, no regrouping
    assert ran.BLOCK_SIZE == (64, 64) and pattern.flex_block_mask((1, 2), tile=64) is ran
    assert float((out - masked_dense_attention(q, k, v, pattern)).norm()) <= 1e-5 * float(out.norm())


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
    keep = torch.rand(1, 2, 4, 4) < 0.5
    keep[..., 0] = True
    pattern = cluster_pair_pattern(keep, sizes, sizes, tokens, block=16)
    assert pattern.variable is not None
    assert torch.equal(pattern.variable.dense_mask(), pattern.dense_mask())
    assert pattern.variable.dense_mask().shape == (1, 2, tokens, tokens)


def test_a_backend_reading_only_variable_blocks_builds_no_tile_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """svg2's clusters through a method's BackendLog on a backend that reads only the variable blocks (as
    triton-variable does; here SDPA under their mask): the checks on the way (the pattern's fit, the backend's
    availability and kinds) build none of the deferred tile tables, and the output is masked dense's."""
    from methods import svg2

    builds: list[int] = []
    monkeypatch.setattr(svg2, "rectangle_counts", lambda *args: builds.append(1) or rectangle_counts(*args))

    def variable_only(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern) -> torch.Tensor:
        assert pattern.variable is not None
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=pattern.variable.dense_mask())

    refused = {kind: "variable blocks only" for kind in ("tiles", "token-level")}
    monkeypatch.setitem(REGISTRY, "variable-only", sparse_backends.Backend("variable-only", variable_only, ("cpu",),
                                                                          sparse_backends.ALL_DTYPES,
                                                                          refused_kinds=refused))  # fmt: skip
    sizes = torch.tensor([[[100, 0, 156], [56, 100, 100]]])
    keep = torch.rand(1, 2, 3, 3) < 0.5
    keep[..., 0] = True
    q, k, v, _ = inputs()
    clusters = svg2.cluster_pair_pattern(keep, sizes, sizes, N, BLOCK)
    out = BackendLog("variable-only", "svg2").attention(q, k, v, clusters)
    assert not builds
    expected = masked_dense_attention(q, k, v, svg2.cluster_pair_pattern(keep, sizes, sizes, N, BLOCK))
    assert builds == [1, 1]  # masked dense reads the tables: kept and full, once
    torch.testing.assert_close(out, expected)


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
        check_backend(name, torch.device(device), dtype, "radial", {"tiles"})
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
            check_backend("flashinfer-bsr", torch.device("cuda"), torch.bfloat16, "xattn", {"tiles"})
    finally:
        sparse_backends.import_failure.cache_clear()


def test_the_backend_help_says_what_auto_runs_and_what_each_backend_needs() -> None:
    from methods.sparse import BACKEND

    assert BACKEND.help.startswith(
        "auto (flex-tuned on Hopper, sm_90, in fp16/bf16 up to head dim 128, or there, without gradients, "
        "triton-variable on variable blocks, eager with flashinfer-python's kernels prebuilt flashinfer-bsr on a "
        "tile table shared by every head and flashinfer-split on a token-level one (svg's band), and triton-blocks "
        "on other block-level patterns; flex on other CUDA calls; masked elsewhere, flex past its size)"
    )
    assert BACKEND.help.endswith("or one of masked, flex, flex-tuned, flashinfer (cuda; float16/bfloat16; pip "
                                 "install flashinfer-python), flashinfer-bsr (cuda; float16/bfloat16; pip install "
                                 "flashinfer-python), flashinfer-split (cuda; float16/bfloat16; pip install "
                                 "flashinfer-python), triton-variable (cuda; float16/bfloat16; pip install "
                                 "triton), triton-blocks (cuda; float16/bfloat16; pip install triton)")  # fmt: skip


@pytest.mark.parametrize("name", ["auto", "measure", "masked", "flex", "flex-tuned"])
def test_a_backend_that_runs_anywhere_passes_the_check(name: str) -> None:
    check_backend(name, torch.device("cpu"), torch.float32, "radial", {"tiles"})


# -- pattern kinds: a backend refusing every kind a method makes is refused before the run -------------------------


def kind_patterns() -> dict[str, BlockSparsePattern]:
    """One pattern of each kind: whole tiles, a band cutting tiles (token level), svg2's clusters (variable)."""
    from methods.svg2 import cluster_pair_pattern

    *_, tiles = inputs()
    band = BlockSparsePattern(tiles.kept, N, BLOCK, full=torch.zeros_like(tiles.kept),
                              mask_mod=lambda b, h, qi, ki: (qi - ki).abs() < 9)  # fmt: skip
    sizes = torch.tensor([[[100, 0, 156], [56, 100, 100]]])
    clusters = cluster_pair_pattern(torch.ones(1, 2, 3, 3, dtype=torch.bool), sizes, sizes, N, BLOCK)
    return {"tiles": tiles, "token-level": band, "variable": clusters}


@pytest.mark.parametrize("kind", PATTERN_KINDS)
def test_a_pattern_knows_its_kind(kind: str) -> None:
    """Variable blocks make a variable pattern although they come with a mask_mod; a mask_mod alone token-level."""
    assert kind_patterns()[kind].kind == kind


@pytest.mark.parametrize(("backend", "kind"), [
    ("flashinfer", "token-level"), ("flashinfer-bsr", "token-level"), ("flashinfer-bsr", "variable"),
    ("flashinfer-split", "tiles"), ("flashinfer-split", "variable"),
])  # fmt: skip
def test_a_kind_a_backend_refuses_is_refused_by_its_kind_first(backend: str, kind: str) -> None:
    """The call's refusal of a pattern names its kind, with the reason the preflight gives for that kind."""
    refused = get_backend(backend)
    reason = refused.kind_refusal(kind)  # type: ignore[arg-type]
    assert reason is not None and reason.startswith(KIND_DESCRIPTIONS[kind])  # type: ignore[index]
    assert refused.refusal(kind_patterns()[kind]) == reason


def method_class(name: str) -> type:
    from methods import METHODS

    return METHODS.get(name)


@pytest.fixture(params=[False, True], ids=["without-triton", "with-triton"])
def triton_importable(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[bool]:
    """``import triton`` fails (``False``) or succeeds (``True``, an empty module where Triton is not installed), so
    that the backends a message lists do not depend on the machine running the test."""
    if request.param:
        if sparse_backends.import_failure("triton") is not None:
            monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))
    else:
        monkeypatch.setitem(sys.modules, "triton", None)
    sparse_backends.import_failure.cache_clear()
    yield request.param
    sparse_backends.import_failure.cache_clear()


@pytest.mark.parametrize(("method", "backend", "kind", "usable", "usable_on_triton"), [
    ("svg", "flashinfer-bsr", "token-level", "masked, flex, flex-tuned, flashinfer-split", ""),
    ("svg", "flashinfer", "token-level", "masked, flex, flex-tuned, flashinfer-split", ""),
    ("radial", "flashinfer-split", "tiles", "masked, flex, flex-tuned, flashinfer, flashinfer-bsr", ", triton-blocks"),
    ("svg2", "flashinfer-bsr", "variable", "masked, flex, flex-tuned, flashinfer", ", triton-variable"),
])  # fmt: skip
def test_a_backend_refusing_the_methods_pattern_kind_is_refused_at_preflight(
    flashinfer_importable: None,
    triton_importable: bool,
    method: str,
    backend: str,
    kind: str,
    usable: str,
    usable_on_triton: str,
) -> None:
    """Where the backend could run (CUDA, bf16, its package importable) the method's pattern kind alone refuses it,
    before a model is built: the message names the method, the kind, why, and the backends that run the method (the
    Triton ones where Triton imports)."""
    built = build_method(method, backend=backend)
    with pytest.raises(UnsupportedError) as info:
        built.check_supported(torch.device("cuda"), torch.bfloat16)
    message = str(info.value)
    reason = get_backend(backend).kind_refusal(kind)  # type: ignore[arg-type]
    listed = usable + (usable_on_triton if triton_importable else "")
    assert message == (f"{method}: block-sparse backend {backend!r} cannot run {method}'s {kind} patterns: {reason}. "
                       f"Here use auto, measure, {listed}")  # fmt: skip


@pytest.mark.parametrize(("method", "backend"), [
    ("radial", "flashinfer-bsr"), ("xattn", "flashinfer-bsr"), ("sla", "flashinfer-bsr"), ("radial", "flashinfer"),
    ("svg2", "flashinfer"), ("svg", "flex"), ("svg2", "flex-tuned"), ("svg", "flashinfer-split"),
])  # fmt: skip
def test_a_backend_taking_the_methods_pattern_kind_passes_the_preflight(flashinfer_importable: None, method: str,
                                                                        backend: str) -> None:  # fmt: skip
    build_method(method, backend=backend).check_supported(torch.device("cuda"), torch.bfloat16)


@pytest.mark.parametrize("method", ["radial", "xattn", "svg", "svg2", "sla"])
def test_every_method_with_a_backend_checks_it_at_preflight(flashinfer_importable: None, method: str) -> None:
    """sla, outside the block-sparse base, checked none: a CUDA-only backend on the CPU failed at its first call."""
    with pytest.raises(UnsupportedError, match=rf"^{method}: block-sparse backend 'flashinfer' cannot run.* on cpu in "
                                               r"float32: .*runs on cuda, not cpu"):  # fmt: skip
        build_method(method, backend="flashinfer").check_supported(torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("method", ["radial", "xattn", "svg", "svg2", "sla"])
def test_every_method_with_a_backend_declares_the_kinds_of_pattern_it_makes(method: str) -> None:
    """The declaration the preflight reads (that plans hold only these kinds: tests/test_sparse_methods.py)."""
    assert method_class(method).pattern_kinds and set(method_class(method).pattern_kinds) <= set(PATTERN_KINDS)


def test_the_registered_methods_with_a_backend_are_those_checked() -> None:
    """A new method taking ``backend=`` is added to the parametrisations above (and must declare its kinds)."""
    from methods import METHODS

    taking = {name for name in METHODS.names() if any(p.name == "backend" for p in method_class(name).parameters)}
    assert taking == {"radial", "xattn", "svg", "svg2", "sla"}


@pytest.mark.parametrize("kind", PATTERN_KINDS)
@pytest.mark.parametrize(("device", "major", "dtype"), [
    ("cpu", None, torch.float32), ("cuda", 9, torch.bfloat16), ("cuda", 9, torch.float32), ("cuda", 8, torch.float16),
])  # fmt: skip
def test_auto_never_picks_a_backend_refusing_a_kind(monkeypatch: pytest.MonkeyPatch, kind: str, device: str,
                                                    major: int | None, dtype: torch.dtype) -> None:  # fmt: skip
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda _device=None: (major, 0))
    sparse_backends.auto_backend.cache_clear()
    try:
        chosen = sparse_backends.auto_backend(torch.device(device), dtype, 128)
    finally:
        sparse_backends.auto_backend.cache_clear()
    assert get_backend(chosen).kind_refusal(kind) is None  # type: ignore[arg-type]


@pytest.fixture
def hopper_with_flashinfer(monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` as on an H200 with flashinfer-python installed, on CPU tensors: auto_backend says flex-tuned and the
    FlashInfer backends and triton-variable take any device, need no package and run masked dense (their kind and
    data conditions and their lack of a backward stay)."""
    monkeypatch.setattr(sparse_backends, "auto_backend", lambda device, dtype=None, head_dim=None: "flex-tuned")
    monkeypatch.setattr(sparse_backends, "flashinfer_prebuilt", lambda: True)
    for name in ("flashinfer", "flashinfer-bsr", "flashinfer-split", "triton-variable", "triton-blocks"):
        monkeypatch.setitem(REGISTRY, name, replace(REGISTRY[name], devices=("cpu", "cuda"), package=None,
                                                    dtypes=(torch.float32,), run=masked_dense_attention))  # fmt: skip


def head_shared_tiles() -> BlockSparsePattern:
    """Radial's kind of pattern: one tile table for every head."""
    *_, tiles = inputs()
    return BlockSparsePattern(tiles.kept[:, :1], N, BLOCK)


def head_shared_band() -> BlockSparsePattern:
    """svg's kind of pattern: one token-level band and sink for every head (after each head's layout transform)."""
    from methods.svg import band_with_sink_pattern

    return band_with_sink_pattern(N, 2 * BLOCK, BLOCK + 3, BLOCK, torch.device("cpu"))


@pytest.mark.parametrize(("pattern", "expected"), [
    ("head-shared tiles", "flashinfer-bsr"), ("tiles", "triton-blocks"), ("variable", "triton-variable"),
    ("token-level", "flex-tuned"), ("head-shared token-level", "flashinfer-split"),
])  # fmt: skip
def test_auto_takes_the_backend_that_was_faster_on_the_pattern(hopper_with_flashinfer: None, pattern: str,
                                                                  expected: str) -> None:  # fmt: skip
    """Measured on an H200 (auto_choice's and auto_flashinfer's sources): svg2's clusters on our Triton kernel,
    radial's head-shared table on BSR, svg's head-shared band split between BSR and Flex, and per-head tables
    (xattn's, SLA's) on triton-blocks were faster than flex-tuned; per-head token-level tables stay on Flex."""
    q = torch.randn(1, 2, N, 16)
    named = {"head-shared tiles": head_shared_tiles, "head-shared token-level": head_shared_band}
    chosen = named[pattern]() if pattern in named else kind_patterns()[pattern]
    assert sparse_backends.select_backend(q, q, q, chosen).name == expected


def test_auto_keeps_flex_where_bsr_refuses_the_tiles(hopper_with_flashinfer: None) -> None:
    """Unequal query and key blocks (the BSR wrapper's pages are square): flex-tuned, not an error at the call."""
    q = torch.randn(1, 2, N, 16)
    uneven = BlockSparsePattern(head_shared_tiles().kept[..., ::2], N, (BLOCK, 2 * BLOCK))
    assert sparse_backends.auto_choice(q, q, q, uneven) == "flex-tuned"


def test_auto_runs_tiles_on_triton_blocks_under_torch_compile(hopper_with_flashinfer: None,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A compiled graph cannot trace FlashInfer's plan and run (host code); triton-blocks is one opaque op."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    q = torch.randn(1, 2, N, 16)
    assert sparse_backends.auto_choice(q, q, q, head_shared_tiles()) == "triton-blocks"


@pytest.mark.parametrize("block", [8, 256])
def test_auto_keeps_flex_for_tiles_triton_blocks_does_not_take(hopper_with_flashinfer: None, block: int) -> None:
    q = torch.randn(1, 2, 512, 16)
    blocks = 512 // block
    pattern = BlockSparsePattern(torch.rand(1, 2, blocks, blocks) < 0.5, 512, block)
    assert get_backend("triton-blocks").refusal(pattern) == f"tiles of {block} tokens: it takes 16, 32, 64, 128"
    assert sparse_backends.auto_choice(q, q, q, pattern) == "flex-tuned"


def test_auto_stays_on_flex_where_the_call_needs_gradients(hopper_with_flashinfer: None) -> None:
    """FlashInfer computes no backward: training through the layer keeps Flex, so its gradients reach q, k, v."""
    q = torch.randn(1, 2, N, 16, requires_grad=True)
    k = torch.randn(1, 2, N, 16)
    assert sparse_backends.auto_choice(q, k, k, head_shared_tiles()) == "flex-tuned"
    with torch.no_grad():
        assert sparse_backends.auto_choice(q, k, k, head_shared_tiles()) == "flashinfer-bsr"


def test_a_forward_only_backend_named_for_a_call_needing_gradients_is_an_error(hopper_with_flashinfer: None) -> None:
    q = torch.randn(1, 2, N, 16, requires_grad=True)
    with pytest.raises(HarnessError, match=r"flashinfer-bsr.*computes no gradients"):
        sparse_backends.select_backend(q, q, q, head_shared_tiles(), "flashinfer-bsr")


def test_measure_skips_a_forward_only_backend_where_gradients_are_needed(hopper_with_flashinfer: None) -> None:
    q = torch.randn(1, 2, N, 16, requires_grad=True)
    choice = choose_backend(q, q, q, head_shared_tiles(), candidates=("masked", "flashinfer-bsr"))
    assert choice.name == "masked" and "computes no gradients" in choice.report["flashinfer-bsr"]["skipped"]


@pytest.mark.parametrize("missing", ["package", "prebuilt kernels"])
def test_auto_runs_triton_blocks_without_a_runnable_flashinfer(
    hopper_with_flashinfer: None, monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    """Not installed, or installed without prebuilt kernels (its first call would JIT-compile for minutes, or fail
    without nvcc): auto runs the tiles on triton-blocks instead."""
    if missing == "package":
        bsr = REGISTRY["flashinfer-bsr"]
        monkeypatch.setitem(REGISTRY, "flashinfer-bsr", replace(bsr, package="flashinfer"))
        monkeypatch.setitem(sys.modules, "flashinfer", None)  # import fails
        sparse_backends.import_failure.cache_clear()
    else:
        monkeypatch.setattr(sparse_backends, "flashinfer_prebuilt", lambda: False)
    q = torch.randn(1, 2, N, 16)
    try:
        assert sparse_backends.auto_choice(q, q, q, head_shared_tiles()) == "triton-blocks"
    finally:
        sparse_backends.import_failure.cache_clear()


def test_auto_runs_variable_blocks_on_triton_under_compile_too(hopper_with_flashinfer: None,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """triton-variable is one opaque op: a compiled graph calls it as eager code does."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    q = torch.randn(1, 2, N, 16)
    assert sparse_backends.auto_choice(q, q, q, kind_patterns()["variable"]) == "triton-variable"


def test_auto_keeps_variable_blocks_on_flex_where_the_call_needs_gradients(hopper_with_flashinfer: None) -> None:
    q = torch.randn(1, 2, N, 16, requires_grad=True)
    assert sparse_backends.auto_choice(q, q, q, kind_patterns()["variable"]) == "flex-tuned"


def test_backend_log_names_what_auto_runs_under_compile_where_it_differs(hopper_with_flashinfer: None) -> None:
    """Eagerly FlashInfer, compiled triton-blocks: the record names both; where they agree, only backend_used, and
    beside our kernel its launch configuration (backend_config)."""
    q = torch.randn(1, 2, N, 16)
    shared, per_head = head_shared_tiles(), kind_patterns()["tiles"]
    log = BackendLog("auto", "test")
    log.attention(q, q, q, shared)
    assert log.params()["backend_used"] == {str(N): "flashinfer-bsr"}
    assert log.params()["backend_used_compiled"] == {str(N): "triton-blocks"}
    other = BackendLog("auto", "test")
    other.attention(q, q, q, per_head)
    expected_config = sparse_backends.default_config(BLOCK, q.device).name
    assert other.params() == {"backend_used": {str(N): "triton-blocks"}, "backend_config": {str(N): expected_config}}
    assert "backend_config" not in log.params()  # FlashInfer's wrapper names no configuration of ours


def test_measure_skips_a_backend_refusing_the_patterns_kind_even_when_fastest() -> None:
    """A correct, fastest backend that refuses token-level patterns is never run on one: reported with the kind."""
    register_backend("fake-tiles-only", refused_kinds={"token-level": "whole tiles only"})(
        lambda q, k, v, pattern: masked_dense_attention(q, k, v, pattern)
    )
    try:
        q, k, v, _ = inputs()
        band = kind_patterns()["token-level"]
        timer = fake_timer({"fake-tiles-only": 1e-6, "masked": 1.0})
        choice = choose_backend(q, k, v, band, ("fake-tiles-only", "masked"), timer=timer)
    finally:
        REGISTRY.pop("fake-tiles-only")
    assert choice.name == "masked"
    assert choice.report["fake-tiles-only"] == {"skipped": "token-level pattern (partial tiles): whole tiles only"}


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


def test_auto_never_runs_masked_dense_past_its_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU auto is masked dense, whose N x N mask is refused past MASKED_MAX_ENTRIES (a Wan-scale call):
    there auto runs Flex, which takes every pattern, instead of building the mask."""
    q = torch.randn(1, 2, N, 16)
    pattern = kind_patterns()["tiles"]
    assert sparse_backends.auto_choice(q, q, q, pattern) == "masked"
    monkeypatch.setattr(sparse_backends, "MASKED_MAX_ENTRIES", N * N)
    assert sparse_backends.auto_choice(q, q, q, pattern) == "flex"
