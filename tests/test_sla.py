"""SLA: block classes, both branches against O(N^2) fp64 references, density, schedule, state files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harness.errors import HarnessError
from methods import AttentionContext, Schedule, TokenGrid, build_method
from methods.sla import SlaProjections, classify_blocks, marginal_linear_attention, sla_block_size

B, H, N, D = 2, 2, 44, 8  # 44 tokens in blocks of 8: the last block is ragged (4 tokens)
BLOCK = 8


def ctx(step: int = 1, layer: int = 0) -> AttentionContext:
    return AttentionContext(layer=layer, num_layers=2, step=step, num_steps=3, timestep=0.5, cfg_branch="cond",
                            grid=TokenGrid(1, 4, 11))  # fmt: skip


def qkv() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(torch.randn(B, H, N, D) for _ in range(3))  # type: ignore[return-value]


def token_mask(blocks: torch.Tensor) -> torch.Tensor:
    """Expand a (B, H, nq, nk) block table to the (B, H, N, N) token mask."""
    return blocks.repeat_interleave(BLOCK, dim=-2).repeat_interleave(BLOCK, dim=-1)[..., :N, :N]


def reference_classes(q: torch.Tensor, k: torch.Tensor, n_critical: int, n_skipped: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Classes written out block by block: means over each block's tokens, centred k, ranked per row."""
    centred = k.double() - k.double().mean(dim=-2, keepdim=True)
    starts = range(0, N, BLOCK)
    pooled_q = torch.stack([q.double()[..., s : s + BLOCK, :].mean(dim=-2) for s in starts], dim=-2)
    pooled_k = torch.stack([centred[..., s : s + BLOCK, :].mean(dim=-2) for s in starts], dim=-2)
    order = (pooled_q @ pooled_k.transpose(-2, -1)).argsort(dim=-1, descending=True)
    critical = torch.zeros(order.shape, dtype=torch.bool).scatter(-1, order[..., :n_critical], True)
    skipped = torch.zeros(order.shape, dtype=torch.bool)
    if n_skipped:
        skipped.scatter_(-1, order[..., -n_skipped:], True)
    return critical, ~critical & ~skipped


def softmax_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
                      ) -> torch.Tensor:  # fmt: skip
    scores = q.double() @ k.double().transpose(-2, -1) / D**0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v.double()


def linear_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """O(N^2) linear attention over ``mask``: rows of phi(q) phi(k)^T, masked, normalised, times v."""
    weights = (q.double().softmax(dim=-1) @ k.double().softmax(dim=-1).transpose(-2, -1)) * mask
    return weights / (weights.sum(dim=-1, keepdim=True) + 1e-6) @ v.double()


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def test_classes_match_a_block_by_block_reference() -> None:
    """6 key blocks: critical 1/3 -> 2 critical, negligible 1/3 -> 2 skipped, 2 marginal per row."""
    q, k, _ = qkv()
    critical, marginal = classify_blocks(q, k, BLOCK, 1 / 3, 1 / 3)
    ref_critical, ref_marginal = reference_classes(q, k, 2, 2)
    assert torch.equal(critical, ref_critical) and torch.equal(marginal, ref_marginal)
    assert (critical.sum(-1) == 2).all() and (marginal.sum(-1) == 2).all() and not (critical & marginal).any()


def test_every_row_keeps_at_least_one_critical_block() -> None:
    critical, _ = classify_blocks(*qkv()[:2], BLOCK, 0.01, 0.0)
    assert (critical.sum(-1) == 1).all()


def test_linear_branch_matches_quadratic_reference() -> None:
    """Marginal linear attention equals the O(N^2) masked, row-normalised phi(q) phi(k)^T v."""
    q, k, v = qkv()
    _, marginal = classify_blocks(q, k, BLOCK, 0.2, 0.2)
    out = marginal_linear_attention(q, k, v, marginal, BLOCK)
    assert rel(out, linear_reference(q, k, v, token_mask(marginal))) < 1e-5


def test_linear_branch_is_fp32_under_bf16_autocast() -> None:
    """Under bf16 autocast (fine-tuning's CUDA default; CPU autocast here) the linear branch still sums in
    fp32: relative error against the float64 reference <= 1e-5."""
    q, k, v = (torch.randn(1, H, 512, D) for _ in range(3))
    _, marginal = classify_blocks(q, k, BLOCK, 0.05, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = marginal_linear_attention(q, k, v, marginal, BLOCK)
    mask = marginal.repeat_interleave(BLOCK, dim=-2).repeat_interleave(BLOCK, dim=-1)
    assert out.dtype == torch.float32 and rel(out, linear_reference(q, k, v, mask)) <= 1e-5


def test_all_critical_equals_dense() -> None:
    """critical = 1 keeps every block exact: SLA is dense attention, density 1."""
    method = build_method("sla", critical=1.0, negligible=0.0, block_size=BLOCK)
    q, k, v = qkv()
    assert rel(method(q, k, v, ctx()), softmax_reference(q, k, v)) < 1e-5
    assert method.density.mean() == 1.0


@pytest.mark.parametrize("trained", [False, True])
def test_output_is_sparse_branch_plus_projected_linear_branch(trained: bool) -> None:
    """O = softmax over critical blocks + proj(linear over marginal blocks); untrained proj is zero."""
    method = build_method("sla", critical=1 / 3, negligible=1 / 6, block_size=BLOCK)
    state = SlaProjections(2, D)
    if trained:
        torch.nn.init.normal_(state.proj[0].weight)
        torch.nn.init.normal_(state.proj[0].bias)
    method.attach(state.requires_grad_(False), trained=trained)
    q, k, v = qkv()
    critical, marginal = reference_classes(q, k, 2, 1)
    expected = softmax_reference(q, k, v, token_mask(critical))
    if trained:
        linear = linear_reference(q, k, v, token_mask(marginal))
        expected = expected + linear @ state.proj[0].weight.double().T + state.proj[0].bias.double()
    assert rel(method(q, k, v, ctx()), expected) < 1e-5


def test_recorded_density_is_the_critical_mask_density() -> None:
    """The density logged is the exact share of the critical token mask (ragged last block included)."""
    method = build_method("sla", critical=1 / 3, negligible=0.1, block_size=BLOCK)
    q, k, v = qkv()
    method(q, k, v, ctx())
    critical, _ = reference_classes(q, k, 2, 0)
    assert method.density.mean() == pytest.approx(float(token_mask(critical).double().mean()), abs=1e-12)


def test_schedule_runs_dense_on_warmup_steps_and_dense_layers() -> None:
    method = build_method("sla", Schedule(dense_warmup_steps=1, dense_layers=(1,)), block_size=BLOCK)
    for step in range(3):
        for layer in range(2):
            q, k, v = qkv()
            dense = step == 0 or layer == 1
            assert (rel(method(q, k, v, ctx(step, layer)), softmax_reference(q, k, v)) < 1e-5) == dense
    assert method.density.per_layer()[1] == 1.0 and method.density.per_step()[1] < 1.0


def test_paper_block_size_at_wan_scale_and_toy_block() -> None:
    assert sla_block_size(32760) == 64 and sla_block_size(75600) == 64
    assert sla_block_size(512) == 8


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"critical": 0.0}, r"critical must be in \(0, 1\]"),
        ({"critical": 0.6, "negligible": 0.5}, "critical \\+ negligible must be <= 1"),
        ({"negligible": -0.1}, r"negligible must be in \[0, 1\]"),
        ({"block_size": 0}, "block_size must be"),
        ({"backend": "triton"}, "backend must be one of"),
    ],
)
def test_bad_parameters_are_clear_errors(params: dict, message: str) -> None:
    with pytest.raises(HarnessError, match=message):
        build_method("sla", **params)


def test_state_round_trip(tmp_path: Path) -> None:
    """Saved projections load into a fresh method, marked trained."""
    method = build_method("sla")
    state = SlaProjections(3, D)
    torch.nn.init.normal_(state.proj[2].weight)
    method.attach(state, trained=True)
    method.save_state(tmp_path / "sla.safetensors")
    loaded = build_method("sla")
    loaded.load_state(tmp_path / "sla.safetensors")
    assert loaded.trained and torch.equal(loaded.state.proj[2].weight, state.proj[2].weight)


def test_run_without_checkpoint_is_refused(bench, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = bench("run", "--method", "sla", "--model", "wan-tiny", "--device", "cpu", "--runs-dir", tmp_path,
                   expect=2)  # fmt: skip
    assert "needs a trained checkpoint" in " ".join(result.output.split())


def test_flex_path_with_blocks_smaller_than_its_tiles_equals_the_masked_path() -> None:
    """8-token blocks over 300 tokens (ragged) run on compiled Flex regrouped into 128-tiles: same output."""
    q, k, v = (torch.randn(1, H, 300, D) for _ in range(3))
    flex, masked = (build_method("sla", backend=backend, block_size=BLOCK) for backend in ("flex", "masked"))
    assert rel(flex(q, k, v, ctx()), masked(q, k, v, ctx()).double()) <= 1e-5
    assert flex.density.mean() == masked.density.mean()


def test_fine_tune_then_run_from_the_checkpoint(bench, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """bench train --method sla writes a checkpoint whose projections moved off zero; bench run loads it."""
    from safetensors.torch import load_file

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    out = tmp_path / "sla"
    args = ["train", "--method", "sla", "--model", "wan-tiny", "--prompt-file", prompts, "--steps", 2,
            "--batch-size", 1, "--checkpoint-every", 1, "--out", out, "--device", "cpu", "--no-progress",
            "--param", "block_size=4"]  # fmt: skip
    bench(*args)
    projections = load_file(out / "sla.safetensors")
    assert any(tensor.abs().sum() > 0 for tensor in projections.values())
    assert json.loads((out / "training_state.json").read_text())["step"] == 2
    bench(*args)  # finished: resumes to the end at once
    result = bench("run", "--method", "sla", "--model", "wan-tiny", "--device", "cpu", "--checkpoint", out,
                   "--param", "block_size=4", "--runs-dir", tmp_path / "runs", "--json", "--no-progress")  # fmt: skip
    record = json.loads(result.stdout)["record"]
    assert record["method_params_resolved"]["trained"] is True and 0 < record["density"]["mean"] < 1


def test_gpu_script_smoke_mode(tmp_path: Path) -> None:
    """The DFA/SLA GPU script runs its CPU smoke mode: Flex checked against masked dense (two computations: their
    errors are not 0, as when the smoke mode compared masked dense with itself; the forward only, since Flex has no
    CPU backward; on Flex's own tiles and on flex-tuned), SLA timed in its parts (no linear kernel on the CPU), and
    the JSON is complete."""
    from harness.benchmarks.dfa_sla_gpu import main

    main(["--out", str(tmp_path), "--device", "cpu", "--repeats", "1"])
    result = json.loads((tmp_path / "dfa_sla_gpu.json").read_text())
    assert set(result["correctness"]) == {"dfa_window", "sla_output", "sla_output_flex_tuned"}
    assert all(0 < error < result["tolerance"] for error in result["correctness"].values())
    assert result["status"] == "complete" and set(result["shapes"]["smoke"]["calls"]) == {
        "dense", "dfa_window", "dfa_refresh", "sla", "sla_selection", "sla_critical_64_tiles",
        "sla_critical_128_tiles", "sla_linear_torch", "sla_torch_linear"}  # fmt: skip
