"""Pretrained text-to-image pipelines that LoRA fine-tuning starts from, and their adapter files.

Kinds: ``synthmed`` (a `SynthMedPipeline` folder, e.g. `data/train_ldm/model` of a run on another
dataset) and ``stable-diffusion`` (any `StableDiffusionPipeline` folder or hub id, SD 1.x / 2.x).
Each base gives the training loop what `train_ldm` gives it: a UNet, a VAE, a noise schedule and a
text encoder with `encode(texts) -> (embeddings, mask)`, so that one loop and one loss train both.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline

from synthmed.core.errors import PipelineError
from synthmed.diffusion.schedulers import training_scheduler
from synthmed.models.unet import downsampling

KINDS = ("synthmed", "stable-diffusion")
PIPELINE_CLASSES = {"synthmed": "SynthMedPipeline", "stable-diffusion": "StableDiffusionPipeline"}
ADAPTER_FILE = "pytorch_lora_weights.safetensors"
BASE_RECORD = "base.json"  # beside an adapter: the base it was trained on
DATA_FORMAT = "data_format.json"  # beside a fine-tuned pipeline: the channels and size of the images it stands in for


class PromptEncoder:
    """A diffusers pipeline's own prompt encoding (`encode_prompt`: CLIP tokens padded to 77, no attention
    mask, as Stable Diffusion samples), behind the trainer's `encode(texts) -> (embeddings, mask)`."""

    def __init__(self, pipe: DiffusionPipeline):
        self.pipe = pipe
        self.hidden_size = pipe.text_encoder.config.hidden_size

    def encode(self, texts: list[str], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        embs, masks = zip(*self.encode_batches(texts, batch_size))
        return torch.cat(embs), torch.cat(masks)

    @torch.no_grad()
    def encode_batches(self, texts: list[str], batch_size: int = 64):
        for i in range(0, len(texts), batch_size):
            emb = self.pipe.encode_prompt(texts[i : i + batch_size], self.pipe.device, 1, False)[0].float().cpu()
            yield emb, torch.ones(emb.shape[:2], dtype=torch.long)  # all ones: the UNet sees every token, as in sampling


    def token_ids(self, texts: list[str]) -> torch.Tensor:
        tok = self.pipe.tokenizer
        return tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids


class TextTunedUNet(torch.nn.Module):
    """Stable Diffusion's UNet behind its own text encoder, for training an adapter on both: the captions'
    token ids come in (`input_ids`), the encoder's states (with gradient) go to the UNet."""

    def __init__(self, unet: torch.nn.Module, text_encoder: torch.nn.Module):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder
        self.config = unet.config

    def forward(self, x, t, encoder_hidden_states=None, encoder_attention_mask=None, input_ids=None):
        return self.unet(x, t, encoder_hidden_states=self.text_encoder(input_ids)[0])


@dataclass
class Base:
    kind: str
    pipe: DiffusionPipeline
    encoder: object  # encode(texts) -> (embeddings [N, L, D], mask [N, L]); hidden_size
    resolution: int  # the image side the base generates (its UNet's sample size x the VAE's factor)

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    def noise_scheduler(self):
        """The training noise schedule of the base: its own betas and prediction type."""
        return training_scheduler(self.pipe.scheduler)

    def to_vae_input(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] of the dataset -> the VAE's channels and the base's resolution."""
        return to_rgb_at(images, self.vae.config.in_channels, self.resolution)


def quiet_loading() -> None:
    """No per-component loading bars or import notices on stderr: a stage's stderr is its one-line error."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()  # e.g. "CLIPImageProcessor requires torchvision"


def _class_in(folder: Path) -> str | None:
    index = folder / "model_index.json"
    return json.loads(index.read_text()).get("_class_name") if index.is_file() else None


def open_pipeline(cls, path: str, kind: str, param: str = "train_lora.path", **kwargs):
    """``cls.from_pretrained(path)``, refusing a folder of another pipeline class and explaining a hub id
    that cannot be fetched offline."""
    quiet_loading()
    folder = Path(path)
    if folder.exists():
        found = _class_in(folder)
        if found != cls.__name__:
            raise PipelineError(f"{path}: not a {kind} pipeline folder (its model_index.json names "
                                f"{found or 'nothing: there is none'}; {kind} needs {cls.__name__})")
    try:
        pipe = cls.from_pretrained(path, local_files_only=folder.exists(), **kwargs)
    except OSError as exc:
        raise PipelineError(f"{kind} base {path!r} cannot be loaded ({str(exc).splitlines()[0]}); without a network, "
                            f"download it elsewhere (e.g. `hf download {path} --local-dir models/base`), copy the "
                            f"folder here and set {param} to it") from None
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    return pipe


def to_rgb_at(images: torch.Tensor, channels: int, resolution: int) -> torch.Tensor:
    """Images in [-1, 1] -> ``channels`` (greyscale repeated) at ``resolution`` (bilinear, antialiased)."""
    if images.shape[1] != channels:
        if images.shape[1] != 1:
            raise PipelineError(f"{images.shape[1]}-channel images cannot feed a {channels}-channel autoencoder")
        images = images.repeat(1, channels, 1, 1)
    if images.shape[-1] != resolution:
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", antialias=True,
                               align_corners=False).clamp(-1, 1)
    return images


def load_base(kind: str, path: str, device: torch.device | str = "cpu", resolution: int = 0) -> Base:
    """The pretrained pipeline ``path`` (a local folder, or a hub id where there is a network) of ``kind``;
    ``resolution`` 0 = the base's native image size."""
    if kind not in KINDS:
        raise PipelineError(f"params.yaml: train_lora.base {kind!r} is not a base kind; use one of none, "
                            f"{', '.join(KINDS)}, kandinsky-2.2")
    quiet_loading()
    if kind == "synthmed":
        from synthmed.diffusion.pipeline import SynthMedPipeline

        if not Path(path).exists():
            raise PipelineError(f"{path}: no such folder (a synthmed base is a local SynthMedPipeline folder, "
                                "e.g. data/train_ldm/model of a finished run)")
        pipe = open_pipeline(SynthMedPipeline, path, kind).to(device)
        if pipe.image_conditioned:
            raise PipelineError(f"{path}: an image-conditioned model (train_ldm.condition: image); train_lora "
                                "fine-tunes text-conditioned ones: set train_lora.base: none")
        if type(pipe.unet).__name__ != "UNet2DConditionModel":
            raise PipelineError(f"{path}: its UNet is a {type(pipe.unet).__name__} (a volume model or "
                                "train_ldm.unet.backbone: invertible); train_lora adapts diffusers' 2-D UNet: set "
                                "train_lora.base: none")
        encoder = pipe.text_encoder
    else:
        from diffusers import StableDiffusionPipeline

        pipe = open_pipeline(StableDiffusionPipeline, path, kind, safety_checker=None,
                             requires_safety_checker=False).to(device)
        encoder = PromptEncoder(pipe)
    native = pipe.unet.config.sample_size * downsampling(pipe.vae.config.block_out_channels)
    if kind == "synthmed":  # packed latents: the UNet's grid is the latent grid / patch
        native *= round((pipe.unet.config.out_channels // pipe.vae.config.latent_channels) ** 0.5)
        if resolution and resolution != native:
            raise PipelineError(f"params.yaml: train_lora.resolution={resolution}, but the synthmed base {path} "
                                f"makes {native}x{native} images; set it to 0 or {native}")
    return Base(kind, pipe, encoder, resolution or native)


def model_signature(model: torch.nn.Module) -> str:
    """A hash of a model's architecture (its config): an adapter fits the models that share it."""
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_adapter(kind: str, model: torch.nn.Module, folder: Path, base_path: str,
                 text_encoder: torch.nn.Module | None = None) -> None:
    """``model``'s LoRA weights as ``pytorch_lora_weights.safetensors`` with their config (rank, alpha),
    loadable the diffusers way: `StableDiffusionPipeline.load_lora_weights(folder)` for Stable Diffusion,
    `model.load_lora_adapter(folder, use_safetensors=True, prefix=None)` for the others; plus `base.json`,
    the base it was trained on."""
    if kind == "stable-diffusion":
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        def layers(m):
            return convert_state_dict_to_diffusers(get_peft_model_state_dict(m)) if m is not None else None

        # the adapters' configs travel with them: without them a reload assumes alpha = rank
        StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers=layers(model), text_encoder_lora_layers=layers(text_encoder),
            safe_serialization=True, unet_lora_adapter_metadata=model.peft_config["default"].to_dict(),
            text_encoder_lora_adapter_metadata=text_encoder.peft_config["default"].to_dict() if text_encoder else None)
    else:
        model.save_lora_adapter(folder, weight_name=ADAPTER_FILE)
    (Path(folder) / BASE_RECORD).write_text(json.dumps({"kind": kind, "path": base_path,
                                                       "signature": model_signature(model)}, indent=1) + "\n")


def load_adapter(kind: str, model: torch.nn.Module, folder: Path, base_path: str = "", pipe=None) -> None:
    """Load a saved adapter onto ``model`` of a freshly loaded base (the inverse of save_adapter), or, given
    a Stable Diffusion ``pipe``, onto its UNet and text encoder as `load_lora_weights` does; an adapter
    trained on another kind of base or another architecture is refused, naming both."""
    record = Path(folder) / BASE_RECORD
    if record.is_file():
        was = json.loads(record.read_text())
        if was["kind"] != kind or was["signature"] != model_signature(model):
            raise PipelineError(f"{folder}: this LoRA adapter was trained on the {was['kind']} base {was['path']} "
                                f"(architecture {was['signature']}), not on the {kind} base {base_path or '?'} "
                                f"(architecture {model_signature(model)}); load it onto the base it was trained on")
    try:
        if pipe is not None:
            pipe.load_lora_weights(folder, weight_name=ADAPTER_FILE)
        else:  # Stable Diffusion's file prefixes the UNet's keys with "unet."
            model.load_lora_adapter(folder, weight_name=ADAPTER_FILE, use_safetensors=True,
                                    prefix="unet" if kind == "stable-diffusion" else None)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise PipelineError(f"{folder}: this LoRA adapter does not fit the {kind} base "
                            f"({str(exc).splitlines()[0][:200]})") from None
