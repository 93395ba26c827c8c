"""Image-embedding conditioning (DiNO-Diffusion): a frozen image encoder's global token(s) stand in for the
caption; variants of a real image come from its embedding, interpolations from a mix of two."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from diffusers import DDIMScheduler

from synthmed.diffusion.pipeline import SynthMedPipeline
from synthmed.diffusion.prompts import image_plan
from synthmed.diffusion.config import LDMTrainConfig
from synthmed.diffusion.latents import build_image_pairs
from synthmed.diffusion.loop import train_ldm
from synthmed.diffusion.schedulers import make_noise_scheduler
from synthmed.core.errors import PipelineError
from synthmed.models.image_encoder import ImageEncoder, mix
from synthmed.models.unet import build_unet
from tests.helpers import PLAIN, tiny_vae


def tiny_dinov2(folder, hidden: int = 32):
    """A randomly initialised DINOv2 (no weights ship offline) saved as a transformers folder."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8)).save_pretrained(folder)
    return str(folder)


def images(n=6, seed=0):
    return (torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8)


def test_dinov2_tokens_are_its_cls_and_mean_patch_token(tmp_path):
    from transformers import Dinov2Model

    path = tiny_dinov2(tmp_path / "dino")
    x = images(3)
    both = ImageEncoder(path, "cls+mean").encode(x)
    assert both.shape == (3, 2, 32)
    # the same tokens as the model gives on the preprocessed batch (grey -> 3 channels, 32 px, ImageNet norm)
    enc = ImageEncoder(path, "cls")
    pre = torch.nn.functional.interpolate(x.float().expand(-1, 3, -1, -1) / 255, size=(32, 32), mode="bicubic",
                                          antialias=True).clamp(0, 1)
    pre = (pre - enc.norm[0]) / enc.norm[1]
    hidden = Dinov2Model.from_pretrained(path).eval()(pixel_values=pre).last_hidden_state
    torch.testing.assert_close(both[:, 0], hidden[:, 0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both[:, 1], hidden[:, 1:].mean(1), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(both[0], both[1])  # different images, different conditions


def test_effnet_default_and_bad_encoders(tmp_path):
    emb = ImageEncoder().encode(images(2))
    assert emb.shape == (2, 1, 1280) and emb.abs().sum() > 0
    with pytest.raises(PipelineError, match="only global token is its pooled features; use `mean`"):
        ImageEncoder(tokens="cls")
    with pytest.raises(PipelineError, match="cannot be loaded .*local folder"):
        ImageEncoder("no-such-org/no-such-encoder", "cls")


def test_spherical_mixes_keep_the_norm_and_end_at_the_sources():
    a, b = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    for how in ("slerp", "lerp"):
        torch.testing.assert_close(mix(a, b, 0.0, how), a)
        torch.testing.assert_close(mix(a, b, 1.0, how), b)
    mid = mix(a, b, torch.tensor([0.5]), "slerp")
    torch.testing.assert_close(mid.norm(), torch.tensor(2.0))  # the norms' mean, on the great circle
    torch.testing.assert_close(mid / mid.norm(), torch.tensor([[0.5**0.5, 0.5**0.5]]))
    torch.testing.assert_close(mix(a, b, torch.tensor([0.5]), "lerp"), torch.tensor([[1.5, 0.5]]))
    torch.testing.assert_close(mix(a, 2 * a, torch.tensor([0.5]), "slerp"), 1.5 * a)  # parallel: no 0/0


def image_model(tmp_path, encoder_path):
    encoder = ImageEncoder(encoder_path, "cls")
    vae = tiny_vae().eval()
    data = build_image_pairs(vae, encoder, images(6))
    torch.manual_seed(0)
    unet = build_unet(sample_size=8, in_channels=4, block_out_channels=[16, 32], layers_per_block=1,
                      cross_attention_dim=32, encoder_hid_dim=encoder.dim, attention_head_dim=4, norm_num_groups=8,
                      dropout=0.0)
    sched = make_noise_scheduler(1000)
    cfg = LDMTrainConfig(steps=3, batch_size=4, lr=1e-3, weight_decay=0.0, context_dropout=0.5,
                         sample_posterior=False, grad_clip=1.0, **PLAIN)
    train_ldm(unet, sched, data, cfg, torch.Generator().manual_seed(0))
    pipe = SynthMedPipeline(unet, vae, DDIMScheduler.from_config(sched.config), condition="image",
                            image_encoder_name=encoder_path, image_tokens="cls")
    pipe.save_pretrained(tmp_path / "model")
    return data


def test_training_pairs_each_image_with_its_own_embedding_and_a_zero_null(tmp_path):
    path = tiny_dinov2(tmp_path / "dino")
    data = build_image_pairs(tiny_vae().eval(), ImageEncoder(path, "cls"), images(6))
    assert data.text_emb.shape == (7, 1, 32) and data.uncond_index == 0
    assert torch.equal(data.text_emb[0], torch.zeros(1, 32))
    torch.testing.assert_close(data.text_emb[1:], ImageEncoder(path, "cls").encode(images(6)))
    assert data.image_index.tolist() == list(range(6)) and data.caption_index.tolist() == list(range(1, 7))


def test_saved_image_model_samples_variants_and_mixes_from_seeds_alone(tmp_path):
    path = tiny_dinov2(tmp_path / "dino")
    image_model(tmp_path, path)
    pipe = SynthMedPipeline.from_pretrained(tmp_path / "model")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.image_conditioned
    emb = pipe.embed_images(images(3))
    batch = pipe.generate(emb, [5, 6, 7], num_inference_steps=3, batch_size=3)
    alone = pipe.generate(emb[1:2], [6], num_inference_steps=3)
    assert batch.shape == (3, 1, 16, 16) and (batch[1] == alone[0]).all()  # an image depends on its seed alone
    via_call = pipe(image=images(3)[1:2], num_inference_steps=3, generator=torch.Generator().manual_seed(6),
                    output_type="pt").images
    assert (torch.from_numpy(alone).float() / 255 - via_call).abs().max() < 1 / 255 + 1e-6
    assert not (batch[0] == batch[1]).all()
    with pytest.raises(ValueError, match="conditioned on images"):
        pipe.generate(["a caption"], [0], num_inference_steps=2)


def test_an_encoder_of_another_width_is_refused_when_generating(tmp_path):
    image_model(tmp_path, tiny_dinov2(tmp_path / "dino"))
    other = tiny_dinov2(tmp_path / "dino48", hidden=48)
    pipe = SynthMedPipeline.from_pretrained(tmp_path / "model", image_encoder_name=other)
    with pytest.raises(PipelineError, match="gives 48-wide embeddings but this model was trained on 32-wide"):
        pipe.embed_images(images(1))


def plan_rows():
    files = [f"img{i}.png" for i in range(6)]
    return pd.DataFrame({"prompt_index": range(6), "sample_index": 0, "text": [f"c{i}" for i in range(6)],
                         "label": ["a", "a", "b", "b", "a", "a"], "split": ["train"] * 4 + ["val"] * 2,
                         "source_file_name": files, "seed": range(100, 106)})


def test_image_plan_pairs_sources_of_one_label_and_split():
    plan = image_plan(plan_rows(), ["reconstruction", "interpolation"], [0.25, 0.75], seed=0, where="plan.csv")
    recon, inter = plan[plan["mode"] == "reconstruction"], plan[plan["mode"] == "interpolation"]
    assert len(recon) == len(inter) == 6
    src = plan_rows().set_index("source_file_name")
    for row in inter.itertuples():
        assert row.partner_file_name != row.source_file_name
        assert src.loc[row.partner_file_name, "label"] == row.label and src.loc[row.partner_file_name, "split"] == row.split
    assert sorted(set(inter["r"])) == [0.25, 0.75]
    assert set(inter["seed"]).isdisjoint(recon["seed"])  # an interpolation is not its reconstruction's twin
    again = image_plan(plan_rows(), ["reconstruction", "interpolation"], [0.25, 0.75], seed=0, where="plan.csv")
    pd.testing.assert_frame_equal(plan, again)


def test_image_plan_errors_name_the_label_and_the_fix():
    rows = plan_rows()
    rows.loc[3, "label"] = "c"  # leaves img2 the only `b` of the train split
    with pytest.raises(PipelineError, match="label 'b' has one source image in split 'train' .img2.png.*generate.image.modes"):
        image_plan(rows, ["interpolation"], [0.5], 0, "plan.csv")
    image_plan(rows, ["reconstruction"], [0.5], 0, "plan.csv")  # reconstruction needs one
    rows["source_file_name"] = ""
    with pytest.raises(PipelineError, match="prompts.source: heldout"):
        image_plan(rows, ["reconstruction"], [0.5], 0, "plan.csv")
