"""The LDM must learn from the VAE latents of the real training images, paired with their captions.

One published LoRA script trained on random latents by mistake; this test records
what reaches the noise scheduler and the UNet and would fail on such a bug.
"""

import pandas as pd
import pytest
import torch

from synthmed.data.dataset import to_model_range
from synthmed.diffusion.config import LDMTrainConfig
from synthmed.diffusion.latents import build_latent_pairs
from synthmed.diffusion.loop import draw_batch, train_ldm
from synthmed.diffusion.schedulers import make_noise_scheduler
from synthmed.models.unet import build_unet
from synthmed.text.encoder import TextEncoder
from tests.helpers import PLAIN, tiny_unet, tiny_vae, toy_latent_pairs


def test_ldm_is_fed_encoded_training_images_with_their_captions():
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(5, 1, 16, 16, generator=g) * 255).to(torch.uint8)
    names = [f"img{i}.png" for i in range(5)]
    pairs = pd.DataFrame({"file_name": names + names[:2], "text": [f"caption {i}" for i in range(7)]})
    vae = tiny_vae().eval()
    vae.register_to_config(scaling_factor=0.7)
    encoder = TextEncoder(max_length=8)
    data = build_latent_pairs(vae, encoder, pairs, images, names)

    with torch.no_grad():
        expected = vae.encode(to_model_range(images)).latent_dist.mean * 0.7
    caption_emb = dict(zip(pairs["text"], encoder.encode(pairs["text"].tolist())[0]))

    unet, scheduler = tiny_unet(), make_noise_scheduler(1000)
    seen = {"x0": [], "noisy": [], "unet_in": [], "text": []}
    add_noise = scheduler.add_noise

    def spy_add_noise(x0, noise, t):
        out = add_noise(x0, noise, t)
        seen["x0"].append(x0.clone())
        seen["noisy"].append(out.clone())
        return out

    scheduler.add_noise = spy_add_noise
    unet.register_forward_pre_hook(
        lambda m, args, kwargs: (seen["unet_in"].append(args[0].clone()),
                                 seen["text"].append(kwargs["encoder_hidden_states"].clone())) and None,
        with_kwargs=True,
    )
    cfg = LDMTrainConfig(steps=4, batch_size=6, lr=1e-3, weight_decay=0.0, context_dropout=0.0,
                         sample_posterior=False, grad_clip=1.0, **PLAIN)
    train_ldm(unet, scheduler, data, cfg, g)

    assert len(seen["x0"]) == 4
    for x0, noisy, unet_in, text in zip(seen["x0"], seen["noisy"], seen["unet_in"], seen["text"]):
        assert torch.equal(unet_in, noisy)  # the UNet sees the noised latents, not something else
        for row, emb in zip(x0, text):
            dist = (expected - row).flatten(1).abs().amax(1)
            i = int(dist.argmin())
            assert dist[i] < 1e-5, "a training latent is not the VAE encoding of any training image"
            own = [caption_emb[c] for c in pairs.loc[pairs["file_name"] == names[i], "text"]]
            assert any(torch.allclose(emb, e, atol=1e-5) for e in own), "latent paired with a foreign caption"


def test_context_dropout_uses_the_empty_caption():
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(2, 1, 16, 16, generator=g) * 255).to(torch.uint8)
    pairs = pd.DataFrame({"file_name": ["a", "b"], "text": ["x", "y"]})
    data = build_latent_pairs(tiny_vae().eval(), TextEncoder(max_length=8), pairs, images, ["a", "b"])
    from synthmed.diffusion.loop import draw_batch

    cfg = LDMTrainConfig(steps=1, batch_size=2000, lr=0, weight_decay=0, context_dropout=0.25,
                         sample_posterior=True, grad_clip=0, **PLAIN)
    _, caps = draw_batch(data, cfg, g)
    share = float((caps == data.uncond_index).float().mean())
    assert 0.2 < share < 0.3
    assert data.text_mask[data.uncond_index].sum() == 2


def test_loss_decreases_on_a_fixed_batch():
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(4, 1, 16, 16, generator=g) * 255).to(torch.uint8)
    pairs = pd.DataFrame({"file_name": list("abcd"), "text": list("wxyz")})
    data = build_latent_pairs(tiny_vae().eval(), TextEncoder(max_length=8), pairs, images, list("abcd"))
    cfg = LDMTrainConfig(steps=120, batch_size=8, lr=2e-3, weight_decay=0.0, context_dropout=0.1,
                         sample_posterior=True, grad_clip=1.0, **PLAIN)
    log, _ = train_ldm(tiny_unet(), make_noise_scheduler(1000), data, cfg, g)
    first, last = sum(r["loss"] for r in log[:20]) / 20, sum(r["loss"] for r in log[-20:]) / 20
    assert last < first


def test_non_finite_loss_stops_with_the_step():
    import pytest

    from synthmed.diffusion.latents import LatentPairs
    from synthmed.diffusion.loop import NonFiniteLoss

    data = LatentPairs(latent_mean=torch.full((2, 4, 8, 8), float("nan")), latent_std=torch.ones(2, 4, 8, 8),
                       scaling_factor=1.0, image_index=torch.arange(2), caption_index=torch.tensor([1, 1]),
                       text_emb=torch.zeros(2, 3, 384), text_mask=torch.ones(2, 3, dtype=torch.long), uncond_index=0)
    cfg = LDMTrainConfig(steps=3, batch_size=2, lr=1e-3, weight_decay=0.0, context_dropout=0.0,
                         sample_posterior=False, grad_clip=1.0, **PLAIN)
    with pytest.raises(NonFiniteLoss, match="loss became nan at step 0"):
        train_ldm(tiny_unet(), make_noise_scheduler(1000), data, cfg, torch.Generator().manual_seed(0))


def test_augmented_views_are_encoded_once_and_drawn_per_image():
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(3, 1, 16, 16, generator=g) * 200 + 20).to(torch.uint8)
    pairs = pd.DataFrame({"file_name": ["a", "b", "c"], "text": ["x", "y", "z"]})
    vae = tiny_vae().eval()
    data = build_latent_pairs(vae, TextEncoder(max_length=8), pairs, images, ["a", "b", "c"], augment_copies=2,
                              brightness=0.2, contrast=0.2, generator=g)
    assert data.variants == 3 and data.latent_mean.shape[0] == 9
    with torch.no_grad():
        plain = vae.encode(to_model_range(images)).latent_dist.mean
    assert torch.allclose(data.latent_mean[::3], plain, atol=1e-5)  # view 0 is the unaugmented image
    assert not torch.allclose(data.latent_mean[1::3], plain, atol=1e-3)
    cfg = LDMTrainConfig(steps=1, batch_size=600, lr=0, weight_decay=0, context_dropout=0.0,
                         sample_posterior=False, grad_clip=0, **PLAIN)
    z, caps = draw_batch(data, cfg, g)
    for row, cap in zip(z[:50], caps[:50]):  # every drawn latent is a view of its caption's image
        i = int(cap) - 1
        views = data.latent_mean[i * 3 : i * 3 + 3] * data.scaling_factor
        assert (views - row).flatten(1).abs().amax(1).min() < 1e-6


def test_latents_and_caption_states_encoded_to_disk_equal_those_in_memory_and_a_rerun_reads_them(tmp_path):
    from synthmed.data.disk_array import DiskArray, write_disk_array

    images = (torch.rand(70, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 200 + 20).to(torch.uint8)
    names = [f"i{k}" for k in range(70)]
    pairs = pd.DataFrame({"file_name": names, "text": [f"caption {k % 9}" for k in range(70)]})
    vae, encoder = tiny_vae().eval(), TextEncoder(max_length=8)
    on_disk = write_disk_array(tmp_path / "px.u8", images.split(32), "uint8")  # a split as ingest's images
    kw = dict(augment_copies=1, brightness=0.2, contrast=0.2)
    g_mem, g_disk = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    mem = build_latent_pairs(vae, encoder, pairs, images, names, generator=g_mem, **kw)
    disk = build_latent_pairs(vae, encoder, pairs, on_disk, names, generator=g_disk, cache=tmp_path / "enc", **kw)
    assert isinstance(disk.latent_mean, DiskArray) and isinstance(disk.text_emb, DiskArray)
    assert torch.equal(disk.latent_mean[:], mem.latent_mean) and torch.equal(disk.latent_std[:], mem.latent_std)
    assert torch.equal(disk.text_emb[:], mem.text_emb) and torch.equal(disk.text_mask, mem.text_mask)
    assert torch.equal(g_mem.get_state(), g_disk.get_state())
    stamp = (tmp_path / "enc/mean.f32").stat().st_mtime_ns
    g_again = torch.Generator().manual_seed(5)
    again = build_latent_pairs(vae, encoder, pairs, on_disk, names, generator=g_again, cache=tmp_path / "enc", **kw)
    assert (tmp_path / "enc/mean.f32").stat().st_mtime_ns == stamp and torch.equal(again.latent_mean[:], mem.latent_mean)
    assert torch.equal(g_again.get_state(), g_mem.get_state())  # a resumed run's RNG is where a fresh one's is
    cfg = LDMTrainConfig(steps=1, batch_size=8, lr=0, weight_decay=0, context_dropout=0.0,
                         sample_posterior=True, grad_clip=0, **PLAIN)
    z_mem, _ = draw_batch(mem, cfg, torch.Generator().manual_seed(1))
    z_disk, _ = draw_batch(disk, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(z_mem, z_disk)


def test_predicted_x0_inverts_the_forward_process_for_both_parameterisations():
    from synthmed.diffusion.sample import predicted_x0

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 900])
    for kind in ("epsilon", "v_prediction"):
        sched = make_noise_scheduler(1000, kind)
        x_t = sched.add_noise(x0, noise, t)
        pred = noise if kind == "epsilon" else sched.get_velocity(x0, noise, t)
        assert torch.allclose(predicted_x0(sched, x_t, pred, t), x0.clamp(-4, 4), atol=1e-4)
    flow, s = make_noise_scheduler(1000, "flow"), torch.tensor([0.01, 0.5, 0.9]).view(-1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise  # the straight line from the image to the noise; its velocity noise - x0
    assert torch.allclose(predicted_x0(flow, x_t, noise - x0, s.flatten() * 1000), x0.clamp(-4, 4), atol=1e-5)


def test_flow_training_noises_on_the_straight_line_and_scores_the_velocity_unweighted():
    """Rectified flow: the UNet gets x_t = (1 - s) x0 + s noise with timestep input s * 1000, s the shifted
    uniform draw, and the loss is the plain MSE to noise - x0 (min-SNR does not apply)."""
    shift = 3.0
    unet, sched = tiny_unet(), make_noise_scheduler(1000, "flow", flow_shift=shift)
    seen = []
    unet.register_forward_hook(lambda m, args, kwargs, out: seen.append((args[0].clone(), args[1].clone(),
                                                                         out.sample.detach())), with_kwargs=True)
    data = toy_latent_pairs()
    cfg = LDMTrainConfig(steps=1, batch_size=16, lr=0.0, weight_decay=0.0, context_dropout=0.0,
                         sample_posterior=False, grad_clip=0.0, **{**PLAIN, "min_snr_gamma": 5.0})
    g = torch.Generator().manual_seed(0)
    log, _ = train_ldm(unet, sched, data, cfg, g)
    # replay the loop's draws: the batch, then the noise, then the timesteps
    replay = torch.Generator().manual_seed(0)
    x0, _ = draw_batch(data, cfg, replay)
    noise = torch.randn(x0.shape, generator=replay)
    u = (torch.randint(1000, (16,), generator=replay).double() + 1) / 1000
    s = shift * u / (1 + (shift - 1) * u)
    (x_t, t, pred), = seen
    assert torch.allclose(t.double(), s * 1000, atol=1e-3)
    s = s.float().view(-1, 1, 1, 1)
    assert torch.allclose(x_t, (1 - s) * x0 + s * noise, atol=1e-5)
    assert abs(log[0]["loss"] - float(((pred - (noise - x0)) ** 2).mean())) < 1e-5


def test_zero_terminal_snr_trains_the_pure_noise_timestep_and_its_samplers_start_there():
    from stages.train_ldm import TrainLDMParams
    from synthmed.diffusion.schedulers import make_sampler

    sched = make_noise_scheduler(1000, "v_prediction", zero_terminal_snr=True)
    assert float(sched.alphas_cumprod[-1]) < 1e-6 < float(make_noise_scheduler(1000).alphas_cumprod[-1])
    for name in ("ddim", "dpmpp", "euler"):
        sampler = make_sampler(name, sched.config)
        sampler.set_timesteps(10)
        assert int(sampler.timesteps[0]) == 999, name
    with pytest.raises(ValueError, match="needs prediction_type v_prediction"):
        make_noise_scheduler(1000, "epsilon", zero_terminal_snr=True)
    assert "zero_terminal_snr" in TrainLDMParams.__dataclass_fields__


def test_self_conditioning_feeds_the_first_pass_estimate_on_half_the_samples():
    from synthmed.diffusion.sample import predicted_x0

    torch.manual_seed(0)
    unet = build_unet(sample_size=8, in_channels=4, block_out_channels=[16, 32], layers_per_block=1,
                      cross_attention_dim=384, attention_head_dim=4, norm_num_groups=8, dropout=0.0,
                      self_condition=True)
    assert unet.config.in_channels == 8 and unet.config.out_channels == 4
    calls = []
    unet.register_forward_hook(lambda m, args, kwargs, out: calls.append((args[0].clone(), args[1].clone(),
                                                                          out.sample.detach().clone())),
                               with_kwargs=True)
    sched = make_noise_scheduler(1000)
    cfg = LDMTrainConfig(steps=6, batch_size=32, lr=0.0, weight_decay=0.0, context_dropout=0.0,
                         sample_posterior=False, grad_clip=0.0, **PLAIN)
    train_ldm(unet, sched, toy_latent_pairs(), cfg, torch.Generator().manual_seed(0))
    assert len(calls) == 12  # a gradient-free first pass, then the training pass, every step
    used = 0
    for (first_in, first_t, first_out), (train_in, train_t, _) in zip(calls[::2], calls[1::2]):
        assert torch.count_nonzero(first_in[:, 4:]) == 0  # the first pass has no previous estimate
        prev = train_in[:, 4:]
        with_prev = prev.flatten(1).abs().amax(1) > 0
        assert with_prev.sum() == len(first_in)  # the first pass ran only for the samples that use it
        expected = predicted_x0(sched, first_in[:, :4], first_out, first_t)
        assert torch.allclose(prev[with_prev], expected, atol=1e-5)
        assert torch.equal(train_in[with_prev, :4], first_in[:, :4])
        used += int(with_prev.sum())
    assert 0.35 < used / (6 * 32) < 0.65

    # sampling: the previous step's estimate comes back as input, starting from zeros
    from diffusers import DDIMScheduler

    from synthmed.diffusion.sample import sample_latents, seeded_generators

    calls.clear()
    sample_latents(unet.eval(), DDIMScheduler.from_config(sched.config), torch.randn(2, 5, 384),
                   torch.ones(2, 5, dtype=torch.long), torch.zeros(1, 5, 384), torch.ones(1, 5, dtype=torch.long),
                   seeded_generators([0, 1]), num_inference_steps=3, guidance_scale=2.0)
    assert len(calls) == 3 and calls[0][0].shape[1] == 8
    assert torch.count_nonzero(calls[0][0][:, 4:]) == 0
    assert all(torch.count_nonzero(c[0][:, 4:]) > 0 for c in calls[1:])


def test_gradient_accumulation_equals_one_large_batch_step():
    """Two micro-batches of 4 must hand the optimizer the gradient, and log the loss, of one batch of
    those 8 samples. The gradient is read where the optimizer takes it: Adam's first update is
    ~lr * sign(gradient), blind to a gradient twice too large."""
    import copy

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    unet = tiny_unet()
    start = copy.deepcopy(unet)
    seen, stepped = [], []
    unet.register_forward_hook(lambda m, args, kwargs, out: seen.append(
        (args[0].clone(), args[1].clone(), kwargs["encoder_hidden_states"].clone())), with_kwargs=True)
    sched = make_noise_scheduler(1000)
    noises = []
    add_noise = sched.add_noise
    sched.add_noise = lambda x0, n, t: (noises.append(n.clone()), add_noise(x0, n, t))[1]
    cfg = LDMTrainConfig(steps=1, batch_size=8, lr=1e-3, weight_decay=0.0, context_dropout=0.0,
                         sample_posterior=False, grad_clip=0.0, **{**PLAIN, "grad_accum_steps": 2})
    hook = register_optimizer_step_pre_hook(lambda opt, args, kwargs: stepped.append(
        [p.grad.clone() for group in opt.param_groups for p in group["params"]]))
    try:
        log, _ = train_ldm(unet, sched, toy_latent_pairs(), cfg, torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert len(seen) == 2 and seen[0][0].shape[0] == 4 and len(stepped) == 1

    x, t, emb = (torch.cat(parts) for parts in zip(*seen))
    loss = torch.nn.functional.mse_loss(start(x, t, encoder_hidden_states=emb).sample, torch.cat(noises))
    loss.backward()
    assert abs(log[0]["loss"] - loss.item()) < 1e-6
    expected = [p.grad for p in start.parameters()]
    scale = max(float(g.abs().max()) for g in expected)
    assert len(stepped[0]) == len(expected)
    for got, want in zip(stepped[0], expected):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6 * scale)


def test_batch_that_does_not_split_into_micro_batches_is_refused():
    import pytest

    cfg = LDMTrainConfig(steps=1, batch_size=6, lr=1e-3, weight_decay=0.0, context_dropout=0.0,
                         sample_posterior=False, grad_clip=0.0, **{**PLAIN, "grad_accum_steps": 4})
    with pytest.raises(ValueError, match="grad_accum_steps=4"):
        train_ldm(tiny_unet(), make_noise_scheduler(1000), toy_latent_pairs(), cfg, torch.Generator().manual_seed(0))


def test_cpu_training_runs_in_full_precision_whatever_is_asked():
    from synthmed.core.runtime import make_accelerator

    assert make_accelerator("bf16").mixed_precision == "no"


def _closed_form_weights(sched, t: torch.Tensor, gamma: float) -> torch.Tensor:
    ab = sched.alphas_cumprod.double()[t]
    snr = ab / (1 - ab)
    floor = snr + 1 if sched.config.prediction_type == "v_prediction" else snr
    return (torch.clamp(snr, max=gamma) / floor).float()


def test_logged_loss_is_the_min_snr_weighted_mse_to_the_parameterisation_target():
    """Inside the loop: the UNet's output is scored against the noise (epsilon) or
    scheduler.get_velocity (v), each sample weighted by its closed-form min-SNR weight."""
    for kind in ("epsilon", "v_prediction"):
        unet, sched = tiny_unet(), make_noise_scheduler(1000, kind)
        seen, noised = [], []
        unet.register_forward_hook(lambda m, args, kwargs, out: seen.append((args[1].clone(), out.sample.detach())),
                                   with_kwargs=True)
        add_noise = sched.add_noise
        sched.add_noise = lambda x0, n, t: (noised.append((x0.clone(), n.clone())), add_noise(x0, n, t))[1]
        cfg = LDMTrainConfig(steps=1, batch_size=16, lr=0.0, weight_decay=0.0, context_dropout=0.0,
                             sample_posterior=False, grad_clip=0.0, **{**PLAIN, "min_snr_gamma": 2.0})
        log, _ = train_ldm(unet, sched, toy_latent_pairs(), cfg, torch.Generator().manual_seed(0))
        (t, pred), (x0, noise) = seen[0], noised[0]
        target = noise if kind == "epsilon" else sched.get_velocity(x0, noise, t)
        mse = ((pred - target) ** 2).mean(dim=(1, 2, 3))
        assert abs(log[0]["loss"] - float((mse * _closed_form_weights(sched, t, 2.0)).mean())) < 1e-6, kind
        assert abs(log[0]["loss"] - float(mse.mean())) > 1e-3  # the weighting is on, not plain MSE


def test_validation_scores_the_ema_and_the_raw_weights_with_the_training_weighting():
    import copy

    from synthmed.diffusion.loop import validation_losses

    data, sched = toy_latent_pairs(), make_noise_scheduler(1000, "v_prediction")
    unet = tiny_unet()
    cfg = LDMTrainConfig(steps=4, batch_size=4, lr=1e-2, weight_decay=0.0, context_dropout=0.0,
                         sample_posterior=False, grad_clip=0.0, **{**PLAIN, "ema_decay": 0.5, "min_snr_gamma": 2.0})
    _, ema = train_ldm(unet, sched, data, cfg, torch.Generator().manual_seed(0))
    raw = copy.deepcopy(unet.state_dict())
    got = validation_losses(unet, ema, sched, data, 2.0)
    assert all(torch.equal(raw[k], v) for k, v in unet.state_dict().items())  # training weights back, bit for bit

    def expected(model) -> float:  # fixed draws from the validation generator, weighted as in training
        g = torch.Generator().manual_seed(1234)
        z0 = data.latent_mean * data.scaling_factor
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(1000, (len(z0),), generator=g)
        with torch.no_grad():
            pred = model.eval()(sched.add_noise(z0, noise, t), t, encoder_hidden_states=data.text_emb[data.caption_index],
                                encoder_attention_mask=data.text_mask[data.caption_index]).sample
        mse = ((pred - sched.get_velocity(z0, noise, t)) ** 2).mean(dim=(1, 2, 3))
        return float((mse * _closed_form_weights(sched, t, 2.0)).mean())

    shipped = copy.deepcopy(unet)
    ema.copy_to(shipped.parameters())
    assert abs(got["val_loss_raw"] - expected(unet)) < 1e-6
    assert abs(got["val_loss_ema"] - expected(shipped)) < 1e-6
    assert abs(got["val_loss_ema"] - got["val_loss_raw"]) > 1e-6  # two different sets of weights
    without_ema = validation_losses(unet, None, sched, data, 2.0)  # no EMA: the raw weights ship
    assert without_ema["val_loss_ema"] == without_ema["val_loss_raw"] == got["val_loss_raw"]


def test_packed_latents_round_trip_and_decode_like_unpacked_ones():
    from synthmed.diffusion.sample import decode, pack_latents, unpack_latents

    torch.manual_seed(0)
    vae = tiny_vae().eval()
    z = torch.randn(2, vae.config.latent_channels, 8, 8)
    packed = pack_latents(z, 2)
    assert packed.shape == (2, 4 * vae.config.latent_channels, 4, 4)
    assert torch.equal(unpack_latents(vae, packed), z) and torch.equal(decode(vae, packed), decode(vae, z))
    with pytest.raises(ValueError, match="do not belong together"):
        unpack_latents(vae, torch.randn(1, 3 * vae.config.latent_channels, 4, 4))
