"""xattn, svg, svg2, radial: dense at full density, exact density and output of the mask used,
the paper schedules, Flex against the masked path, and each method's own selection rule."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from numerics import relative_error

from harness.errors import HarnessError
from methods import AttentionContext, Schedule, TokenGrid, build_method
from methods.kernels import sparse_backends
from methods.kernels.block_sparse import BlockSparsePattern, permute_tokens, unpermute_tokens
from methods.sparse import BlockSparseMethod, SparsePlan

GRID = TokenGrid(5, 5, 8)  # 200 tokens, 40 per frame
BLOCK = 16  # 13 tiles per row, the last one ragged (8 tokens)
FAST = {"svg2": {"kmeans_init_iters": 3, "kmeans_step_iters": 1}}  # k-means is the slow part on CPU
FULL_DENSITY = {"xattn": {"threshold": 1.0}, "svg": {"sparsity": 1.0}, "svg2": {"top_p": 1.0}}
METHODS = ("xattn", "svg", "svg2", "radial")


def build(name: str, schedule: Schedule | None = None, **params: Any) -> BlockSparseMethod:
    method = build_method(name, schedule, **{"block_size": BLOCK, **FAST.get(name, {}), **params})
    assert isinstance(method, BlockSparseMethod)
    return method


def context(step: int = 15, layer: int = 3, num_layers: int = 8, grid: TokenGrid = GRID) -> AttentionContext:
    """A call after every paper warm-up (step 15 of 20) at a layer no paper keeps dense."""
    return AttentionContext(layer=layer, num_layers=num_layers, step=step, num_steps=20, timestep=0.25,
                            cfg_branch="cond", grid=grid)  # fmt: skip


def qkv(grid: TokenGrid = GRID, heads: int = 3, dim: int = 16) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(1, heads, grid.tokens, dim) for _ in range(3))


def recording(method: BlockSparseMethod) -> list[SparsePlan]:
    """Make ``method`` remember every plan it runs."""
    plans: list[SparsePlan] = []
    original = method.plan

    def plan(*args: Any) -> SparsePlan:
        plans.append(original(*args))
        return plans[-1]

    method.plan = plan  # type: ignore[method-assign]
    return plans


@pytest.mark.parametrize("name", METHODS)
def test_full_density_equals_dense(name: str) -> None:
    """At a setting that keeps every tile the output is dense attention and the recorded density is 1.

    Radial has no such parameter; on a single frame its mask is the full first-frame sink."""
    grid = TokenGrid(1, 5, 8) if name == "radial" else GRID
    method = build(name, **FULL_DENSITY.get(name, {}))
    q, k, v = qkv(grid)
    out = method(q, k, v, context(grid=grid))
    assert relative_error(out, F.scaled_dot_product_attention(q.double(), k.double(), v.double())) <= 1e-5
    assert method.density.mean() == pytest.approx(1.0)


@pytest.mark.parametrize("name", METHODS)
def test_output_and_recorded_density_are_those_of_the_mask_used(name: str) -> None:
    """At the paper setting: the output is float64 softmax over the plan's token mask (in its token
    order), the recorded density is that mask's mean, and the call is actually sparse."""
    method = build(name)
    plans = recording(method)
    q, k, v = qkv()
    out = method(q, k, v, context())
    (plan,) = plans
    mask = plan.pattern.dense_mask().expand(1, 3, GRID.tokens, GRID.tokens)
    q_order = plan.q_order
    kv_order = q_order if plan.kv_order is None else plan.kv_order
    qp = q if q_order is None else permute_tokens(q, q_order)
    kp, vp = (t if kv_order is None else permute_tokens(t, kv_order) for t in (k, v))
    scores = (qp.double() @ kp.double().transpose(-2, -1)) / qp.shape[-1] ** 0.5
    ref = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ vp.double()
    ref = ref if q_order is None else unpermute_tokens(ref, q_order)
    assert relative_error(out, ref) <= 1e-5
    assert method.density.mean() == pytest.approx(mask.double().mean().item(), abs=1e-12)
    assert method.density.mean() < 1.0


@pytest.mark.parametrize("name", METHODS)
def test_paper_warmup_steps_run_dense(name: str) -> None:
    """Step 0 of 20 is inside every paper warm-up (10-24% of the steps): dense output, density 1."""
    method = build(name)
    q, k, v = qkv()
    out = method(q, k, v, context(step=0))
    assert relative_error(out, F.scaled_dot_product_attention(q, k, v)) <= 1e-6
    assert method.density.per_step() == {0: 1.0}


@pytest.mark.parametrize(("name", "num_layers"), [("svg", 40), ("svg2", 40), ("radial", 8)])
def test_paper_dense_first_layers(name: str, num_layers: int) -> None:
    """SVG/SVG2 keep floor(0.03 x 40) = 1 first layer dense, Radial its first layer; layer 1 is sparse."""
    method = build(name)
    q, k, v = qkv()
    for layer in (0, 1):
        method(q, k, v, context(layer=layer, num_layers=num_layers))
    per_layer = method.density.per_layer()
    assert per_layer[0] == 1.0 and per_layer[1] < 1.0


@pytest.mark.parametrize("name", METHODS)
def test_user_schedule_dense_layers_and_steps(name: str) -> None:
    """The user's Schedule adds to the paper's: its dense layer and its warm-up steps run dense."""
    method = build(name, Schedule(dense_warmup_steps=16, dense_layers=(5,)))
    q, k, v = qkv()
    method(q, k, v, context(layer=5, step=17))
    method(q, k, v, context(layer=3, step=15))
    assert method.density.per_layer() == {3: 1.0, 5: 1.0}


@pytest.mark.parametrize("name", METHODS)
def test_flex_path_matches_masked_path(name: str) -> None:
    """One plan, two executions: compiled FlexAttention (CPU inductor) equals the masked dense path."""
    method = build(name)
    q, k, v = qkv()
    plan = method.plan(q, k, v, context())
    flex = method.execute(q, k, v, plan, backend="flex")
    assert relative_error(flex, method.execute(q, k, v, plan, backend="masked")) <= 1e-5


def test_xattn_scores_are_strided_antidiagonal_sums() -> None:
    """Block masses equal a written-out antidiagonal sum, softmax over reduced rows, block sums."""
    from methods.xattn import antidiagonal_block_scores

    stride, block, tokens = 4, 8, 32
    q, k = torch.randn(1, 1, tokens, 8), torch.randn(1, 1, tokens, 8)
    reduced = tokens // stride
    sums = torch.zeros(reduced, reduced, dtype=torch.float64)
    for i in range(reduced):
        for j in range(reduced):
            for m in range(stride):
                sums[i, j] += q[0, 0, i * stride + stride - 1 - m].double() @ k[0, 0, j * stride + m].double()
    probs = (sums / (8**0.5 * stride)).softmax(dim=-1)
    expected = probs.view(tokens // block, block // stride, tokens // block, block // stride).sum(dim=(1, 3))
    got = antidiagonal_block_scores(q, k, block, stride)[0, 0]
    assert torch.allclose(got.double(), expected, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_svg_profiling_tells_temporal_from_spatial_heads(dtype: torch.dtype) -> None:
    """A head whose keys match by spatial position (across frames) is temporal; by frame, spatial; in bf16 too,
    where the products run in the inputs' dtype."""
    from methods.svg import SparseVideoGen

    grid = TokenGrid(5, 5, 8)
    index = torch.arange(grid.tokens)
    by_position = F.one_hot(index % grid.tokens_per_frame, 48).float() * 8
    by_frame = F.one_hot(index // grid.tokens_per_frame, 48).float() * 8
    q = torch.stack([by_position, by_frame])[None].to(dtype)
    method = build("svg", sampled_rows=200)
    assert isinstance(method, SparseVideoGen)
    temporal = method.temporal_heads(q, q, torch.randn_like(q), grid, BLOCK)
    assert temporal.tolist() == [[True, False]]


def test_svg2_kmeans_separates_clusters_and_centroids_are_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    """k-means started from one point per well-separated cluster (here the 1st, 3rd and 2nd) recovers
    the clusters, their means and sizes; the first method call runs the init iterations, the next
    warm-starts from the layer's cached centroids with the step iterations."""
    import methods.svg2 as svg2

    centres = torch.randn(3, 16) * 20
    points = (centres.repeat_interleave(25, dim=0) + torch.randn(75, 16))[None]
    start = points[:, [0, 50, 25]]
    labels, centroids, sizes, _ = svg2.kmeans(points, 3, 5, start, torch.Generator())
    assert labels[0].tolist() == [0] * 25 + [2] * 25 + [1] * 25 and sizes.tolist() == [[25, 25, 25]]
    assert torch.allclose(centroids[0, 2], points[0, 25:50].mean(dim=0), atol=1e-5)

    calls: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    real = svg2.kmeans

    def spy(x, clusters, iterations, init, generator):  # type: ignore[no-untyped-def]
        out = real(x, clusters, iterations, init, generator)
        calls.append((iterations, x, init, out[1]))
        return out

    monkeypatch.setattr(svg2, "kmeans", spy)
    method = build("svg2", kmeans_init_iters=5, kmeans_step_iters=2)
    q, k, v = qkv()
    method(q, k, v, context(step=15))
    method(q, k, v, context(step=16))
    assert [iterations for iterations, *_ in calls] == [5, 5, 2, 2]
    for _, x, init, _ in calls[:2]:  # cold: every starting centroid is one of the group's tokens
        assert all(bool((x[g].float()[None] == init[g][:, None]).all(-1).any(-1).all()) for g in range(x.shape[0]))
    for (_, _, _, cached), (_, _, init, _) in zip(calls[:2], calls[2:], strict=True):  # warm: the cached centroids
        assert torch.equal(init, cached)


def test_radial_density_halves_per_doubling_of_frame_distance() -> None:
    """With 256 tokens per frame and decay 1, frame pairs 2-3, 4-7 and 8-15 apart keep ~0.78, ~0.48,
    ~0.29 of their entries: each band under 0.65 of the previous (whole tiles blur the exact halving)."""
    from methods.radial import band_half_width, radial_tiles

    assert [band_half_width(d, 4096, 1.0, 128) for d in (2, 4, 8, 16)] == [2048, 1024, 512, 256]
    grid = TokenGrid(16, 16, 16)
    mask = BlockSparsePattern(radial_tiles(grid, 1.0, 16, "cpu")[None, None], grid.tokens, 16).dense_mask()
    per_pair = mask[0, 0].double().view(16, 256, 16, 256).mean(dim=(1, 3))
    bands = []
    for low, high in ((2, 4), (4, 8), (8, 16)):
        pairs = [per_pair[i, j] for i in range(16) for j in range(1, 16) if low <= abs(i - j) < high]
        bands.append(float(sum(pairs) / len(pairs)))
    assert bands[1] < 0.65 * bands[0] and bands[2] < 0.65 * bands[1]


@pytest.mark.parametrize("name", [*METHODS, "sla"])
def test_every_pattern_a_method_runs_is_of_a_kind_it_declares(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kinds the preflight refuses backends by (``pattern_kinds``) are those of the patterns the calls run."""
    kinds: list[str] = []
    select = sparse_backends.select_backend

    def recording(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern,
                  *args: Any) -> sparse_backends.BackendChoice:  # fmt: skip
        kinds.append(pattern.kind)
        return select(q, k, v, pattern, *args)

    monkeypatch.setattr(sparse_backends, "select_backend", recording)
    method = build_method(name, block_size=BLOCK, **FAST.get(name, {}))
    method(*qkv(), context())
    assert kinds and set(kinds) <= type(method).pattern_kinds


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("xattn", {"threshold": 0.0}, "threshold"),
        ("xattn", {"stride": 3}, "divide the block size"),
        ("svg", {"sparsity": 1.5}, "sparsity"),
        ("svg2", {"k_clusters": 0}, "k_clusters"),
        ("radial", {"decay_factor": -1}, "decay_factor"),
        ("radial", {"block_size": 0}, "block_size"),
        ("svg", {"backend": "triton"}, "backend"),
        ("svg2", {"p": 0.9}, "has no parameter 'p'. Did you mean 'top_p'"),
    ],
)
def test_bad_settings_are_refused(name: str, params: dict[str, Any], message: str) -> None:
    """Impossible settings fail at construction with a message naming the setting."""
    with pytest.raises(HarnessError, match=message):
        build(name, **params)


def test_bench_methods_marks_data_dependence_and_svg2_speed(bench) -> None:  # type: ignore[no-untyped-def]
    """`bench methods --json` lists the four methods; svg2's note says where its clusters run as variable blocks."""
    import json

    rows = {row["name"]: row for row in json.loads(bench("methods", "--json").stdout)}
    assert {name: rows[name]["data_dependent"] for name in METHODS} == {
        "xattn": True, "svg": True, "svg2": True, "radial": False,
    }  # fmt: skip
    assert "variable-size blocks on triton-variable" in rows["svg2"]["notes"]


def test_splitmix64_wraps_as_unsigned_64_bit_arithmetic() -> None:
    """The tensor version against SplitMix64 in Python integers mod 2^64 (Steele, Lea and Flood's constants)."""
    from methods.sparse import splitmix64

    def reference(x: int) -> int:
        mask = (1 << 64) - 1
        z = (x + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    inputs = [0, 1, 2, 12345, -1, (1 << 63) - 1, -(1 << 63)]
    out = splitmix64(torch.tensor(inputs, dtype=torch.int64))
    assert [value % (1 << 64) for value in out.tolist()] == [reference(x % (1 << 64)) for x in inputs]


def test_counter_draws_continue_one_stream_whatever_the_call_sizes() -> None:
    """Calls of 3 and then 5 draws give the 8 draws of one call, so calls of different sizes (svg2's queries and
    keys) never repeat each other's draws; a seed of 2^64 - 1 is taken as manual_seed takes it."""
    from methods.sparse import CounterDraws

    split, whole = CounterDraws(7), CounterDraws(7)
    cpu = torch.device("cpu")
    parts = torch.cat([split.randint(1000, (3,), cpu), split.randint(1000, (5,), cpu)])
    assert torch.equal(parts, whole.randint(1000, (8,), cpu))
    assert torch.equal(split.randint(1000, (4,), cpu), whole.randint(1000, (4,), cpu))
    assert CounterDraws((1 << 64) - 1).randint(10, (2,), cpu).shape == (2,)


def test_counter_draws_repeat_per_video_vary_per_call_and_stay_in_range() -> None:
    """Draws restart with the seed on reset, differ from call to call and between seeds, lie in [0, high), and
    spread evenly (each of 10 values within 20% of its share in 20,000 draws)."""
    from methods.sparse import CounterDraws

    draws, other = CounterDraws(0), CounterDraws(1)
    first = [draws.randint(10, (2000,), torch.device("cpu")) for _ in range(10)]
    draws.reset()
    again = [draws.randint(10, (2000,), torch.device("cpu")) for _ in range(10)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first[0], other.randint(10, (2000,), torch.device("cpu")))
    values = torch.cat(first)
    assert int(values.min()) >= 0 and int(values.max()) < 10
    assert bool((torch.bincount(values, minlength=10) - 2000).abs().le(400).all())


def test_counter_draws_compiled_by_inductor_equal_eager_ones() -> None:
    """Inductor's code (CPU here) draws what eager draws, the counter advanced in place by the compiled graph."""
    from methods.sparse import CounterDraws

    eager, compiled = CounterDraws(3), CounterDraws(3)
    expected = [eager.randint(1000, (4, 7), torch.device("cpu")) for _ in range(3)]
    torch._dynamo.reset()
    draw = torch.compile(lambda: compiled.randint(1000, (4, 7), torch.device("cpu")), backend="inductor",
                         fullgraph=True)  # fmt: skip
    compiled.randint(1000, (1,), torch.device("cpu"))  # the counter exists before the graph reads it
    compiled.reset()
    assert all(torch.equal(draw(), value) for value in expected)


def test_counter_draws_compiled_before_any_eager_draw_equal_eager_ones() -> None:
    """A graph traced before the counter exists (a user compiling first) creates it and draws what eager draws."""
    from methods.sparse import CounterDraws

    eager, compiled = CounterDraws(5), CounterDraws(5)
    torch._dynamo.reset()
    draw = torch.compile(lambda: compiled.randint(50, (6,), torch.device("cpu")), backend="eager", fullgraph=True)
    assert all(torch.equal(draw(), eager.randint(50, (6,), torch.device("cpu"))) for _ in range(3))
