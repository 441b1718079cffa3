"""The harness's processor under torch.compile, as diffusers users run the transformer (issue 21, item 5).

Graphs and recompiles are Dynamo's doing (graph capture and guards), so the transformer is compiled with a
counting backend that runs each captured graph as it is, without code generation: seconds on CPU. Inductor's
code is timed by ``bench latency --compile`` on the GPU. Methods that compile in one graph with no recompile
across sampler steps: sdpa, math (and the other dense backends: the same code path), linear and linvideo; radial,
alone or in LinVideo's softmax layers, on the masked (CPU) and Flex (GPU) backends, in one graph per dense-or-sparse
decision (its warm-up). The data-dependent sparse methods (xattn, svg, svg2, sla) break the graph where their
selection reads a tensor in Python (densities, ``.item()``), at a cost of graphs per break, not a recompile per
layer; DFA also recompiles along its per-step plan, as ``bench latency --compile`` records.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from harness.models.wan import WanTiny
from methods import AttentionMethod, build_method
from methods.base import Schedule

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
    """wan-tiny's sampler, CFG on: two forwards per step, the runtime's step, timestep and branch set by it."""
    with torch.inference_mode(), model.use_method(method) as runtime:
        cond, uncond = model.encode_prompts(["a prompt"]), model.encode_prompts([""])
        noise = torch.randn(1, *WanTiny.latent_shape(SAMPLING), generator=torch.Generator().manual_seed(0))
        return model.sample(noise, cond, uncond, SAMPLING, runtime)


@pytest.mark.parametrize(
    ("name", "params"), [("sdpa", {}), ("math", {}), ("linear", {}), ("linvideo", {"linear_layers": [1]})]
)
def test_processor_compiles_in_one_graph_across_sampler_steps(tiny_model, name: str, params: dict) -> None:
    """fullgraph=True holds, and 4 steps x 2 CFG branches run one graph (a recompile would raise); the compiled
    sample equals the eager one. The method first runs eagerly, as in `bench latency --compile`: linear and an
    untrained linvideo build their state on first use, which a compiled first call would pay one recompile for
    (linvideo's, under inference mode, is a Dynamo error)."""
    method = build_method(name, **params)
    eager = sample(tiny_model, method)
    with compiled(tiny_model, fullgraph=True) as counter, torch._dynamo.config.patch(error_on_recompile=True):
        actual = sample(tiny_model, method)
    assert counter.frame_count == 1
    torch.testing.assert_close(actual, eager, rtol=1e-5, atol=1e-5)


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


def test_a_graph_break_in_the_processor_costs_no_recompile_per_layer(tiny_model) -> None:
    """xattn breaks the graph where it reads its density in Python: the processor's frame is then compiled on its
    own, once for every layer (guarded on the layer's call, not on its number), so 4 steps x 2 CFG branches over
    both layers run without a recompile. The compiled sample equals the eager one."""
    method = build_method("xattn")
    eager = sample(tiny_model, method)
    with compiled(tiny_model) as counter, torch._dynamo.config.patch(error_on_recompile=True):
        actual = sample(tiny_model, method)
    assert counter.frame_count > 1  # the break is there
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
