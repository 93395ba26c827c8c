"""LoRA fine-tuning (train_lora): a synthmed base adapted by the real stage, its adapter file reloaded onto a
fresh base, the merged model sampled by generate's loader; bad params stop with one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from diffusers import DDIMScheduler

from synthmed.diffusion.bases import ADAPTER_FILE, load_adapter, load_base
from synthmed.diffusion.generators import load_generator
from synthmed.diffusion.pipeline import SynthMedPipeline
from synthmed.diffusion.schedulers import make_noise_scheduler
from synthmed.core.errors import PipelineError
from synthmed.models.lora import LoraParams, add_lora
from tests.conftest import REPO_ROOT
from tests.helpers import StageRun, run_stage_here, tiny_unet, tiny_vae, write_imagefolder
from tests.e2e.harness import tiny_params


def test_rank_and_target_modules_are_checked_before_peft():
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        LoraParams(rank=0, alpha=4, dropout=0.0)
    with pytest.raises(ValueError, match=r"match no layer of the tiny UNet.*to_q.*to_v"):
        add_lora(tiny_unet(), LoraParams(rank=4, alpha=4, dropout=0.0, target_modules=["to_q", "to_query"]),
                 "the tiny UNet")


def test_only_the_adapter_trains():
    unet = tiny_unet()
    n = add_lora(unet, LoraParams(rank=2, alpha=2, dropout=0.0), "the tiny UNet")
    trained = [name for name, p in unet.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in name for name in trained)
    assert n == sum(p.numel() for p in unet.parameters() if p.requires_grad) < sum(p.numel() for p in unet.parameters())


def write_base(folder: Path) -> None:
    sched = DDIMScheduler.from_config(make_noise_scheduler(1000).config)
    SynthMedPipeline(tiny_unet(), tiny_vae().eval(), sched, text_max_length=8).save_pretrained(folder)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """The train_lora stage run once on a synthmed base (this tiny model) and a 16 px dataset."""
    work = tmp_path_factory.mktemp("lora")
    names = [f"img{i}.png" for i in range(12)]
    split = ["train"] * 8 + ["val"] * 4
    captions = [f"{'axial' if i % 2 else 'coronal'} slice at z = {i} mm" for i in range(12)]
    write_imagefolder(work / "data/ingest/dataset", list(zip(names, captions)), size=16, split=split)
    pairs = pd.DataFrame({"file_name": names, "text": captions, "caption_source": "original", "split": split})
    (work / "data/paraphrase").mkdir(parents=True)
    pairs.to_csv(work / "data/paraphrase/pairs.csv", index=False)
    write_base(work / "data/train_ldm/model")
    params = tiny_params()
    params["train_lora"].update(base="synthmed", steps=6, validate_every=3, checkpoint_every=3, lr=0.01)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    proc = run_stage_here(work, "train_lora")
    assert proc.returncode == 0, proc.stderr
    return work


def unet_out(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, pipe.unet.config.in_channels, 8, 8, generator=g)
    emb = torch.randn(2, 8, 384, generator=g)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([10, 500]), encoder_hidden_states=emb).sample


def test_synthmed_base_adapter_reloads_and_changes_the_model(lora_run):
    adapter = lora_run / "data/train_lora/adapter"
    assert (adapter / ADAPTER_FILE).is_file() and "rank 4, alpha 4" in (adapter / "README.md").read_text()
    assert sorted(p.name for p in (lora_run / "data/train_lora/progress").iterdir()) == [
        "unet_step0000003.png", "unet_step0000006.png"]
    base = load_base("synthmed", str(lora_run / "data/train_ldm/model"))
    before = unet_out(base.pipe)
    load_adapter("synthmed", base.unet, adapter)
    adapted = unet_out(base.pipe)
    merged = load_generator(lora_run / "data/train_lora/model")
    assert isinstance(merged, SynthMedPipeline)
    assert not torch.allclose(before, adapted, atol=1e-4)  # the adapter learned something
    torch.testing.assert_close(unet_out(merged), adapted, atol=1e-5, rtol=1e-4)  # merged = base + adapter
    images = merged.generate(["axial slice at z = 3 mm"], [1], num_inference_steps=3)
    assert images.shape == (1, 1, 16, 16)


def test_adapter_on_another_base_is_refused(lora_run, tmp_path):
    torch.manual_seed(1)
    from synthmed.models.unet import build_unet

    other = build_unet(sample_size=8, in_channels=4, block_out_channels=[16, 32], layers_per_block=2,
                       cross_attention_dim=384, attention_head_dim=4, norm_num_groups=8, dropout=0.0)
    SynthMedPipeline(other, tiny_vae().eval(), DDIMScheduler.from_config(make_noise_scheduler(1000).config),
                     text_max_length=8).save_pretrained(tmp_path / "other")
    with pytest.raises(PipelineError, match=r"trained on the synthmed base .*train_ldm/model .*not on the synthmed "
                                            r"base .*other"):
        load_adapter("synthmed", load_base("synthmed", str(tmp_path / "other")).unet,
                     lora_run / "data/train_lora/adapter", str(tmp_path / "other"))


def run_with(lora_run: Path, tmp_path: Path, **values) -> StageRun:
    work = tmp_path / "w"
    shutil.copytree(lora_run / "data/ingest", work / "data/ingest")
    shutil.copytree(lora_run / "data/paraphrase", work / "data/paraphrase")
    shutil.copytree(lora_run / "data/train_ldm", work / "data/train_ldm")
    params = yaml.safe_load((lora_run / "params.yaml").read_text())
    params["train_lora"].update(values)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    return run_stage_here(work, "train_lora")


@pytest.mark.parametrize("values, fragment", [
    ({"base": "kandinsky"}, "train_lora.base"),
    ({"rank": 0}, "rank must be a positive integer"),
    ({"target_modules": ["to_query"]}, "match no layer of the synthmed UNet"),
    ({"base": "stable-diffusion", "path": "data/train_ldm/model"}, "not a stable-diffusion pipeline folder"),
    ({"base": "kandinsky-2.2", "path": "data/train_ldm/model"}, "kandinsky.prior_path is empty"),
    ({"text_encoder_lora": True}, "text_encoder_lora is for base stable-diffusion"),
])
def test_bad_params_stop_with_one_line_and_write_nothing(lora_run, tmp_path, values, fragment):
    proc = run_with(lora_run, tmp_path, **values)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and fragment in lines[0], proc.stderr
    assert not (tmp_path / "w/data/train_lora/model").exists()


def test_base_none_passes_train_ldm_model_through(lora_run, tmp_path):
    proc = run_with(lora_run, tmp_path, base="none")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "w/data/train_lora/model"
    assert (out / "unet/diffusion_pytorch_model.safetensors").read_bytes() == \
        (lora_run / "data/train_ldm/model/unet/diffusion_pytorch_model.safetensors").read_bytes()


# --- Stable Diffusion: a tiny pipeline built from configs, saved, fine-tuned by the stage, reloaded ---

def sd_image(pipe, steps=3):
    with torch.no_grad():
        return pipe("axial slice at z = 3 mm", num_inference_steps=steps, guidance_scale=3.0, output_type="np",
                    generator=torch.Generator().manual_seed(7)).images


@pytest.mark.parametrize("text_encoder_lora", [False, True], ids=["unet", "unet_and_text_encoder"])
def test_stable_diffusion_adapter_loads_in_plain_diffusers_and_generate_samples_the_merged_model(lora_run, tmp_path,
                                                                                                 text_encoder_lora):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from tests.helpers import tiny_stable_diffusion

    sd = tiny_stable_diffusion(tmp_path / "sd")
    proc = run_with(lora_run, tmp_path, base="stable-diffusion", path=str(sd), alpha=8, steps=6, validate_every=0,
                    text_encoder_lora=text_encoder_lora, lr=0.05)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "w/data/train_lora"
    keys = load_file(out / "adapter" / ADAPTER_FILE).keys()
    assert any(k.startswith("unet.") for k in keys)
    assert any(k.startswith("text_encoder.") for k in keys) == text_encoder_lora
    plain = StableDiffusionPipeline.from_pretrained(sd)
    plain.set_progress_bar_config(disable=True)
    before = sd_image(plain)
    plain.load_lora_weights(out / "adapter")  # the user's way, alpha (8 != rank 4) from the file's metadata
    assert plain.unet.peft_config["default_0"].lora_alpha == 8
    adapted = sd_image(plain)
    merged = load_generator(out / "model")
    assert abs(adapted - before).max() > 1e-3
    assert abs(sd_image(merged.pipe) - adapted).max() < 1e-3  # merged = base + adapter
    prompts, seeds = ["axial slice at z = 3 mm", "coronal slice at y = 2 mm", "axial slice"], [1, 2, 3]
    batched = torch.cat([b for _, b in merged.generate_batches(prompts, seeds, num_inference_steps=2, batch_size=2)])
    assert batched.shape == (3, 1, 16, 16) and batched.dtype == torch.uint8  # the dataset's channels and size
    _, alone = next(merged.generate_batches(prompts[2:], seeds[2:], num_inference_steps=2))
    assert torch.equal(alone[0], batched[2])  # an image depends on its seed, not on its batch


# --- Kandinsky 2.2: prior and decoder adapters, loaded the diffusers way, merged into a combined pipeline ---

def test_kandinsky_prior_and_decoder_adapters_load_and_generate_samples_the_merged_pipeline(lora_run, tmp_path):
    from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

    from synthmed.diffusion.kandinsky import KandinskyBase
    from tests.helpers import tiny_kandinsky

    prior_dir, decoder_dir = tiny_kandinsky(tmp_path / "k22")
    proc = run_with(lora_run, tmp_path, base="kandinsky-2.2", path=str(decoder_dir), resolution=32, steps=4,
                    validate_every=0, kandinsky={"prior_path": str(prior_dir), "parts": ["prior", "decoder"],
                                                 "prior_target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
                                                 "decoder_target_modules": ["to_q", "to_k", "to_v", "to_out.0",
                                                                            "add_k_proj", "add_v_proj"]})
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "w/data/train_lora"
    metrics = yaml.safe_load((tmp_path / "w/metrics/all/train_lora.json").read_text())
    assert {"val_loss_ema_prior", "val_loss_ema_decoder"} <= set(metrics)

    def combined(adapted: bool):
        prior, decoder = (KandinskyV22PriorPipeline.from_pretrained(prior_dir),
                          KandinskyV22Pipeline.from_pretrained(decoder_dir))
        if adapted:  # the user's way: model-level loading, as diffusers' Kandinsky pipelines have no loader
            prior.prior.load_lora_adapter(out / "adapter/prior", use_safetensors=True, prefix=None)
            decoder.unet.load_lora_adapter(out / "adapter/decoder", use_safetensors=True, prefix=None)
        return KandinskyBase(prior, decoder, 32).combined()

    def image(pipe):
        with torch.no_grad():
            return pipe("axial slice", num_inference_steps=2, prior_num_inference_steps=2, height=32, width=32,
                        output_type="np", generator=torch.Generator().manual_seed(3)).images

    adapted = image(combined(True))
    assert abs(adapted - image(combined(False))).max() > 1e-3
    merged = load_generator(out / "model")
    assert abs(image(merged.pipe) - adapted).max() < 1e-3  # merged = base + adapters
    prompts, seeds = ["axial slice", "coronal slice", "sagittal slice"], [4, 5, 6]
    batched = torch.cat([b for _, b in merged.generate_batches(prompts, seeds, num_inference_steps=2, batch_size=2)])
    assert batched.shape == (3, 1, 16, 16)
    _, alone = next(merged.generate_batches(prompts[2:], seeds[2:], num_inference_steps=2))
    assert torch.equal(alone[0], batched[2])
