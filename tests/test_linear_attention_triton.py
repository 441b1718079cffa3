"""The fused Triton linear attention against the float64 reference, and the dispatch between it and torch.

The kernel tests need Triton and either CUDA or the Triton interpreter on CPU tensors; elsewhere (CI) they
skip. To run them on a CPU machine, with Triton installed outside the project's environment::

    TRITON_INTERPRET=1 PYTHONPATH=.:<triton site> python -m pytest tests/test_linear_attention_triton.py

The interpreter multiplies bf16 operands as raw integers, so there the kernels are checked in fp16; on
CUDA in bf16 and fp16. Triton 3.6's interpreter also needs numpy < 2.4 (it converts loop bounds with
``int()`` of a one-element array).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from numerics import relative_error
from triton_helpers import DEVICE, ON_CUDA
from triton_helpers import needs_kernel as triton_needs_kernel

from harness.errors import HarnessError
from methods import METHODS
from methods.kernels import linear_attention_triton as fused
from methods.kernels.linear_attention import (
    FeatureMap,
    HedgehogFeatureMap,
    build_feature_map,
    feature_linear_attention,
    linear_attention,
    naive_linear_attention,
)

needs_kernel = triton_needs_kernel(fused)
# Relative error against float64 for fp16 (10-bit) and bf16 (7-bit) operands with fp32 accumulation.
TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 2e-2}
DTYPES = (torch.bfloat16, torch.float16) if ON_CUDA else (torch.float16,)


def maps(kind: str, heads: int, head_dim: int, trained: bool = True) -> tuple[FeatureMap, FeatureMap]:
    """Separate q and k maps, as LinVideo has; hedgehog's moved away from the identity when ``trained``."""
    pair = tuple(build_feature_map(kind, heads, head_dim, trainable=trained).to(DEVICE) for _ in range(2))
    for phi in pair:
        if isinstance(phi, HedgehogFeatureMap) and phi.weight is not None:
            with torch.no_grad():
                phi.weight += 0.2 * torch.randn_like(phi.weight)
    return pair  # type: ignore[return-value]


def test_float64_reference_matches_naive_quadratic_form() -> None:
    """The O(N) float64 reference the kernels are checked against equals the O(N^2) one, for each fused map."""
    q, k, v = (torch.randn(2, 3, 29, 16, dtype=torch.float64, device=DEVICE) for _ in range(3))
    for kind in fused.FUSED_KERNELS:
        q_map, k_map = maps(kind, 3, 16)
        weights = getattr(q_map, "weight", None), getattr(k_map, "weight", None)
        with torch.no_grad():
            ref = fused.float64_reference(q, k, v, kind, *weights)
            naive = naive_linear_attention(q_map(q), k_map(k), v)
        assert relative_error(ref, naive) < 1e-6, kind


def test_cpu_calls_take_the_torch_path() -> None:
    """On CPU the dispatcher computes exactly ``linear_attention(q_map(q), k_map(k), v)``."""
    q, k, v = (torch.randn(1, 2, 11, 8) for _ in range(3))
    q_map, k_map = (build_feature_map("hedgehog", 2, 8, trainable=True) for _ in range(2))
    assert torch.equal(feature_linear_attention(q, k, v, q_map, k_map), linear_attention(q_map(q), k_map(k), v))


@pytest.mark.parametrize(
    ("value", "message"),
    [("triton", "BENCH_LINEAR_BACKEND=triton but the fused linear attention cannot run"),
     ("cuda", "BENCH_LINEAR_BACKEND must be one of auto, torch, triton")],
)  # fmt: skip
def test_backend_variable_errors_are_specific(monkeypatch: pytest.MonkeyPatch, value: str, message: str) -> None:
    monkeypatch.setenv(fused.BACKEND_ENV, value)
    q = torch.randn(1, 2, 5, 8)
    phi = build_feature_map("relu", 2, 8)
    with pytest.raises(HarnessError, match=message):
        feature_linear_attention(q, q, q, phi, phi)


def test_taylor_is_declared_torch_only() -> None:
    """taylor's 1 + D + D^2 features are not fused; the methods running linear attention say so."""
    taylor = build_feature_map("taylor", 2, 8)
    assert fused.map_kind(taylor) is None and "taylor" not in fused.FUSED_KERNELS
    for name in ("linvideo", "linear"):
        assert "taylor runs in torch" in METHODS.get(name).capabilities.notes
    if fused.triton is not None:
        x = torch.randn(1, 2, 5, 8, device=DEVICE, dtype=torch.bfloat16)
        assert "taylor" in fused.unsupported_reason(x, x, x, taylor, taylor, device_type=DEVICE.type)


@pytest.mark.parametrize(
    ("dtypes", "autocast", "expected"),
    [((torch.bfloat16,) * 3, False, torch.bfloat16), ((torch.float32,) * 3, False, None),
     ((torch.float16, torch.float16, torch.bfloat16), False, None), ((torch.float32,) * 3, True, torch.bfloat16)],
)  # fmt: skip
def test_compute_dtype(dtypes: tuple[torch.dtype, ...], autocast: bool, expected: torch.dtype | None) -> None:
    """fp16/bf16 inputs keep their dtype, autocast imposes its own, fp32 alone stays in torch (None)."""
    q, k, v = (torch.randn(1, 1, 4, 8, dtype=dtype) for dtype in dtypes)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        assert fused.compute_dtype(q, k, v) == expected


@pytest.fixture
def many_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A device that runs 64 programs at once: even the tests' short sequences are cut into several chunks per
    head, so the partial sums over chunks (and, for W's gradient, over the batch) are exercised."""
    monkeypatch.setattr(fused, "_slots", lambda device: 64)


@needs_kernel
@pytest.mark.usefixtures("many_chunks")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", fused.FUSED_KERNELS)
@pytest.mark.parametrize(
    "shape",
    [(2, 2, 40, 27, 32),  # batch 2 (W's gradient sums over it), more queries than keys
     (1, 1, 70, 70, 24)],  # padded head dim, strided (B, N, H, D) inputs
)  # fmt: skip
def test_fused_matches_float64_reference(kind: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    """Output and every gradient (q, k, v, hedgehog's W for q and k) within the dtype's tolerance."""
    alignment = fused._chunk_alignment(fused.REDUCE_CONFIGS)
    scale = alignment // fused.INTERPRETER_CONFIGS[0][0]  # CUDA's blocks are 8x the interpreter's: 8x the tokens
    batch, heads, queries, keys, dim = shape
    queries, keys = queries * scale, keys * scale
    assert fused._chunking(keys, batch * heads * 2, 64, alignment)[0] > 1  # the state is summed over chunks
    q = torch.randn(batch, queries, heads, dim, device=DEVICE).to(dtype).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(batch, heads, keys, dim, device=DEVICE).to(dtype).requires_grad_() for _ in range(2))
    q_map, k_map = maps(kind, heads, dim)
    leaves = [q, k, v, *(p for m in (q_map, k_map) for p in m.parameters())]
    out = fused.fused_linear_attention(q, k, v, q_map, k_map)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad)
    weights = getattr(q_map, "weight", None), getattr(k_map, "weight", None)
    ref = fused.float64_reference(q, k, v, kind, *weights)
    ref_grads = torch.autograd.grad(ref, leaves, grad.double())
    assert out.shape == (batch, heads, queries, dim) and out.dtype == dtype
    names = ["out", "dq", "dk", "dv", "dWq", "dWk"]
    errors = {name: relative_error(a, b) for name, a, b in zip(names, [out, *grads], [ref, *ref_grads], strict=False)}
    assert all(e <= TOLERANCE[dtype] for e in errors.values()), f"{kind} {dtype}: {errors}"


@pytest.fixture(params=[None] if ON_CUDA else [32, 64])
def gpu_blocks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """Under the interpreter, every kernel run at BLOCK_N tokens (the blocks the GPU's autotuner picks; the
    interpreter's default is 16), with chunks aligned to it and several chunks per head. On CUDA, the kernels' own
    configurations, as the benchmarks run them (forcing one, e.g. the query pass at 64 tokens that QUERY_CONFIGS
    leaves out because it miscompiles on sm_90, would test code that never runs); yields the chunk alignment."""
    monkeypatch.setattr(fused, "_slots", lambda device: 64)
    if request.param is None:
        fused._chunking.cache_clear()
        yield fused._chunk_alignment(fused.REDUCE_CONFIGS)
        return
    block = request.param
    monkeypatch.setattr(fused, "INTERPRETER_CONFIGS", ((block, 4, 1),))
    fused._chunking.cache_clear()
    for name in ("_gram_partials", "_output", "_query_grads", "_key_grads", "_project_grads"):
        tuner = getattr(fused, name)
        monkeypatch.setattr(tuner, "configs", [fused.triton.Config({"BLOCK_N": block}, num_warps=4, num_stages=1)])
        tuner.cache.clear()
    yield block
    fused._chunking.cache_clear()
    for name in ("_gram_partials", "_output", "_query_grads", "_key_grads", "_project_grads"):
        getattr(fused, name).cache.clear()


def stage_inputs(kind: str, shape: tuple[int, int, int, int]) -> tuple[torch.Tensor, ...]:
    """q, k, v as (B, N, H, D) projections seen as (B, H, N, D), the upstream gradient, and both maps' weights."""
    batch, heads, tokens, dim = shape
    q, k, v = (torch.randn(batch, tokens, heads, dim, device=DEVICE).to(DTYPES[0]).transpose(1, 2) for _ in range(3))
    q_map, k_map = maps(kind, heads, dim)
    grad = torch.randn(shape, device=DEVICE).to(DTYPES[0])
    return q, k, v, grad, getattr(q_map, "weight", None), getattr(k_map, "weight", None)


@needs_kernel
@pytest.mark.parametrize("kind", fused.FUSED_KERNELS)
def test_every_stage_matches_float64_at_the_gpu_blocks(kind: str, gpu_blocks: int) -> None:
    """Each launch's intermediate (state, output, den, the state's gradients, dL/dp of q and k, dv, the projection
    backward's dq, dk and dW) at 32- and 64-token blocks, several blocks per chunk, several chunks, a ragged tail
    (150 tokens), full and padded head dims, batch 2: the stages the H200 run of wt-T2 got wrong (dk, dWk)."""
    from harness.benchmarks.linear_triton_gpu import stage_errors

    for shape in [(2, 2, 150, 32), (1, 2, 150, 24)]:
        assert fused._chunking(150, 4, 64, gpu_blocks)[0] > 1 and 150 % gpu_blocks
        q, k, v, grad, q_weight, k_weight = stage_inputs(kind, shape)
        errors = stage_errors(q, k, v, kind, q_weight, k_weight, grad)
        expected = {"S", "z", "out", "den", "dS", "dz", "dp_q", "dp_k", "dv", "dq", "dk"}
        assert set(errors) == expected | ({"dWq", "dWk"} if kind == "hedgehog" else set())
        assert all(e is not None and e <= TOLERANCE[DTYPES[0]] for e in errors.values()), f"{shape}: {errors}"


@needs_kernel
def test_stage_errors_name_the_wrong_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """A key pass whose dL/dp is wrong (the H200 failure: dv right, dk and dWk wrong) shows as dp_k, dk and dWk,
    with the state's gradients and dv still right: the localiser names the kernel."""
    from harness.benchmarks.linear_triton_gpu import stage_errors

    key_pass = fused._key_pass

    def wrong_key_pass(*args: object) -> tuple[torch.Tensor, torch.Tensor]:
        dp_k, dv = key_pass(*args)
        return 3 * dp_k, dv

    monkeypatch.setattr(fused, "_key_pass", wrong_key_pass)
    q, k, v, grad, q_weight, k_weight = stage_inputs("hedgehog", (1, 2, 40, 32))
    errors = stage_errors(q, k, v, "hedgehog", q_weight, k_weight, grad)
    wrong = {name for name, error in errors.items() if error > TOLERANCE[DTYPES[0]]}
    assert wrong == {"dp_k", "dk", "dWk"}, errors


@needs_kernel
def test_hedgehog_weights_in_the_compute_dtype() -> None:
    """A model cast to the compute dtype casts the map's W too: the kernels form W - I from it in fp32 and
    return W's gradient in its dtype."""
    dtype = DTYPES[0]
    q, k, v = (torch.randn(1, 2, 37, 32, device=DEVICE, dtype=dtype).requires_grad_() for _ in range(3))
    q_map, k_map = (phi.to(dtype) for phi in maps("hedgehog", 2, 32))
    out = fused.fused_linear_attention(q, k, v, q_map, k_map)
    grads = torch.autograd.grad(out, (q_map.weight, k_map.weight), torch.ones_like(out))
    ref = fused.float64_reference(q, k, v, "hedgehog", q_map.weight, k_map.weight)
    ref_grads = torch.autograd.grad(ref, (q_map.weight, k_map.weight), torch.ones_like(ref))
    assert relative_error(out, ref) <= TOLERANCE[dtype]
    assert all(
        g.dtype == dtype and relative_error(g, r) <= TOLERANCE[dtype] for g, r in zip(grads, ref_grads, strict=True)
    )


@pytest.mark.skipif(fused.triton is None, reason="needs triton")
@pytest.mark.parametrize(("tokens", "heads"), [(32760, 12), (75600, 40)])
@pytest.mark.parametrize("halves", [1, 2])
def test_chunking_covers_the_tokens_in_whole_waves(tokens: int, heads: int, halves: int) -> None:
    """At the Wan shapes (132 SMs), the chunks cover every token in whole blocks, and the tokens one program slot
    streams (waves x chunk) are within 5% of an even split of all rows' tokens over the slots."""
    slots, alignment, rows = fused.SLOTS_PER_SM * 132, 128, heads * halves
    chunks, chunk = fused._chunking(tokens, rows, slots, alignment)
    assert chunk % alignment == 0 and (chunks - 1) * chunk < tokens <= chunks * chunk
    waves = -(-chunks * rows // slots)
    assert waves * chunk <= 1.05 * tokens * rows / slots


@needs_kernel
def test_identity_hedgehog_has_no_weight_gradient() -> None:
    """The untrained map (W fixed to I) runs without a projection and matches the reference."""
    q, k, v = (torch.randn(1, 2, 33, 32, device=DEVICE, dtype=DTYPES[0]).requires_grad_() for _ in range(3))
    q_map, k_map = maps("hedgehog", 2, 32, trained=False)
    out = fused.fused_linear_attention(q, k, v, q_map, k_map)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    ref = fused.float64_reference(q, k, v, "hedgehog")
    ref_grads = torch.autograd.grad(ref, (q, k, v), torch.ones_like(ref))
    assert relative_error(out, ref) <= TOLERANCE[DTYPES[0]]
    assert all(relative_error(a, b) <= TOLERANCE[DTYPES[0]] for a, b in zip(grads, ref_grads, strict=True))


def op_inputs(kind: str) -> tuple[torch.Tensor | None, ...]:
    """Fresh leaves q, k, v ``(1, 1, 20, 24)`` (one chunk: the state is the unsummed partials; head dim 24 padded
    to 32 columns: the unprojected dq and dk and the dW slices are copies) and the maps' weights (None for relu and
    elu), all requiring grad."""
    q, k, v = (torch.randn(1, 1, 20, 24, device=DEVICE).to(DTYPES[0]).requires_grad_() for _ in range(3))
    weights = (getattr(phi, "weight", None) for phi in maps(kind, 1, 24))
    return q, k, v, *(None if w is None else w.detach().requires_grad_() for w in weights)


@needs_kernel
@pytest.mark.parametrize("kind", fused.FUSED_KERNELS)
def test_ops_pass_opcheck(kind: str) -> None:
    """Both ops' schemas (no output aliases an input or another), fake outputs (shapes, dtypes, strides), autograd
    registration and AOT dispatch agree with the kernels; the backward op both with and without weight gradients
    (their absence an empty (0,) tensor)."""
    q, k, v, q_weight, k_weight = op_inputs(kind)
    torch.library.opcheck(fused.linear_attention_forward, (q, k, v, q_weight, k_weight, kind, 1e-6))
    with torch.no_grad():
        out, state, den = fused.linear_attention_forward(q, k, v, q_weight, k_weight, kind, 1e-6)
    grad = torch.randn_like(out)
    q, k, v, q_weight, k_weight = (None if t is None else t.detach() for t in (q, k, v, q_weight, k_weight))
    for wanted in (True, False):  # the backward is first order only: its inputs do not require grad
        args = (grad, q, k, v, q_weight, k_weight, state, out, den, kind, wanted, wanted)
        torch.library.opcheck(fused.linear_attention_backward, args)
        dwq, dwk = fused.linear_attention_backward(*args)[3:]
        shape = (0,) if q_weight is None or not wanted else q_weight.shape
        assert dwq.shape == dwk.shape == shape


@needs_kernel
def test_compiled_fused_linear_attention_equals_eager() -> None:
    """torch.compile (fullgraph: no graph break) of the fused call with hedgehog's trainable weights gives eager's
    output and gradients in q, k, v and both weights: the launch code is inside the ops, out of Dynamo's sight
    (on the H200 Dynamo traced into the autotuner and failed)."""
    q_map, k_map = maps("hedgehog", 2, 24)
    q, k, v = (torch.randn(1, 2, 20, 24, device=DEVICE).to(DTYPES[0]).requires_grad_() for _ in range(3))
    leaves = (q, k, v, q_map.weight, k_map.weight)

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return fused.fused_linear_attention(q, k, v, q_map, k_map)

    torch._dynamo.reset()
    compiled = torch.compile(attention, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (attention, compiled):
        out = fn(q, k, v)
        results.append((out, *torch.autograd.grad(out.float().sum(), leaves)))
    torch._dynamo.reset()
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@needs_kernel
@pytest.mark.parametrize(("grad", "op_calls"), [(False, 0), (True, 1)])
def test_eager_calls_take_the_op_only_to_record_a_gradient(monkeypatch: pytest.MonkeyPatch, grad: bool,
                                                          op_calls: int) -> None:  # fmt: skip
    """An eager call recording no gradient runs the op's implementation without the op (its eager dispatch is host
    time) and returns what the op returns; one that records a gradient goes through the op and its autograd."""
    q, k, v = op_inputs("hedgehog")[:3]
    q_map, k_map = maps("hedgehog", 1, 24)
    calls = []
    op = fused.linear_attention_forward
    monkeypatch.setattr(fused, "linear_attention_forward", lambda *args: calls.append(args) or op(*args))
    with torch.set_grad_enabled(grad):
        out = fused.fused_linear_attention(q, k, v, q_map, k_map)
    with torch.no_grad():
        expected, _, _ = op(q, k, v, q_map.weight, k_map.weight, "hedgehog", 1e-6)
    assert len(calls) == op_calls and out.requires_grad == grad and torch.equal(out, expected)


@needs_kernel
def test_autotuner_runs_once_per_key_until_its_choice_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a kernel's first call per key its chosen configuration is launched directly (the autotuner's per-call
    key building is host time); a list that no longer holds the chosen configuration (a caller pinned another) sends
    the next call back through the autotuner."""
    tuner = fused._output
    runs = []
    run = type(tuner).run
    monkeypatch.setattr(type(tuner), "run", lambda self, *a, **kw: runs.append(self) or run(self, *a, **kw))
    q, k, v = (torch.randn(1, 2, 40, 32, device=DEVICE, dtype=DTYPES[0]) for _ in range(3))
    q_map, k_map = maps("relu", 2, 32)
    with torch.no_grad():
        for _ in range(2):
            fused.fused_linear_attention(q, k, v, q_map, k_map)
        assert runs.count(tuner) <= 1
        runs.clear()
        fused.fused_linear_attention(q, k, v, q_map, k_map)
        assert runs.count(tuner) == 0
        first = tuner.configs[0]
        pinned = fused.triton.Config(dict(first.kwargs), num_warps=first.num_warps // 2, num_stages=first.num_stages)
        monkeypatch.setattr(tuner, "configs", [pinned])
        fused.fused_linear_attention(q, k, v, q_map, k_map)
        assert runs.count(tuner) == 1 and tuner.best_config is pinned


@pytest.mark.skipif(not (ON_CUDA and fused.triton is not None), reason="needs CUDA and triton")
def test_cuda_dispatch_uses_the_kernel_unless_forced_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    q = torch.randn(1, 2, 64, 32, device="cuda", dtype=torch.bfloat16)
    q_map, k_map = maps("hedgehog", 2, 32)
    assert fused.use_fused(q, q, q, q_map, k_map)
    monkeypatch.setenv(fused.BACKEND_ENV, "torch")
    assert not fused.use_fused(q, q, q, q_map, k_map)


def test_gpu_script_times_the_wan_attention_calls() -> None:
    """The GPU script's shapes are one self-attention call of Wan 1.3B 480p and 14B 720p, as the issue states."""
    from harness.benchmarks.linear_triton_gpu import model_shape

    assert model_shape("wan1.3b") == (1, 12, 32760, 128)
    assert model_shape("wan14b") == (1, 40, 75600, 128)


def test_gpu_script_records_the_last_tuning_as_strict_json() -> None:
    """Triton's timings per configuration (median, 20th and 80th percentiles, or one number) are labelled, and a
    configuration that failed to run (inf) becomes null."""
    from types import SimpleNamespace

    from harness.benchmarks.linear_triton_gpu import last_tuning

    tuner = SimpleNamespace(configs_timings={"A": [0.2, 0.1, float("inf")], "B": 0.3})
    assert last_tuning(tuner) == {"A": {"median": 0.2, "p20": 0.1, "p80": None}, "B": {"median": 0.3}}


def test_gpu_script_ratios_flag_fused_rows_over_target() -> None:
    from harness.benchmarks.linear_triton_gpu import summarise

    rows = summarise({
        "cudnn": {"forward_ms": 10.0, "forward_backward_ms": 40.0},
        "fused relu": {"forward_ms": 0.2, "forward_backward_ms": 5.0},
        "torch relu": {"forward_ms": 2.0, "forward_backward_ms": 8.0},
    })  # fmt: skip
    row = rows["fused relu"]
    assert row["forward_vs_cudnn"] == pytest.approx(0.02) and row["forward_meets_target"]
    assert row["forward_backward_vs_cudnn"] == pytest.approx(0.125) and not row["forward_backward_meets_target"]
    assert "forward_meets_target" not in rows["torch relu"]


def test_gpu_script_diagnosis_line_names_kernels_and_failed_parts() -> None:
    """The per-path line gives device time and launches per call, the slowest kernels first, and says which
    measurement failed rather than hiding it."""
    from harness.benchmarks.launch_split import summary_line

    diagnosis = {
        "split": {"launches": 3.0, "device_ms": 0.3, "kernels": {"_output": 0.2, "_gram_partials": 0.09, "_sum": 0.01}},
        "graph_ms": {"error": "RuntimeError: capture failed"},
        "enqueue_ms": 0.05,
    }
    line = summary_line(diagnosis, top=2)
    assert line.startswith("kernels 0.300 ms in 3 launches (_output 0.200, _gram_partials 0.090)")
    assert "graph replay failed" in line and "host enqueue 0.050 ms" in line and "_sum" not in line
    assert summary_line({"split": {"error": "RuntimeError"}, "graph_ms": 0.2}).startswith("kernel split failed; graph")
