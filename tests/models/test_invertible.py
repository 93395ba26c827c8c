"""The reversible backbone: exact inverses, custom-backward gradients equal plain autograd, and ConditionalUNet."""

from __future__ import annotations

import pytest
import torch

from synthmed.models.cond_unet import ConditionalUNet
from synthmed.models.invertible import (AdditiveCoupling, CheckerboardAttentionCoupling, invert_layers,
                                        reversible_sequence, run_layers)

CTX_DIM = 6


def tiny_unet(dims: int = 2, backbone: str = "invertible", dtype=torch.float32, **kw) -> ConditionalUNet:
    torch.manual_seed(0)
    base = dict(dims=dims, sample_size=8, in_channels=2, block_out_channels=(8, 16), layers_per_block=1,
                cross_attention_dim=CTX_DIM, attention_levels=(1,), attention_head_dim=2, norm_num_groups=4,
                backbone=backbone)
    model = ConditionalUNet(**{**base, **kw}).to(dtype)
    return model


def randomize_(module: torch.nn.Module, scale: float = 0.2) -> None:
    # Zero-initialised output layers make every coupling the identity at init: perturb so the tests see real maps.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def body_inputs(model: ConditionalUNet, size: int = 8, batch: int = 2):
    g = torch.Generator().manual_seed(2)
    dtype = next(model.parameters()).dtype
    c0 = model.config.block_out_channels[0]
    temb_dim = 4 * c0
    x = torch.randn(batch, c0, *([size] * model.config.dims), generator=g, dtype=dtype)
    temb = torch.randn(batch, temb_dim, generator=g, dtype=dtype)
    ctx = torch.randn(batch, 3, CTX_DIM, generator=g, dtype=dtype)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]][:batch])
    return x, temb, ctx, mask


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_reversible_body_round_trip(dims, dtype, tol):
    model = tiny_unet(dims, dtype=dtype, invertible_attention=True, layers_per_block=2).eval()
    randomize_(model)
    x, temb, ctx, mask = body_inputs(model)
    with torch.no_grad():
        (y,) = run_layers(model.body, [x], temb, ctx, mask)
        (back,) = invert_layers(model.body, [y], temb, ctx, mask)
    assert y.shape == x.shape and not torch.allclose(y, x, atol=1e-3)
    assert (back - x).abs().max().item() < tol * max(1.0, x.abs().max().item())


@pytest.mark.parametrize("dims,dropout", [(2, 0.0), (3, 0.0), (2, 0.3)])
def test_reversible_gradients_equal_plain_autograd(dims, dropout):
    model = tiny_unet(dims, dtype=torch.float64, invertible_attention=True, dropout=dropout).train()
    randomize_(model)
    x, temb, ctx, mask = body_inputs(model)
    params = list(model.body.parameters())

    def grads(run):
        leaves = [t.clone().requires_grad_() for t in (x, temb, ctx)]
        torch.manual_seed(123)  # same dropout masks in both runs (the reversible one must restore them)
        (y,) = run(model.body, [leaves[0]], leaves[1], leaves[2], mask)
        w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view(y.shape)
        loss = (y * w).sum() + y.pow(2).sum()
        return y.detach(), torch.autograd.grad(loss, [*leaves, *params])

    y_ref, g_ref = grads(run_layers)
    y_rev, g_rev = grads(reversible_sequence)
    assert torch.allclose(y_rev, y_ref, atol=1e-12)
    for name, a, b in zip(["x", "temb", "ctx"] + [n for n, _ in model.body.named_parameters()], g_rev, g_ref):
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-7), name
    assert g_ref[2].abs().sum() > 0 and g_ref[1].abs().sum() > 0  # ctx and temb grads are really exercised


def test_reversible_body_under_bf16_autocast():
    """Mixed precision: the coupled state stays float32 (the functions inside run in bf16) and each layer inverts
    to float32 tolerance (a chain of them drifts: a float32-sized change of a function's input can flip a bf16
    rounding); the backward replays the forward's autocast state, so its gradients are as close to float32
    ones as plain autograd's bf16 gradients are."""
    model = tiny_unet(3, invertible_attention=True).train()
    randomize_(model)
    x, temb, ctx, mask = body_inputs(model)
    params = list(model.body.parameters())
    state = [x]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for layer in model.body:
            xs = state[len(state) - layer.n_in:]
            ys = layer(xs, temb, ctx, mask)
            assert all(y.dtype == torch.float32 for y in ys)
            back = layer.inverse(ys, temb, ctx, mask)
            assert max((a - b).abs().max().item() for a, b in zip(back, xs)) < 1e-5 * max(a.abs().max().item() for a in xs)
            state[len(state) - layer.n_in:] = ys

    def grads(run, bf16=True):
        leaves = [t.clone().requires_grad_() for t in (x, temb, ctx)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            (y,) = run(model.body, [leaves[0]], leaves[1], leaves[2], mask)
        return torch.cat([g.flatten() for g in torch.autograd.grad((y * y).sum(), [*leaves, *params])])

    exact = grads(run_layers, bf16=False)
    plain, reversible = ((grads(run) - exact).norm() / exact.norm() for run in (run_layers, reversible_sequence))
    assert 0 < reversible < 2 * plain + 1e-3


def test_reversible_path_keeps_no_graph_per_block():
    model = tiny_unet(2, layers_per_block=3).train()
    randomize_(model)
    x, temb, ctx, mask = body_inputs(model)
    x.requires_grad_()
    (y,) = reversible_sequence(model.body, [x], temb, ctx, mask)
    # The whole body is one autograd node whose saved tensors are its outputs and the conditioning.
    assert type(y.grad_fn).__name__ == "ReversibleFunctionBackward"
    assert len(y.grad_fn.saved_tensors) == 3


def test_coupling_gradcheck_float64():
    torch.manual_seed(0)
    block = AdditiveCoupling(2, 4, temb_dim=4, groups=2, dropout=0.0, ctx_dim=CTX_DIM, heads=2).double()
    randomize_(block, 0.5)
    x = torch.randn(1, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    temb = torch.randn(1, 4, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(1, 2, CTX_DIM, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 0]])
    assert torch.autograd.gradcheck(lambda a, t, c: block([a], t, c, mask)[0], (x, temb, ctx))
    assert torch.autograd.gradcheck(lambda a, t, c: reversible_sequence([block], [a], t, c, mask)[0],
                                    (x, temb, ctx))


@pytest.mark.parametrize("spatial", [(4, 6), (4, 2, 6)])
def test_checkerboard_attention_coupling_inverts(spatial):
    torch.manual_seed(0)
    layer = CheckerboardAttentionCoupling(8, CTX_DIM, heads=2).double().eval()
    randomize_(layer, 0.5)
    x = torch.randn(2, 8, *spatial, dtype=torch.float64)
    ctx = torch.randn(2, 3, CTX_DIM, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    with torch.no_grad():
        (y,) = layer([x], None, ctx, mask)
        (back,) = layer.inverse([y], None, ctx, mask)
    assert not torch.allclose(y, x, atol=1e-3)
    assert torch.allclose(back, x, atol=1e-10)


def test_checkerboard_rejects_odd_spatial_size():
    layer = CheckerboardAttentionCoupling(8, CTX_DIM, heads=2)
    with pytest.raises(ValueError, match="even spatial sizes"):
        layer([torch.randn(1, 8, 4, 5)], None, torch.randn(1, 2, CTX_DIM), None)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("backbone", ["standard", "invertible"])
def test_unet_trains_and_round_trips_through_save_pretrained(tmp_path, dims, backbone):
    model = tiny_unet(dims, backbone, encoder_hid_dim=10, dropout=0.1,
                      invertible_attention=backbone == "invertible")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, *([8] * dims), generator=g)
    target = torch.randn(x.shape, generator=g)
    tokens = torch.randn(2, 3, 10, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    t = torch.tensor([10, 500])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        out = model(x, t, tokens, encoder_attention_mask=mask).sample
        loss = torch.nn.functional.mse_loss(out, target)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(map(lambda v: v == v, losses)) and losses[-1] < losses[0]
    assert out.shape == x.shape

    model.eval().save_pretrained(tmp_path / "unet")
    loaded = ConditionalUNet.from_pretrained(tmp_path / "unet").eval()
    for key in ("in_channels", "out_channels", "sample_size", "encoder_hid_dim", "dims", "backbone"):
        assert getattr(loaded.config, key) == getattr(model.config, key)
    assert loaded.config.out_channels == 2
    with torch.no_grad():
        a = model(x, 7, tokens, mask).sample
        (b,) = loaded(x, torch.tensor(7), tokens, mask, return_dict=False)
    assert torch.equal(a, b)


def test_standard_gradient_checkpointing_matches():
    model = tiny_unet(2, "standard").train()
    randomize_(model)
    x, _, ctx, _ = body_inputs(model)
    x = torch.randn(2, 2, 8, 8)

    def grads():
        model.zero_grad()
        model(x, 3, ctx).sample.pow(2).mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    for a, b in zip(grads(), plain):
        assert torch.allclose(a, b, atol=1e-6)


def test_configuration_errors():
    with pytest.raises(ValueError, match=r"double per level.*\[32, 64, 128\]"):
        tiny_unet(block_out_channels=(8, 24))
    with pytest.raises(ValueError, match="nearest valid sizes: 28 or 32"):
        tiny_unet(block_out_channels=(8, 16, 32), sample_size=30)
    with pytest.raises(ValueError, match="gradient_checkpointing off"):
        tiny_unet().enable_gradient_checkpointing()


def test_input_errors():
    model = tiny_unet(3, block_out_channels=(8, 16, 32))
    ctx = torch.randn(1, 3, CTX_DIM)
    with pytest.raises(ValueError, match="nearest valid sizes: 8 or 12"):
        model(torch.randn(1, 2, 8, 10, 8), 1, ctx)
    with pytest.raises(ValueError, match="3 spatial axes"):
        model(torch.randn(1, 2, 8, 8), 1, ctx)
    bad = torch.randn(1, 2, 8, 8, 8)
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model(bad, 1, ctx)
