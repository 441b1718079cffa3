"""LinVideo + sparse: a converted model's softmax layers run a registered dense or sparse method (issue 23, item 3)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Invoke, normalise, records_in

import methods.radial
from harness.errors import HarnessError, UnsupportedError
from methods import METHODS, AttentionMethod, build_method
from methods.base import AttentionContext, Schedule, TokenGrid
from methods.dmd2.generator import Dmd2Generator
from methods.linvideo.attention import LinVideo, TransferState, softmax_methods

GRID = TokenGrid(8, 8, 8)  # the toy's 512 tokens (blocks of 32 under `auto`)
HEADS, HEAD_DIM, LAYERS, STEPS = 4, 32, 4, 5
LINEAR = (1,)
PROMPT = "a small red disk moves left on a gray background"

# Per method, a setting that keeps every block (radial has none on this grid: its kept table is patched).
KEEP_ALL: dict[str, dict[str, Any]] = {
    "sdpa": {},
    "math": {},
    "xattn": {"threshold": 1.0},
    "svg": {"sparsity": 1.0},
    "svg2": {"top_p": 1.0, "q_clusters": 8, "k_clusters": 16, "kmeans_init_iters": 3},
    "radial": {},
    "dfa": {"uniform": "full"},
}


def _calls() -> list[tuple[AttentionContext, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every (step, layer, CFG branch) call of a short sampling, each with its own seeded q, k, v."""
    generator = torch.Generator().manual_seed(0)
    calls = []
    for step in range(STEPS):
        for layer in range(LAYERS):
            for branch in ("cond", "uncond"):
                ctx = AttentionContext(layer, LAYERS, step, STEPS, 1.0 - step / STEPS, branch, GRID)
                q, k, v = (torch.randn(1, HEADS, GRID.tokens, HEAD_DIM, generator=generator) for _ in range(3))
                calls.append((ctx, q, k, v))
    return calls


def _run(method: LinVideo) -> list[torch.Tensor]:
    method.validate_for(LAYERS, STEPS)
    return [method(q, k, v, ctx) for ctx, q, k, v in _calls()]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("name", sorted(KEEP_ALL))
def test_linvideo_with_a_method_that_keeps_every_block_equals_linvideo(name: str, monkeypatch: pytest.MonkeyPatch
                                                                       ) -> None:  # fmt: skip
    """Each softmax method at a setting that keeps every block (radial: its kept table patched to all-True, the
    rest of its code path real) gives LinVideo's outputs within 1e-6, and the same per-layer density."""
    if name == "radial":
        monkeypatch.setattr(methods.radial, "radial_tiles", lambda grid, decay, block, device: torch.ones(
            -(-grid.tokens // block), -(-grid.tokens // block), dtype=torch.bool, device=device))  # fmt: skip
    plain = LinVideo(linear_layers=LINEAR)
    combined = LinVideo(linear_layers=LINEAR, softmax_method=name, softmax_params=KEEP_ALL[name])
    for ours, reference in zip(_run(combined), _run(plain), strict=True):
        assert _rel(ours, reference) <= 1e-6
    expected = {layer: 0.0 if layer in LINEAR else 1.0 for layer in range(LAYERS)}
    assert combined.density.per_layer() == pytest.approx(expected) == plain.density.per_layer()


def test_the_default_softmax_layers_are_bitwise_torch_sdpa() -> None:
    """No softmax_method: softmax layers are torch's SDPA exactly, as before the option existed."""
    method = LinVideo(linear_layers=LINEAR)
    for ctx, q, k, v in _calls()[:4]:
        if ctx.layer not in LINEAR:
            assert torch.equal(method(q, k, v, ctx), torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert method.params()["softmax_method"] == "sdpa"


def test_radial_in_the_softmax_layers_sees_each_call_and_keeps_its_own_schedule() -> None:
    """Radial's contexts are LinVideo's (softmax layers only); its warm-up (0.24 of 5 steps = 1) and dense first
    layer run dense; elsewhere its output and density are radial's own. Linear layers record 0."""
    combined = LinVideo(linear_layers=LINEAR, softmax_method="radial")
    seen: list[AttentionContext] = []
    attend = combined.softmax.attend
    combined.softmax.attend = lambda q, k, v, ctx: seen.append(ctx) or attend(q, k, v, ctx)  # type: ignore[method-assign]
    outputs = _run(combined)
    alone = build_method("radial")
    sparse_calls = [(c, q, k, v) for c, q, k, v in _calls() if c.layer not in LINEAR and c.layer >= 1 and c.step >= 1]
    assert seen == [ctx for ctx, *_ in sparse_calls]
    radial_density = alone.attend(*sparse_calls[0][1:], sparse_calls[0][0])[1]
    assert 0.0 < radial_density < 1.0
    rows = {(layer, step): total / calls for layer, step, total, calls in combined.density.entries()}
    for (layer, step), density in rows.items():
        expected = 0.0 if layer in LINEAR else 1.0 if layer == 0 or step == 0 else radial_density
        assert density == pytest.approx(expected), (layer, step)
    by_context = {ctx: out for (ctx, *_), out in zip(_calls(), outputs, strict=True)}
    for ctx, q, k, v in sparse_calls[:3]:
        assert torch.equal(by_context[ctx], alone.attend(q, k, v, ctx)[0])


def _linvideo_radial() -> LinVideo:
    return LinVideo(linear_layers=LINEAR, softmax_method="radial")


def _dmd2_from_linvideo_radial() -> Dmd2Generator:
    method = Dmd2Generator()
    method.configure((1.0, 0.5), _linvideo_radial(), "a LinVideo generator")
    return method


@pytest.mark.parametrize(("build", "linear"), [
    (_linvideo_radial, LINEAR),
    (lambda: build_method("dmd2", attention="radial"), ()),
    (_dmd2_from_linvideo_radial, LINEAR),
], ids=["linvideo", "dmd2", "dmd2-from-linvideo"])  # fmt: skip
def test_the_outer_methods_dense_decision_includes_radials_own_rules(build: Callable[[], AttentionMethod],
                                                                     linear: tuple[int, ...]) -> None:  # fmt: skip
    """The processor decides dense-or-not once per step, outside a compiled forward, by the outer method's
    runs_dense: in the layers that run radial that is radial's warm-up (step 0 of 5) and dense first layer, in linear
    layers the schedule alone (before LinVideo's untrained state exists too). Handed that decision, every call
    gives the output the method gives deciding for itself."""
    method = build()
    decisions = {(ctx.layer, ctx.step): method.runs_dense(ctx) for ctx, *_ in _calls()}
    assert decisions == {(layer, step): layer not in linear and (layer == 0 or step == 0)
                         for layer in range(LAYERS) for step in range(STEPS)}  # fmt: skip
    for ctx, q, k, v in _calls():
        decided = method.run(q, k, v, ctx, method.runs_dense(ctx))
        assert torch.equal(decided[0], method.run(q, k, v, ctx)[0]) and decided[1] == method.run(q, k, v, ctx)[1]


SVG2 = KEEP_ALL["svg2"] | {"top_p": 0.5}


def _linvideo_svg2() -> LinVideo:
    return LinVideo(linear_layers=LINEAR, softmax_method="svg2", softmax_params=SVG2)


def _dmd2_from_linvideo_svg2() -> Dmd2Generator:
    method = Dmd2Generator()
    method.configure((1.0, 0.5), _linvideo_svg2(), "a LinVideo generator")
    return method


OUTER_SVG2 = pytest.mark.parametrize("build", [
    _linvideo_svg2, lambda: build_method("dmd2", attention="svg2", attention_params=SVG2), _dmd2_from_linvideo_svg2,
], ids=["linvideo", "dmd2", "dmd2-from-linvideo"])  # fmt: skip


@OUTER_SVG2
def test_a_new_video_starts_the_inner_method_afresh(build: Callable[[], AttentionMethod]) -> None:
    """begin_video reaches the method an outer one runs: svg2 warm-starts k-means from the previous step within a
    video, never from the previous video, so a video's calls made after another video equal those made first."""
    method = build()
    first = [method.run(q, k, v, ctx)[0] for ctx, q, k, v in _calls()]
    method.begin_video()
    again = [method.run(q, k, v, ctx)[0] for ctx, q, k, v in _calls()]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


@OUTER_SVG2
def test_a_route_resolved_before_the_call_gives_the_calls_own_output(build: Callable[[], AttentionMethod]) -> None:
    """The processor resolves each layer's route before the forward (LinVideo's branch and feature maps, svg2's
    centroid cache inside them): a video whose calls get it equals one whose calls resolve it themselves."""
    method = build()
    resolving = [method.run(q, k, v, ctx)[0] for ctx, q, k, v in _calls()]
    method.begin_video()
    routed = [method.run(q, k, v, replace(ctx, route=method.route(ctx)))[0] for ctx, q, k, v in _calls()]
    assert all(torch.equal(a, b) for a, b in zip(resolving, routed, strict=True))


def test_linvideo_ignores_a_route_resolved_for_a_state_since_replaced() -> None:
    """A route holds the feature maps of the state it was resolved from: once another state is attached (here with
    every layer softmax), a call handed the old route runs by the new state."""
    method = LinVideo(linear_layers=LINEAR)
    ctx, q, k, v = next(call for call in _calls() if call[0].layer in LINEAR)
    method.run(q, k, v, ctx)  # builds the untrained state
    stale = replace(ctx, route=method.route(ctx))
    softmax_only = TransferState(LAYERS, HEADS, HEAD_DIM).requires_grad_(False)
    softmax_only.set_linear(())
    method.attach(softmax_only, converted=True)
    assert torch.equal(method.run(q, k, v, stale)[0], torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_the_users_dense_layers_reach_the_softmax_method() -> None:
    """--dense-layers 2 keeps layer 2 dense after radial's warm-up too (the inner method holds the schedule)."""
    combined = LinVideo(Schedule(dense_layers=(2,)), linear_layers=LINEAR, softmax_method="radial")
    _run(combined)
    per_layer = combined.density.per_layer()
    assert per_layer[2] == 1.0 and per_layer[3] < 1.0 and per_layer[1] == 0.0


def test_the_record_names_the_softmax_method_and_its_resolved_parameters() -> None:
    method = build_method("linvideo", linear_layers="1", softmax_method="radial-attention",
                          softmax_params='{"decay_factor": "0.5"}')  # fmt: skip
    params = method.params()
    assert params["softmax_method"] == "radial" and params["softmax_params"]["decay_factor"] == 0.5
    assert params["softmax_params"]["warmup_fraction"] == 0.24


def test_softmax_params_are_typed_by_the_softmax_methods_schema() -> None:
    """Spellings of one value give one typed spec entry (so one spec hash)."""
    cls = METHODS.get("linvideo")
    typed = [
        cls.parse_params({"softmax_method": "xattn", "softmax_params": text})
        for text in ('{"threshold": 1, "keep_first_block": "no"}', {"threshold": "1.0", "keep_first_block": False})
    ]
    assert typed[0] == typed[1] == {"softmax_method": "xattn",
                                    "softmax_params": {"threshold": 1.0, "keep_first_block": False}}  # fmt: skip


def test_the_softmax_layers_take_the_dense_and_sparse_methods_only() -> None:
    assert set(softmax_methods()) >= {"sdpa", "math", "fa2", "cudnn", "radial", "xattn", "svg", "svg2", "dfa"}
    assert not {"linear", "linvideo", "sla"} & set(softmax_methods())


@pytest.mark.parametrize(("params", "fragments"), [
    ({"softmax_method": "radail"}, ["softmax_method must be a registered attention method", "Did you mean 'radial'"]),
    ({"softmax_method": "linear"}, ["'linear' runs linear attention", "take one of cudnn, dfa, fa2, math, radial"]),
    ({"softmax_method": "linvideo"}, ["'linvideo' runs linear attention"]),
    ({"softmax_method": "sla"}, ["'sla' needs its own fine-tuned state", "take one of"]),
    ({"softmax_params": '{"decay_factor": 0.5}'}, ["softmax_params needs softmax_method"]),
    ({"softmax_method": "radial", "softmax_params": '{"decay": 0.5}'},
     ["linvideo softmax_params: method 'radial' has no parameter 'decay'", "Did you mean 'decay_factor'"]),
    ({"softmax_method": "radial", "softmax_params": '{"decay_factor": "nan"}'},
     ["radial: decay_factor must be a finite number"]),
    ({"softmax_method": "radial", "softmax_params": "decay_factor=0.5"}, ["softmax_params must be a JSON object"]),
    ({"softmax_method": "dfa"}, ["linvideo softmax_method 'dfa' (its parameters go in softmax_params)",
                                 "dfa needs a calibration plan"]),
])  # fmt: skip
def test_bad_softmax_settings_are_one_line_errors(params: dict[str, str], fragments: list[str]) -> None:
    with pytest.raises(HarnessError) as caught:
        build_method("linvideo", **params)
    message = str(caught.value)
    assert "\n" not in message and all(fragment in message for fragment in fragments), message


def test_a_softmax_method_that_cannot_run_here_is_refused_before_any_model() -> None:
    with pytest.raises(UnsupportedError, match="linvideo softmax_method: method 'cudnn' cannot run on cpu"):
        build_method("linvideo", softmax_method="cudnn").check_supported(torch.device("cpu"), torch.float32)
    with pytest.raises(HarnessError, match="radial: dense_first_layers 9 exceeds the model's 8 layers"):
        build_method("linvideo", softmax_method="radial", softmax_params={"dense_first_layers": 9}).validate_for(8, 4)


# -- the CLI ------------------------------------------------------------------------------------


def test_bench_run_linvideo_with_radial_on_the_toy_records_the_softmax_method(bench: Invoke, tmp_path: Path) -> None:
    """The shipped default conversion, radial in its softmax layers: the spec and record name radial and its
    parameters; linear layers record density 0, softmax layers radial's (dense on its first layer)."""
    bench("run", "--method", "linvideo", "--model", "toy", "--param", "softmax_method=radial", "--param",
          'softmax_params={"decay_factor": 0.5}', "--prompt", PROMPT, "--seeds", "0", "--steps", "2", "--eval", "none",
          "--device", "cpu", "--no-progress", "--runs-dir", tmp_path)  # fmt: skip
    [record] = records_in(tmp_path)
    assert record["spec"]["method_params"] == {"softmax_method": "radial", "softmax_params": {"decay_factor": 0.5}}
    resolved = record["method_params_resolved"]
    assert resolved["softmax_method"] == "radial" and resolved["softmax_params"]["decay_factor"] == 0.5
    per_layer = {int(layer): value for layer, value in record["density"]["per_layer"].items()}
    linear = set(resolved["linear_layers"])
    assert linear and all(per_layer[layer] == 0.0 for layer in linear)
    softmax = sorted(set(per_layer) - linear)
    if 0 in softmax:
        assert per_layer[0] == 1.0  # radial's dense first layer
    assert any(0.0 < per_layer[layer] < 1.0 for layer in softmax), per_layer  # radial's sparse step (step 1 of 2)


@pytest.mark.parametrize(("param", "fragment"), [
    ("softmax_method=radail", "Did you mean 'radial'"),
    ("softmax_method=linear", "'linear' runs linear attention, not softmax; the softmax layers take one of"),
    ('softmax_params={"decay_factor": 0.5}', "softmax_params needs softmax_method"),
])  # fmt: skip
def test_bench_run_refuses_a_bad_softmax_method_in_one_line(param: str, fragment: str, bench: Invoke,
                                                            tmp_path: Path) -> None:  # fmt: skip
    result = bench("run", "--method", "linvideo", "--model", "toy", "--param", param, "--runs-dir", tmp_path, expect=2)
    error = result.stderr.strip()
    assert fragment in normalise(error) and len(error.splitlines()) == 1
    assert not list(tmp_path.iterdir())


def test_bench_latency_takes_the_softmax_method_in_method_key_form(bench: Invoke) -> None:
    result = bench("latency", "--model", "wan-tiny", "--device", "cpu", "--methods", "sdpa,linvideo", "--param",
                   "linvideo.linear_layers=[1]", "--param", "linvideo.softmax_method=radial", "--param",
                   'linvideo.softmax_params={"dense_first_layers": 0}', "--repeats", "1", "--warmup", "0",
                   "--json")  # fmt: skip
    entry = json.loads(result.stdout)["methods"]["linvideo"]
    params = entry["params"]
    assert params["softmax_method"] == "radial" and params["softmax_params"]["dense_first_layers"] == 0
    assert 0.0 < entry["density"] < 0.5  # layer 1 linear (0), layer 0 radial at step 0 (no warm-up in one step)
