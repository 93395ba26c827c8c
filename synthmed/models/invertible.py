"""Reversible building blocks for the memory-efficient (IDM / iUNet-style) denoiser backbone.

Every layer maps the tail of a list of tensors (the "state") to new tensors and can invert that map
exactly, so training keeps only the body's final outputs: `ReversibleFunction` reconstructs each layer's
input from its output during backward and recomputes that one layer with grad. Activation memory is then
flat in depth (per resolution level the skip halves stay alive, they are part of the state).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Cond = tuple[Tensor, Tensor, Tensor | None]  # (temb [B, E], ctx [B, T, D], mask [B, T] | None)


def conv_nd(dims: int, cin: int, cout: int, kernel: int = 3, **kw) -> nn.Module:
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    return (nn.Conv2d if dims == 2 else nn.Conv3d)(cin, cout, kernel, padding=kernel // 2, **kw)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    # Coupling halves can have fewer channels than the configured group count: use the largest divisor.
    return nn.GroupNorm(math.gcd(groups, channels), channels, eps=1e-6)


class CrossAttention(nn.Module):
    """Multi-head attention of spatial tokens (queries) to text tokens `ctx`, honouring a [B, T] 1/0 mask."""

    def __init__(self, channels: int, ctx_dim: int, heads: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"attention: {channels} channels do not split into {heads} heads")
        self.heads = heads
        self.q = nn.Linear(channels, channels, bias=False)
        self.kv = nn.Linear(ctx_dim, 2 * channels, bias=False)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)  # starts as the identity residual: the UNet trains stably from init
        nn.init.zeros_(self.out.bias)

    def forward(self, tokens: Tensor, ctx: Tensor, mask: Tensor | None) -> Tensor:
        b, n, c = tokens.shape
        h = self.heads
        q = self.q(tokens).view(b, n, h, c // h).transpose(1, 2)
        k, v = self.kv(ctx).view(b, ctx.shape[1], 2, h, c // h).permute(2, 0, 3, 1, 4)
        attn_mask = None
        valid = None
        if mask is not None:
            keep = mask.to(torch.bool)
            valid = keep.any(dim=1)
            # A caption with no valid token would softmax over nothing (NaN): let it attend to all, then zero it.
            keep = keep | ~valid[:, None]
            attn_mask = keep[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.out(out.transpose(1, 2).reshape(b, n, c))
        if valid is not None:
            out = out * valid[:, None, None].to(out.dtype)
        return out


class ResidualFunction(nn.Module):
    """GroupNorm-SiLU-conv, + linear(temb), GroupNorm-SiLU-dropout-conv (zero-init), optional cross-attention.

    Used as F/G of the coupling blocks (half channels) and as the residual branch of the standard backbone.
    """

    def __init__(self, dims: int, cin: int, cout: int, temb_dim: int, groups: int, dropout: float,
                 ctx_dim: int | None = None, heads: int = 1):
        super().__init__()
        self.norm1 = group_norm(cin, groups)
        self.conv1 = conv_nd(dims, cin, cout)
        self.temb = nn.Linear(temb_dim, cout)
        self.norm2 = group_norm(cout, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv_nd(dims, cout, cout)
        nn.init.zeros_(self.conv2.weight)  # identity-at-init residual / coupling
        nn.init.zeros_(self.conv2.bias)
        self.attn_norm = group_norm(cout, groups) if ctx_dim is not None else None
        self.attn = CrossAttention(cout, ctx_dim, heads) if ctx_dim is not None else None

    def forward(self, x: Tensor, temb: Tensor, ctx: Tensor, mask: Tensor | None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb)).view(*h.shape[:2], *([1] * (h.ndim - 2)))
        # Dropout draws its mask in memory order: force one layout so the recompute and the inverse (whose
        # inputs may come back channels-last-strided) see the same logical mask.
        h = self.conv2(self.dropout(F.silu(self.norm2(h)).contiguous()))
        if self.attn is not None:
            tokens = self.attn_norm(h).flatten(2).transpose(1, 2)
            h = h + self.attn(tokens, ctx, mask).transpose(1, 2).reshape(h.shape)
        return h


class ReversibleLayer(nn.Module):
    """Maps the last `n_in` state tensors to `n_out` tensors; `inverse` maps them back exactly."""

    n_in: int = 1
    n_out: int = 1

    def forward(self, xs: list[Tensor], temb: Tensor, ctx: Tensor, mask: Tensor | None) -> list[Tensor]:
        raise NotImplementedError

    def inverse(self, ys: list[Tensor], temb: Tensor, ctx: Tensor, mask: Tensor | None) -> list[Tensor]:
        raise NotImplementedError

    @property
    def uses_rng(self) -> bool:
        return self.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.modules())


class AdditiveCoupling(ReversibleLayer):
    """y1 = x1 + F(x2), y2 = x2 + G(y1) over the channel halves (RevNet additive coupling)."""

    def __init__(self, dims: int, channels: int, temb_dim: int, groups: int, dropout: float,
                 ctx_dim: int | None = None, heads: int = 1):
        super().__init__()
        if channels % 2:
            raise ValueError(f"coupling needs an even channel count, got {channels}")
        half = channels // 2
        self.f = ResidualFunction(dims, half, half, temb_dim, groups, dropout, ctx_dim, heads)
        self.g = ResidualFunction(dims, half, half, temb_dim, groups, dropout, ctx_dim, heads)

    def _seeds(self, x: Tensor) -> tuple[int | None, int | None]:
        # The inverse evaluates G before F, so one RNG stream cannot reproduce both dropout masks: draw one seed
        # per function from the global stream (restored by the caller) and run each function on its own seed.
        if not self.uses_rng:
            return None, None
        s = torch.randint(0, 2 ** 62, (2,)).tolist()
        return s[0], s[1]

    def forward(self, xs, temb, ctx, mask):
        x1, x2 = xs[0].chunk(2, dim=1)
        sf, sg = self._seeds(x1)
        with _seeded(sf, x1.device):
            y1 = x1 + self.f(x2, temb, ctx, mask)
        with _seeded(sg, x1.device):
            y2 = x2 + self.g(y1, temb, ctx, mask)
        return [torch.cat([y1, y2], dim=1)]

    def inverse(self, ys, temb, ctx, mask):
        y1, y2 = ys[0].chunk(2, dim=1)
        sf, sg = self._seeds(y1)
        with _seeded(sg, y1.device):
            x2 = y2 - self.g(y1, temb, ctx, mask)
        with _seeded(sf, y1.device):
            x1 = y1 - self.f(x2, temb, ctx, mask)
        return [torch.cat([x1, x2], dim=1)]


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def space_to_depth(x: Tensor, dims: int) -> Tensor:
    if dims == 2:
        return F.pixel_unshuffle(x, 2)
    b, c, d, h, w = x.shape
    x = x.view(b, c, d // 2, 2, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * 8, d // 2, h // 2, w // 2)


def depth_to_space(x: Tensor, dims: int) -> Tensor:
    if dims == 2:
        return F.pixel_shuffle(x, 2)
    b, c, d, h, w = x.shape
    x = x.view(b, c // 8, 2, 2, 2, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c // 8, d * 2, h * 2, w * 2)


class OrthogonalMix(nn.Module):
    """1x1 channel mixing by W = exp(A - A^T), orthogonal for any A, so its inverse is W^T. Starts at identity."""

    def __init__(self, channels: int):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(channels, channels))

    def weight(self) -> Tensor:
        return torch.matrix_exp(self.a - self.a.T)

    def forward(self, x: Tensor, transpose: bool = False) -> Tensor:
        # in the state's precision even under autocast: a bf16 product would not invert to float tolerance
        with torch.autocast(x.device.type, enabled=False):
            w = self.weight().to(x.dtype)
            return torch.einsum("oc,bc...->bo...", w.T if transpose else w, x)


def split_sizes(channels: int, dims: int) -> tuple[int, int]:
    """(skip, down) channels so that the down part after space-to-depth has exactly 2x `channels`."""
    factor = 2 ** dims
    if (2 * channels) % factor:
        raise ValueError(f"invertible down-sampling in {dims}-D needs channels divisible by {factor // 2}, "
                         f"got {channels}")
    down = 2 * channels // factor
    return channels - down, down


class InvertibleDown(ReversibleLayer):
    """[.., h(C, S)] -> [.., skip(C - C_d, S), down(2C, S/2)]: split, space-to-depth, orthogonal mixing."""

    n_in, n_out = 1, 2

    def __init__(self, dims: int, channels: int):
        super().__init__()
        self.dims = dims
        self.skip, self.down = split_sizes(channels, dims)
        self.mix = OrthogonalMix(2 * channels)

    def forward(self, xs, temb, ctx, mask):
        skip, down = xs[0].split([self.skip, self.down], dim=1)
        return [skip.contiguous(), self.mix(space_to_depth(down, self.dims))]

    def inverse(self, ys, temb, ctx, mask):
        skip, down = ys
        return [torch.cat([skip, depth_to_space(self.mix(down, transpose=True), self.dims)], dim=1)]


class InvertibleUp(InvertibleDown):
    """[.., skip(C - C_d, S), h(2C, S/2)] -> [.., h(C, S)]: InvertibleDown run backwards, with weights of its own."""

    n_in, n_out = 2, 1
    forward, inverse = InvertibleDown.inverse, InvertibleDown.forward


def checkerboard_index(spatial: Sequence[int], device: torch.device) -> tuple[Tensor, Tensor]:
    """Flat indices of the positions whose coordinate sum is even (A) and odd (B), in raster order, so
    the k-th A and the k-th B token are horizontal neighbours."""
    if any(s % 2 for s in spatial):
        raise ValueError(f"checkerboard attention needs even spatial sizes, got {list(spatial)}")
    grids = torch.meshgrid(*[torch.arange(s, device=device) for s in spatial], indexing="ij")
    parity = (sum(grids) % 2).flatten()
    return (parity == 0).nonzero().squeeze(1), (parity == 1).nonzero().squeeze(1)


class TokenAttention(nn.Module):
    """Self-attention among one token set plus cross-attention to the text (pre-norm, zero-init outputs)."""

    def __init__(self, channels: int, ctx_dim: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.self_attn = nn.MultiheadAttention(channels, heads, batch_first=True)
        nn.init.zeros_(self.self_attn.out_proj.weight)
        nn.init.zeros_(self.self_attn.out_proj.bias)
        self.cross_norm = nn.LayerNorm(channels)
        self.cross = CrossAttention(channels, ctx_dim, heads)

    def forward(self, tokens: Tensor, ctx: Tensor, mask: Tensor | None) -> Tensor:
        h = self.norm(tokens)
        h = self.self_attn(h, h, h, need_weights=False)[0]
        return h + self.cross(self.cross_norm(tokens + h), ctx, mask)


class CheckerboardAttentionCoupling(ReversibleLayer):
    """iTrans-style invertible attention: A' = A + Attn(B), B' = B + Attn'(A') over a checkerboard split."""

    def __init__(self, channels: int, ctx_dim: int, heads: int):
        super().__init__()
        self.f = TokenAttention(channels, ctx_dim, heads)
        self.g = TokenAttention(channels, ctx_dim, heads)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        ia, ib = checkerboard_index(x.shape[2:], x.device)
        flat = x.flatten(2).transpose(1, 2)  # [B, N, C]
        return flat[:, ia], flat[:, ib], ia, ib

    @staticmethod
    def _merge(a: Tensor, b: Tensor, ia: Tensor, ib: Tensor, like: Tensor) -> Tensor:
        flat = a.new_empty(a.shape[0], a.shape[1] + b.shape[1], a.shape[2])
        flat = flat.index_copy(1, ia, a).index_copy(1, ib, b)
        return flat.transpose(1, 2).reshape(like.shape).contiguous()

    def forward(self, xs, temb, ctx, mask):
        a, b, ia, ib = self._split(xs[0])
        a = a + self.f(b, ctx, mask)
        b = b + self.g(a, ctx, mask)
        return [self._merge(a, b, ia, ib, xs[0])]

    def inverse(self, ys, temb, ctx, mask):
        a, b, ia, ib = self._split(ys[0])
        b = b - self.g(a, ctx, mask)
        a = a - self.f(b, ctx, mask)
        return [self._merge(a, b, ia, ib, ys[0])]


# --- the reversible sequence -------------------------------------------------------------------------

def _rng_devices(tensors: Sequence[Tensor]) -> list[torch.device]:
    return sorted({t.device for t in tensors if t.device.type == "cuda"}, key=str)


def _stash_rng(devices: list[torch.device]) -> tuple[Tensor, list[Tensor]]:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _autocast_state() -> list[tuple[str, bool, torch.dtype]]:
    return [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")]


@contextlib.contextmanager
def _autocast_as(state: list[tuple[str, bool, torch.dtype]]) -> Iterator[None]:
    """The forward's mixed-precision state, for the inverse and the recompute (backward runs outside it), so
    the recomputed functions give the forward's values and the inverse undoes them exactly."""
    with contextlib.ExitStack() as stack:
        for device_type, enabled, dtype in state:
            stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
        yield


@contextlib.contextmanager
def _restored_rng(state: tuple[Tensor, list[Tensor]] | None, devices: list[torch.device]) -> Iterator[None]:
    if state is None:
        yield
        return
    # fork_rng so that the recompute neither sees nor disturbs the RNG stream of the surrounding training step.
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        for d, s in zip(devices, state[1]):
            torch.cuda.set_rng_state(s, d)
        yield


def run_layers(layers: Sequence[ReversibleLayer], state: list[Tensor], temb: Tensor, ctx: Tensor,
               mask: Tensor | None) -> list[Tensor]:
    """Plain (autograd-recording or inference) pass of the layers over the state list."""
    state = list(state)
    for layer in layers:
        xs = state[len(state) - layer.n_in:]
        del state[len(state) - layer.n_in:]
        state.extend(layer(xs, temb, ctx, mask))
    return state


def invert_layers(layers: Sequence[ReversibleLayer], state: list[Tensor], temb: Tensor, ctx: Tensor,
                  mask: Tensor | None) -> list[Tensor]:
    state = list(state)
    for layer in reversed(layers):
        ys = state[len(state) - layer.n_out:]
        del state[len(state) - layer.n_out:]
        state.extend(layer.inverse(ys, temb, ctx, mask))
    return state


class ReversibleFunction(torch.autograd.Function):
    """Runs the layers without a graph and keeps only the outputs; backward inverts and recomputes layer by layer.

    Inputs: (layers, mask, n_state, *state, temb, ctx, *params). The parameters are Function inputs so that
    autograd routes their gradients (they are not captured by any graph in forward).
    """

    @staticmethod
    def forward(fctx, layers, mask, n_state, *args):
        state = list(args[:n_state])
        temb, ctx = args[n_state], args[n_state + 1]
        devices = _rng_devices([*state, temb, ctx])
        rng = []
        with torch.no_grad():
            for layer in layers:
                rng.append(_stash_rng(devices) if layer.uses_rng else None)
                xs = state[len(state) - layer.n_in:]
                del state[len(state) - layer.n_in:]
                state.extend(layer(xs, temb, ctx, mask))
        fctx.layers, fctx.mask, fctx.rng, fctx.devices = layers, mask, rng, devices
        fctx.autocast = _autocast_state()
        fctx.n_state, fctx.n_out = n_state, len(state)
        fctx.save_for_backward(*state, temb, ctx)
        return tuple(state)

    @staticmethod
    def backward(fctx, *grad_out):
        saved = fctx.saved_tensors
        n_out, layers, mask = fctx.n_out, fctx.layers, fctx.mask
        state = list(saved[:n_out])
        temb, ctx = saved[n_out].detach(), saved[n_out + 1].detach()
        grads = [torch.zeros_like(s) if g is None else g for s, g in zip(state, grad_out)]
        del saved, grad_out
        g_temb = torch.zeros_like(temb)
        g_ctx = torch.zeros_like(ctx)
        param_grads: dict[int, Tensor] = {}
        for layer, rng in zip(reversed(layers), reversed(fctx.rng)):
            ys = state[len(state) - layer.n_out:]
            gys = grads[len(grads) - layer.n_out:]
            del state[len(state) - layer.n_out:], grads[len(grads) - layer.n_out:]
            with torch.no_grad(), _autocast_as(fctx.autocast), _restored_rng(rng, fctx.devices):
                xs = layer.inverse(ys, temb, ctx, mask)
            del ys
            xs = [x.detach().requires_grad_() for x in xs]
            te = temb.detach().requires_grad_()
            cx = ctx.detach().requires_grad_()
            params = [p for p in layer.parameters() if p.requires_grad]
            with torch.enable_grad(), _autocast_as(fctx.autocast), _restored_rng(rng, fctx.devices):
                ys = layer(xs, te, cx, mask)
            gs = torch.autograd.grad(ys, [*xs, te, cx, *params], grad_outputs=gys, allow_unused=True)
            del ys, gys
            n = len(xs)
            state.extend(x.detach() for x in xs)
            grads.extend(torch.zeros_like(x) if g is None else g for x, g in zip(xs, gs[:n]))
            del xs
            if gs[n] is not None:
                g_temb += gs[n]
            if gs[n + 1] is not None:
                g_ctx += gs[n + 1]
            for p, g in zip(params, gs[n + 2:]):
                if g is not None:
                    param_grads[id(p)] = g
            del gs
        all_params = [p for layer in layers for p in layer.parameters()]
        return (None, None, None, *grads, g_temb, g_ctx, *[param_grads.get(id(p)) for p in all_params])


def reversible_sequence(layers: Sequence[ReversibleLayer], state: list[Tensor], temb: Tensor, ctx: Tensor,
                        mask: Tensor | None = None) -> list[Tensor]:
    """Apply `layers` to `state`; while recording grads, through `ReversibleFunction` (memory flat in depth)."""
    layers = list(layers)
    params = [p for layer in layers for p in layer.parameters()]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in [*state, temb, ctx, *params])
    if not needs_grad:
        return run_layers(layers, state, temb, ctx, mask)
    mask = None if mask is None else mask.detach()
    return list(ReversibleFunction.apply(layers, mask, len(state), *state, temb, ctx, *params))
