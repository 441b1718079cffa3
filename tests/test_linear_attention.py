"""Linear attention against its O(N^2) reference, the feature maps by hand, and the `linear` method."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from numerics import relative_error

from harness.errors import HarnessError
from methods import METHODS, AttentionContext, TokenGrid, build_method
from methods.kernels.linear_attention import (
    KERNELS,
    HedgehogFeatureMap,
    TaylorFeatureMap,
    build_feature_map,
    linear_attention,
    naive_linear_attention,
)
from methods.linear import LINEAR_KERNELS, LinearAttention

B, H, N, D = 2, 3, 37, 16
SHAPE = (B, H, N, D)
BF16_UNIT_ROUNDOFF = 2.0**-8  # 8 significant bits, round to nearest


def ctx(layer: int, num_layers: int = 3, step: int = 0) -> AttentionContext:
    return AttentionContext(
        layer=layer, num_layers=num_layers, step=step, num_steps=2, timestep=1.0, cfg_branch="cond",
        grid=TokenGrid(1, N, 1),
    )  # fmt: skip


def hand_features(kernel: str, x: torch.Tensor) -> torch.Tensor:
    """The untrained feature maps, written out independently of the module."""
    if kernel == "elu":
        return torch.where(x > 0, x + 1, x.exp())
    if kernel == "relu":
        return x.clamp(min=0)
    if kernel == "hedgehog":
        return torch.cat([x.softmax(-1), (-x).softmax(-1)], dim=-1)
    raise AssertionError(kernel)


@pytest.mark.parametrize("kernel", KERNELS)
def test_linear_attention_matches_naive_reference(kernel: str) -> None:
    """For every kernel, O(N) linear attention in fp32 equals the fp64 O(N^2) form to relative error <= 1e-5."""
    phi = build_feature_map(kernel, H, D, trainable=True)
    if isinstance(phi, HedgehogFeatureMap):
        with torch.no_grad():  # away from identity, so the per-head projection is exercised
            phi.weight += 0.3 * torch.randn_like(phi.weight)
    q, k, v = (torch.randn(SHAPE) for _ in range(3))
    with torch.no_grad():
        phi_q, phi_k = phi(q), phi(k)
    assert phi_q.shape == (B, H, N, phi.feature_dim(D))
    out = linear_attention(phi_q, phi_k, v)
    ref = naive_linear_attention(phi_q, phi_k, v)
    assert out.shape == SHAPE and out.dtype == torch.float32
    rel = (out.double() - ref).norm() / ref.norm()
    assert rel <= 1e-5, f"{kernel}: relative error {rel:.3g}"


def test_bf16_inputs_are_accumulated_in_fp32() -> None:
    """bf16 inputs give the fp32 result rounded once to bf16: every element within one bf16 rounding.

    Rounding the key-value summary or the denominator to bf16 along the way breaks this bound by
    orders of magnitude on near-zero outputs.
    """
    q, k, v = (torch.randn(SHAPE) for _ in range(3))
    phi_q, phi_k, v = (F.elu(q) + 1).bfloat16(), (F.elu(k) + 1).bfloat16(), v.bfloat16()
    out = linear_attention(phi_q, phi_k, v)
    ref = linear_attention(phi_q.float(), phi_k.float(), v.float())
    assert out.dtype == torch.bfloat16
    error = (out.float() - ref).abs()
    bound = (BF16_UNIT_ROUNDOFF + 1e-5) * ref.abs() + 1e-6
    assert (error <= bound).all(), f"worst error / bound {(error / bound).max():.3g}"


def test_linear_attention_is_fp32_under_bf16_autocast() -> None:
    """Under bf16 autocast (the trainer's CUDA default; CPU autocast here) the sums still run in fp32:
    relative error against float64 <= 1e-5 at N = 4,096 (bf16 matmuls are off by ~1e-3)."""
    phi_q, phi_k = (F.elu(torch.randn(1, 2, 4096, 32)) + 1 for _ in range(2))
    v = torch.randn(1, 2, 4096, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_attention(phi_q, phi_k, v)
    q64, k64, v64 = phi_q.double(), phi_k.double(), v.double()
    ref = (q64 @ (k64.transpose(-2, -1) @ v64)) / (q64 @ k64.sum(dim=-2).unsqueeze(-1) + 1e-6)
    assert out.dtype == torch.float32
    assert relative_error(out, ref) <= 1e-5


@pytest.mark.parametrize("kernel", KERNELS)
def test_feature_maps_are_fp32_under_bf16_autocast(kernel: str) -> None:
    """Under bf16 autocast every map (hedgehog's per-head projection included) computes in fp32 and
    returns its input's dtype: relative error against float64 <= 1e-6."""
    phi = build_feature_map(kernel, H, D, trainable=True)
    x = torch.randn(SHAPE)
    with torch.no_grad():
        if isinstance(phi, HedgehogFeatureMap):
            phi.weight += 0.3 * torch.randn_like(phi.weight)
            ref = hand_features(kernel, torch.einsum("bhnd,hde->bhne", x.double(), phi.weight.double()))
        elif kernel == "taylor":
            ref = phi(x.double())
        else:
            ref = hand_features(kernel, x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = phi(x)
    assert features.dtype == torch.float32
    assert relative_error(features, ref) <= 1e-6


def test_taylor_map_of_large_fp16_inputs_is_finite() -> None:
    """max|x| = 260 in fp16: x_i x_j (67,600) overflows fp16, so the map is formed in fp32 and returned
    in fp16 (finite, within fp16 rounding of the float64 map)."""
    x = torch.randn(SHAPE)
    x = (x * (260.0 / x.abs().max())).half()
    features = TaylorFeatureMap()(x)
    assert features.dtype == torch.float16 and torch.isfinite(features).all()
    assert relative_error(features, TaylorFeatureMap()(x.double())) <= 1e-3


def test_taylor_inner_product_is_second_order_exp() -> None:
    """phi(q) . phi(k) = 1 + s + s^2 / 2 with s = q.k / sqrt(d), for every query-key pair."""
    q, k = torch.randn(1, 2, 5, D, dtype=torch.float64), torch.randn(1, 2, 7, D, dtype=torch.float64)
    phi = build_feature_map("taylor", 2, D)
    assert phi.feature_dim(D) == 1 + D + D * D
    s = (q @ k.transpose(-2, -1)) / math.sqrt(D)
    torch.testing.assert_close(phi(q) @ phi(k).transpose(-2, -1), 1 + s + s**2 / 2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("trainable", [True, False])
def test_hedgehog_at_identity_is_softmax_pair(trainable: bool) -> None:
    """At identity init (trainable) and with the fixed identity map, phi(x) = [softmax(x), softmax(-x)]."""
    x = torch.randn(SHAPE)
    phi = build_feature_map("hedgehog", H, D, trainable=trainable)
    with torch.no_grad():
        features = phi(x)
    assert phi.feature_dim(D) == 2 * D
    torch.testing.assert_close(features, hand_features("hedgehog", x), rtol=1e-6, atol=1e-7)


def test_hedgehog_weight_is_trainable_per_head_parameter() -> None:
    """A trainable hedgehog map has exactly one parameter, W (H, D, D), and the loss reaches it."""
    phi = build_feature_map("hedgehog", H, D, trainable=True)
    params = dict(phi.named_parameters())
    assert list(params) == ["weight"]
    assert params["weight"].shape == (H, D, D) and params["weight"].requires_grad
    (phi(torch.randn(SHAPE)) * torch.randn(B, H, N, 2 * D)).sum().backward()
    assert params["weight"].grad is not None and params["weight"].grad.abs().sum() > 0


def test_hedgehog_heads_have_separate_weights() -> None:
    """Changing head 1's W changes head 1's features only."""
    phi = build_feature_map("hedgehog", H, D, trainable=True)
    x = torch.randn(SHAPE)
    with torch.no_grad():
        before = phi(x)
        phi.weight[1] += torch.randn(D, D)
        after = phi(x)
    assert torch.equal(before[:, [0, 2]], after[:, [0, 2]])
    assert not torch.allclose(before[:, 1], after[:, 1])


def test_untrained_hedgehog_has_no_parameters() -> None:
    """trainable=False is the fixed identity map: nothing to train or save."""
    assert list(build_feature_map("hedgehog", H, D, trainable=False).parameters()) == []


@pytest.mark.parametrize("kernel", LINEAR_KERNELS)
def test_linear_method_linearises_only_chosen_layers(kernel: str) -> None:
    """Layer 1 gets untrained linear attention with the hand-written kernel; layers 0 and 2 equal SDPA."""
    method = build_method("linear", kernel=kernel, layers="1")
    q, k, v = (torch.randn(SHAPE) for _ in range(3))
    for layer in range(3):
        out = method(q, k, v, ctx(layer))
        if layer == 1:
            expected = naive_linear_attention(hand_features(kernel, q), hand_features(kernel, k), v).float()
        else:
            expected = F.scaled_dot_product_attention(q, k, v)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=f"layer {layer}")
    # the linear and softmax outputs differ, so the check above tells them apart
    assert not torch.allclose(method(q, k, v, ctx(1)), F.scaled_dot_product_attention(q, k, v), atol=1e-3)


def test_linear_method_density_is_zero_on_linear_layers() -> None:
    """Density per layer is 0 where linear attention ran and 1 where dense attention ran."""
    method = build_method("linear", layers=[0, 2])
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    for step in range(2):
        for layer in range(3):
            method(q, k, v, ctx(layer, step=step))
    assert method.density.per_layer() == {0: 0.0, 1: 1.0, 2: 0.0}


@pytest.mark.parametrize(
    ("layers", "recorded"),
    [("all", "all"), ("2,0, 2", [0, 2]), (3, [3]), ([4, 1], [1, 4]), ((5,), [5])],
)
def test_linear_method_parses_layers_from_cli_values(layers: object, recorded: object) -> None:
    """--param values arrive as strings, ints or JSON lists; params() records them sorted and unique."""
    assert build_method("linear", layers=layers).params() == {"kernel": "elu", "layers": recorded}


@pytest.mark.parametrize(("layers", "message"), [("0,-1", ">= 0"), (-2, ">= 0"), ("1,x", "integers"), ("", "empty")])
def test_linear_method_rejects_bad_layers(layers: object, message: str) -> None:
    """Negative, non-integer or empty layer selections are a HarnessError."""
    with pytest.raises(HarnessError, match=message):
        build_method("linear", layers=layers)


def test_linear_method_rejects_layers_the_model_lacks() -> None:
    """A layer index beyond the model fails in validation, before any model is built."""
    method = build_method("linear", layers="1,7")
    with pytest.raises(HarnessError, match=r"\[7\] do not exist"):
        method.validate_for(num_layers=3, num_steps=4)


def test_bench_run_refuses_linear_layers_beyond_the_model(bench, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """`bench run --method linear --param layers=...` on the 8-layer toy model fails with exit 2."""
    result = bench("run", "--model", "toy", "--method", "linear", "--param", "layers=[2,9]", "--runs-dir",
                   tmp_path, expect=2)  # fmt: skip
    assert "[9] do not exist" in " ".join(result.output.split())


@pytest.mark.parametrize(
    ("build", "suggestion"),
    [
        (lambda: build_feature_map("hedgehgo", H, D), "'hedgehog'"),
        (lambda: build_feature_map("tailor", H, D), "'taylor'"),
        (lambda: build_method("linear", kernel="elo"), "'elu'"),
    ],
)
def test_unknown_kernel_suggests_closest(build, suggestion: str) -> None:  # type: ignore[no-untyped-def]
    """An unknown kernel name is a HarnessError that names the closest kernel."""
    with pytest.raises(HarnessError, match=f"Did you mean {suggestion}"):
        build()


def test_linear_method_refuses_taylor_kernel() -> None:
    """taylor is a known kernel but not offered by the untrained baseline; the error lists the accepted ones."""
    with pytest.raises(HarnessError, match="elu, relu, hedgehog"):
        build_method("linear", kernel="taylor")


def test_linear_method_is_registered_with_alias() -> None:
    """'linear-attention' resolves to the linear method, declared as linear sparsity on cpu and cuda."""
    cls = METHODS.get("linear-attention")
    assert cls is LinearAttention and METHODS.canonical("linear-attention") == "linear"
    assert cls.capabilities.sparsity == "linear" and cls.capabilities.devices == ("cpu", "cuda")
