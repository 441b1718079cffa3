"""The harness's processor under torch.compile, as diffusers users run the transformer (issue 21, item 5).

Graphs and recompiles are Dynamo's doing (graph capture and guards), so the transformer is compiled with a
counting backend that runs each captured graph as it is, without code generation: seconds on CPU; one test lowers a
sparse call with Inductor (CPU code), where Flex reads a mask built in the graph. Inductor's code is timed by
``bench latency --compile`` on the GPU. Methods that compile in one graph with no recompile
across sampler steps: sdpa, math (and the other dense backends: the same code path), linear, linvideo, and xattn and
sla on the masked (CPU) and Flex (GPU) backends (their densities stay tensors: only the eager density log reads
them); radial, alone or in LinVideo's softmax layers, on both backends, in one graph per dense-or-sparse decision
(its warm-up). svg and svg2, alone or in LinVideo's softmax layers, compile in one graph too, once per decision
(dense warm-up; svg2's k-means started or warm): their random draws are counter-based hashes in the graph
(:class:`methods.sparse.CounterDraws`), and what a layer looks up is resolved before the forward (the context's
route). DFA also recompiles along its per-step
plan, as ``bench latency --compile`` records.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, ClassVar

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from harness.models.wan import WAN_TINY_CONFIG, WanTiny
from methods import AttentionMethod, build_method
from methods.base import AttentionContext, Schedule, TokenGrid

SAMPLING = replace(WanTiny.defaults, steps=4)


@contextmanager
def compiled(model, **options) -> Iterator[CompileCounter]:  # type: ignore[no-untyped-def]
    """The adapter's transformer under torch.compile (counting backend) for the block; Dynamo reset around it."""
    torch._dynamo.reset()
    counter = CompileCounter()
    eager = model.transformer
    model.transformer = torch.compile(eager, backend=counter, **options)
    try:
        yield counter
    finally:
        model.transformer = eager
        torch._dynamo.reset()


def sample(model, method: AttentionMethod) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """wan-tiny's sampler, CFG on: two forwards per step, the runtime's step, timestep and branch set by it. The
    method begins a video first, as `bench run` has it do per video (svg's and svg2's draws and warm starts)."""
    method.begin_video()
    with torch.inference_mode(), model.use_method(method) as runtime:
        cond, uncond = model.encode_prompts(["a prompt"]), model.encode_prompts([""])
        noise = torch.randn(1, *WanTiny.latent_shape(SAMPLING), generator=torch.Generator().manual_seed(0))
        return model.sample(noise, cond, uncond, SAMPLING, runtime)


@pytest.mark.parametrize(("name", "params"), [
    ("sdpa", {}), ("math", {}), ("linear", {}), ("linvideo", {"linear_layers": [1]}),
    ("xattn", {}), ("xattn", {"backend": "flex"}), ("sla", {}), ("sla", {"backend": "flex"}),
], ids=["sdpa", "math", "linear", "linvideo", "xattn", "xattn-flex", "sla", "sla-flex"])  # fmt: skip
def test_processor_compiles_in_one_graph_across_sampler_steps(tiny_model, name: str, params: dict) -> None:
    """4 steps x 2 CFG branches run one graph (a recompile would raise), so fullgraph=True holds; compiled without it,
    as `bench latency --compile` does, for fullgraph=True would hide a tensor read into Python (it captures the read
    in the graph: a host sync per call on the GPU). The compiled sample equals the eager one. The method first runs
    eagerly, as in `bench latency --compile`: linear and an untrained linvideo build their state on first use,
    which a compiled first call would pay one recompile for (linvideo's, under inference mode, is a Dynamo error).
    xattn's and sla's selections depend on q and k, on the masked (CPU) and Flex (GPU) backends alike: their
    densities stay tensors, read by the eager log alone."""
    method = build_method(name, **params)
    eager = sample(tiny_model, method)
    with compiled(tiny_model) as counter, torch._dynamo.config.patch(error_on_recompile=True):
        actual = sample(tiny_model, method)
    assert counter.frame_count == 1
    torch.testing.assert_close(actual, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_size", [128, "auto"], ids=["whole-tiles", "regrouped"])
def test_a_mask_built_in_the_graph_lowers_with_inductor(block_size: int | str) -> None:
    """xattn at a fixed density (the H200's failing case) on the Flex backend, its call compiled by Inductor as in
    `bench latency --compile` (CPU code here): the tile table its mask_mod reads is built in the graph, the last step
    a fused select_scatter (``kept[..., 0] = True``), which Flex's lowering refused ("No choices to select") until the
    table went through mask_tables. 128-token blocks are read whole (Wan's case), the toy's automatic 32 through
    128-token tiles regrouped from them. The compiled call equals masked dense on the same tiles."""
    grid = TokenGrid(8, 8, 8)  # 512 tokens
    ctx = AttentionContext(layer=0, num_layers=1, step=1, num_steps=2, timestep=0.5, cfg_branch="cond", grid=grid)
    q, k, v = torch.randn(3, 1, 2, grid.tokens, 16, generator=torch.Generator().manual_seed(0))
    params = {"fixed_density": 0.344, "block_size": block_size}
    flex, masked = (build_method("xattn", backend=backend, **params) for backend in ("flex", "masked"))
    torch._dynamo.reset()
    try:
        with torch.inference_mode():
            out, density = torch.compile(lambda *qkv: flex.attend(*qkv, ctx), fullgraph=True)(q, k, v)
            expected, expected_density = masked.attend(q, k, v, ctx)
    finally:
        torch._dynamo.reset()
    assert float(density) == float(expected_density) < 1.0
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_a_dense_warmup_recompiles_once_where_the_decision_changes(tiny_model) -> None:
    """With 2 dense warm-up steps of 4 the graph changes once (dense, then linear), not at every step."""
    method = build_method("linear", Schedule(dense_warmup_steps=2))
    eager = sample(tiny_model, method)
    with compiled(tiny_model, fullgraph=True) as counter:
        actual = sample(tiny_model, method)
    assert counter.frame_count == 2
    torch.testing.assert_close(actual, eager, rtol=1e-5, atol=1e-5)


RADIAL = {"decay_factor": 0.2, "warmup_fraction": 0.24, "dense_first_layers": 0}  # wan-tiny has 2 layers


@pytest.mark.parametrize("backend", ["masked", "flex"])
@pytest.mark.parametrize("in_linvideo", [False, True], ids=["radial", "linvideo+radial"])
def test_radial_compiles_in_one_graph_per_warmup_decision(tiny_model, in_linvideo: bool, backend: str) -> None:
    """Radial's mask depends on the grid alone: alone and in LinVideo's softmax layers (layer 1 linear), on either
    backend (flex is the GPU's), fullgraph=True holds and 4 steps x 2 CFG branches run 2 graphs: dense in radial's
    warm-up (step 0), then sparse; one recompile where that decision changes, none per step or per layer. The
    compiled sample equals the eager one."""
    radial = {**RADIAL, "backend": backend}
    if in_linvideo:
        method = build_method("linvideo", linear_layers=[1], softmax_method="radial", softmax_params=radial)
    else:
        method = build_method("radial", **radial)
    eager = sample(tiny_model, method)
    density = {(layer, step): total / calls for layer, step, total, calls in method.density.entries()}
    assert density[(0, 0)] == 1.0 and 0.0 < density[(0, 1)] < 1.0  # layer 0 runs radial: dense, then sparse
    with compiled(tiny_model, fullgraph=True) as counter:
        actual = sample(tiny_model, method)
    assert counter.frame_count == 2
    torch.testing.assert_close(actual, eager, rtol=1e-5, atol=1e-5)


def test_radial_compiled_after_eager_calls_on_another_backend_recompiles_no_more(
    tiny_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    """auto may run eager calls on FlashInfer and compiled ones on Flex: the compiled trace then builds radial's Flex
    mask itself, and must not keep it on the pattern (that would change what the graph's guards read and recompile
    the model once): 4 steps x 2 CFG branches still run 2 graphs, dense warm-up then sparse."""
    from methods.kernels import sparse_backends

    def flex_when_compiled(q, k, v, pattern, compiled=None) -> str:  # type: ignore[no-untyped-def]
        return "flex" if (torch.compiler.is_compiling() if compiled is None else compiled) else "masked"

    monkeypatch.setattr(sparse_backends, "auto_choice", flex_when_compiled)
    method = build_method("radial", **RADIAL)
    eager = sample(tiny_model, method)
    with compiled(tiny_model, fullgraph=True) as counter:
        actual = sample(tiny_model, method)
    assert counter.frame_count == 2
    params = method.params()
    assert set(params["backend_used"].values()) == {"masked"} and set(params["backend_used_compiled"].values()) == {
        "flex"
    }
    torch.testing.assert_close(actual, eager, rtol=1e-5, atol=1e-5)


DEEP_LAYERS = 4  # with the recompile limit at 2, a frame compiled once per layer raises


@pytest.fixture(scope="module")
def deep_model():  # type: ignore[no-untyped-def]
    """wan-tiny with :data:`DEEP_LAYERS` layers (CPU, fp32, seeded random weights)."""

    class WanTinyDeep(WanTiny):
        transformer_config: ClassVar[dict[str, Any]] = {**WAN_TINY_CONFIG, "num_layers": DEEP_LAYERS}
        num_layers = DEEP_LAYERS

    return WanTinyDeep.load("random", torch.device("cpu"), torch.float32)


ODD_LAYERS = list(range(1, DEEP_LAYERS, 2))


@pytest.mark.parametrize(("name", "params"), [
    ("svg", {}), ("svg2", {}),
    ("linvideo", {"linear_layers": ODD_LAYERS, "softmax_method": "svg"}),
    ("linvideo", {"linear_layers": ODD_LAYERS, "softmax_method": "svg2"}),
], ids=["svg", "svg2", "linvideo+svg", "linvideo+svg2"])  # fmt: skip
def test_random_draws_trace_into_the_graph_with_no_recompile_per_layer(deep_model, name: str, params: dict) -> None:
    """svg's profiled rows and svg2's first k-means centroids are drawn by counter-based hashing in the graph
    (:class:`methods.sparse.CounterDraws`; a torch.Generator broke it at every draw, as Dynamo traces none), so the
    forward is one frame with no graph break. What a layer looks up (LinVideo's branch and feature maps, svg2's
    centroid cache) comes from the context's route, not the layer's number: over 10 layers the frame compiles once
    per decision (dense warm-up, k-means started, k-means warm: three at most), where a recompile per layer would
    hit the limit and raise. The compiled sample equals the eager one: the draws restart with each video."""
    from torch._dynamo.utils import counters

    method = build_method(name, **params)
    eager = sample(deep_model, method)
    limit = torch._dynamo.config.patch(recompile_limit=3, fail_on_recompile_limit_hit=True)
    counters.clear()
    with compiled(deep_model) as counter, limit:
        actual = sample(deep_model, method)
    assert not counters["graph_break"]
    assert counter.frame_count <= 3
    torch.testing.assert_close(actual, eager, rtol=1e-5, atol=1e-5)


def test_compiled_calls_are_neither_timed_nor_logged_and_eager_ones_are(tiny_model) -> None:
    """The timer and the density log stay out of the compiled graph; the same runtime times and logs eager calls."""
    method = build_method("sdpa")
    with compiled(tiny_model, fullgraph=True), torch.inference_mode(), tiny_model.use_method(method) as runtime:
        latents = torch.randn(1, *WanTiny.latent_shape(SAMPLING))
        embeddings = tiny_model.encode_prompts(["a prompt"])
        tiny_model.forward(latents, torch.tensor(500.0), embeddings)
        assert runtime.timer.pop_seconds() == 0.0 and method.density.mean() is None
    with torch.inference_mode(), tiny_model.use_method(method) as runtime:
        tiny_model.forward(latents, torch.tensor(500.0), embeddings)
        assert runtime.timer.pop_seconds() > 0.0 and method.density.mean() == 1.0


def test_a_state_built_in_the_first_forward_is_routed_in_the_next(deep_model) -> None:
    """``bench latency --compile`` at step 0: an untrained LinVideo builds its state in the first (eager) forward,
    after the runtime resolved its routes (none yet: no state); the compiled forwards that follow, at the same step,
    grid and branch, find the state's routes, not a lookup by layer number per call (a recompile per layer where the
    softmax method breaks the graph, which the limit turns into an error here)."""
    method = build_method("linvideo", linear_layers=ODD_LAYERS, softmax_method="svg")
    latents = torch.randn(1, *WanTiny.latent_shape(SAMPLING), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), deep_model.use_method(method) as runtime:
        embeddings = deep_model.encode_prompts(["a prompt"])
        runtime.num_steps = 1
        deep_model.forward(latents, torch.tensor(500.0), embeddings)  # eager: builds the untrained state
        limit = torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True)
        with compiled(deep_model) as counter, limit:
            for _ in range(2):
                deep_model.forward(latents, torch.tensor(500.0), embeddings)
        assert counter.frame_count == 1  # svg's draws are in the graph
        assert all(slot.call.ctx.route is not None for slot in runtime.slots)
