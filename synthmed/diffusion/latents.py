"""The training set of a latent diffusion model, encoded once: each training image's VAE posterior (and those of
brightness/contrast-augmented copies), each unique caption's token states (or each image's embedding for
image conditioning), and the (image, caption) pairs that index them.

Encoding happens here, once, not per step: the loop draws pairs and reads their rows. With a cache folder
(the run's, in the local store) the encodings go to disk as DiskArrays, memory holds one batch, and a
resumed run reads them back; in a data-parallel run each process encodes its own share
(`synthmed.data.disk_array.write_in_shares`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from diffusers import AutoencoderKL

from synthmed.core.io import read_table
from synthmed.data.dataset import split_stack, to_model_range
from synthmed.data.disk_array import open_disk_array, write_in_shares
from synthmed.diffusion.sample import pack_latents
from synthmed.core.errors import PipelineError
from synthmed.models.autoencoder import encode_batch_size, encode_posterior
from synthmed.models.image_encoder import ImageEncoder
from synthmed.core.progress import progress
from synthmed.text.encoder import TextEncoder


@dataclass
class LatentPairs:
    latent_mean: torch.Tensor  # [N_images * variants, C, h, w], unscaled VAE posterior mean
    latent_std: torch.Tensor  # [N_images * variants, C, h, w]
    scaling_factor: float
    image_index: torch.Tensor  # [N_pairs] long
    caption_index: torch.Tensor  # [N_pairs] long, into text_emb
    text_emb: torch.Tensor  # [N_captions, L, D]; row `uncond_index` is the empty caption
    text_mask: torch.Tensor  # [N_captions, L]
    uncond_index: int
    variants: int = 1  # encodings per image: the original, then brightness/contrast-augmented copies
    extra_cond: dict[str, torch.Tensor] = field(default_factory=dict)  # more per-caption inputs of the denoiser
    captions: list[str] = field(default_factory=list)  # the caption of each text_emb row

    def cond(self, rows: torch.Tensor, device) -> dict[str, torch.Tensor]:
        """The denoiser's conditioning keyword arguments for these caption rows."""
        return {"encoder_hidden_states": self.text_emb[rows].to(device),
                "encoder_attention_mask": self.text_mask[rows].to(device),
                **{k: v[rows].to(device) for k, v in self.extra_cond.items()}}


def draw_brightness_contrast(shape: tuple[int, ...], brightness: float, contrast: float,
                             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random brightness shift and contrast scale per image (``shape`` broadcasts over an image)."""
    b = (torch.rand(shape, generator=generator) * 2 - 1) * brightness * 2  # [-1, 1] range is 2 wide
    c = 1 + (torch.rand(shape, generator=generator) * 2 - 1) * contrast
    return b, c


def apply_brightness_contrast(images: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] shifted by ``b`` and scaled by ``c`` about their mean; never flipped (prompts encode
    position and side)."""
    mean = images.mean(dim=tuple(range(1, images.ndim)), keepdim=True)
    return ((images - mean) * c + mean + b).clamp(-1, 1)


def encode_latents(vae: AutoencoderKL, images, augment_copies: int = 0, brightness: float = 0.0,
                   contrast: float = 0.0, generator: torch.Generator | None = None, latent_patch: int = 1,
                   to_vae_input: Callable[[torch.Tensor], torch.Tensor] | None = None, cache: Path | None = None):
    """The VAE posterior (mean, std) of each image and of ``augment_copies`` brightness/contrast-augmented
    copies of it, encoded once, here (augmentation costs nothing per training step); the encodings of
    image i are rows i*V .. i*V + V-1, packed in ``latent_patch`` x ``latent_patch`` blocks
    (sample.pack_latents). ``images`` are uint8 (a tensor or a DiskArray), read a batch at a time;
    ``to_vae_input`` maps a batch, in [-1, 1], to what the VAE takes (a pretrained base's channels and size).
    With ``cache`` (a folder) the posteriors go there as DiskArrays, memory holds one batch, and a run that
    finds them there (a resumed one) reads them instead; the augmentations are drawn either way, so the
    generator ends where it would."""
    n, variants = len(images), 1 + augment_copies
    draws = [draw_brightness_contrast((n,) + (1,) * (images.ndim - 1), brightness, contrast, generator)
             for _ in range(augment_copies)]
    if cache is not None:
        found = [open_disk_array(cache / f"{k}.f32") for k in ("mean", "std")]
        if all(a is not None and len(a) == n * variants for a in found):
            return *found, variants

    def vae_input(rows: slice) -> torch.Tensor:
        x = to_model_range(images[rows])
        return x if to_vae_input is None else to_vae_input(x)

    def posteriors(start: int, stop: int):
        size = encode_batch_size(vae_input(slice(start, start + 1)).shape) if stop > start else 1
        for i in progress(range(start, stop, size), desc="encode latents", unit="batch"):
            rows = slice(i, min(i + size, stop))
            x = vae_input(rows)
            views = [x] + [apply_brightness_contrast(x, b[rows], c[rows]) for b, c in draws]
            yield tuple(pack_latents(t, latent_patch)
                        for t in encode_posterior(vae, torch.stack(views, dim=1).flatten(0, 1), size))

    if cache is None:
        means, stds = zip(*posteriors(0, n))
        return torch.cat(means), torch.cat(stds), variants
    mean, std = write_in_shares({cache / "mean.f32": "float32", cache / "std.f32": "float32"}, n, posteriors)
    return mean, std, variants


def build_latent_pairs(vae: AutoencoderKL, encoder: TextEncoder, pairs: pd.DataFrame, images,
                       file_names: list[str], augment_copies: int = 0, brightness: float = 0.0,
                       contrast: float = 0.0, generator: torch.Generator | None = None,
                       latent_patch: int = 1,
                       to_vae_input: Callable[[torch.Tensor], torch.Tensor] | None = None,
                       cache: Path | None = None) -> LatentPairs:
    """Encode each training image once (encode_latents) and each unique caption once (plus the empty one);
    with ``cache`` (a folder), both on disk there."""
    mean, std, variants = encode_latents(vae, images, augment_copies, brightness, contrast, generator, latent_patch,
                                         to_vae_input, cache)
    index_of = {name: i for i, name in enumerate(file_names)}
    captions = [""] + sorted(pairs["text"].unique())
    caption_of = {c: i for i, c in enumerate(captions)}
    emb, mask = encode_captions(encoder, captions, cache)
    return LatentPairs(
        latent_mean=mean, latent_std=std, scaling_factor=float(vae.config.scaling_factor),
        image_index=torch.tensor([index_of[f] for f in pairs["file_name"]]),
        caption_index=torch.tensor([caption_of[c] for c in pairs["text"]]),
        text_emb=emb, text_mask=mask, uncond_index=0, variants=variants, captions=captions,
    )


def encode_captions(encoder: TextEncoder, captions: list[str], cache: Path | None = None):
    """(token states [N, L, D], attention masks [N, L]) of ``captions``; with ``cache``, the states on disk
    (and read from there by a run that finds them)."""
    if cache is None:
        return encoder.encode(captions)
    states, masks = open_disk_array(cache / "text.f32"), open_disk_array(cache / "text_mask.i64")
    if states is None or masks is None or len(states) != len(captions):
        states, masks = write_in_shares({cache / "text.f32": "float32", cache / "text_mask.i64": "int64"},
                                        len(captions), lambda i, j: encoder.encode_batches(captions[i:j]))
    return states, masks[:]


def build_image_pairs(vae: AutoencoderKL, encoder: ImageEncoder, images, augment_copies: int = 0,
                      brightness: float = 0.0, contrast: float = 0.0, generator: torch.Generator | None = None,
                      latent_patch: int = 1, cache: Path | None = None) -> LatentPairs:
    """DiNO-Diffusion's training set: each image conditioned on its own global token(s) from the frozen image
    encoder, embedded once (as the latents are). Row 0 is the null condition, all zeros, that condition
    dropout trains in place of an embedding (the UNet's projection turns it into its bias alone), so
    classifier-free guidance works. Augmented copies keep the embedding of the original image. The global
    tokens (one or two per image) are held in memory; with ``cache`` they and the latents are encoded there, as in
    `build_latent_pairs`."""
    mean, std, variants = encode_latents(vae, images, augment_copies, brightness, contrast, generator, latent_patch,
                                         cache=cache)
    n = len(images)
    if cache is None:
        emb = encoder.encode(images)
    else:
        emb = open_disk_array(cache / "image.f32")
        if emb is None or len(emb) != n:
            emb, = write_in_shares({cache / "image.f32": "float32"}, n, lambda i, j: (
                (encoder.encode(images[k:min(k + 64, j)]),) for k in range(i, j, 64)))
        emb = emb[:]
    emb = torch.cat([torch.zeros_like(emb[:1]), emb])
    return LatentPairs(
        latent_mean=mean, latent_std=std, scaling_factor=float(vae.config.scaling_factor),
        image_index=torch.arange(n), caption_index=torch.arange(n) + 1,
        text_emb=emb, text_mask=torch.ones(emb.shape[:2], dtype=torch.long), uncond_index=0, variants=variants,
    )


def select_caption_sources(pairs: pd.DataFrame, sources: list[str], where: str) -> pd.DataFrame:
    """The rows whose caption_source is listed; `paraphrase` stands for every non-original row, so the
    default trains on whatever the paraphrase stage produced. A named backend with no rows is an error:
    silently training on fewer captions than asked is how a comparison goes wrong."""
    produced = set(pairs["caption_source"])
    for name in set(sources) - {"paraphrase"} - produced:
        raise PipelineError(f"{where}: train_ldm.caption_sources lists '{name}' but the paraphrase stage produced "
                            f"no '{name}' rows (found: {', '.join(sorted(produced))}); list `paraphrase` to "
                            "take whatever it produced, or change paraphrase.backend")
    wanted = set(sources) | ((produced - {"original"}) if "paraphrase" in sources else set())
    return pairs[pairs["caption_source"].isin(wanted)]


def training_rows(dataset: str, pairs_file: str, caption_sources: list[str]):
    """(train pairs of the chosen caption sources, train rows, train images, val rows, val images); the images
    uint8 on disk, encoded a batch at a time."""
    pairs = read_table(pairs_file)
    pairs = select_caption_sources(pairs[pairs["split"] == "train"], caption_sources, pairs_file)
    rows, images = split_stack(dataset, ["train"])
    val_rows, val_images = split_stack(dataset, ["val"])
    return pairs, rows, images, val_rows, val_images


def require_captions(pairs: pd.DataFrame, images: pd.DataFrame, where: str) -> None:
    """Text conditioning needs a caption for every training image; an image collection without them
    (label-free data) trains with `condition: image`. ``where``: the captions' file, for the message."""
    captioned = set(pairs.loc[pairs["text"].str.strip() != "", "file_name"])
    bare = images[~images["file_name"].isin(captioned)]
    if len(bare):
        raise PipelineError(f"{where}: {len(bare)} of {len(images)} train images have no "
                            f"caption (first: {bare['file_name'].iloc[0]}); train_ldm.condition: text needs one per "
                            "image: add captions, or set train_ldm.condition: image to train on the images alone")




@dataclass
class Conditioning:
    """What train_ldm trains on for its ``condition``: the encoder, the encoded train and val sets, the UNet's
    conditioning widths, and the progress grid's conditions (val captions, or val images' embeddings, with
    the source images shown beside their variants)."""
    encoder: TextEncoder | ImageEncoder
    data: LatentPairs
    val_data: LatentPairs
    unet_dims: dict[str, int]
    grid_conditions: list[str] | torch.Tensor
    grid_sources: list  # images shown before the samples (image conditioning: the sources)
    grid_captions: list[str]
    pairs: pd.DataFrame  # the (image, caption) rows trained on


def conditioning(p, vae: AutoencoderKL, device, pairs: pd.DataFrame, rows: pd.DataFrame, images,
                 val_rows: pd.DataFrame, val_images, generator: torch.Generator, cache: Path,
                 captions_file: str) -> Conditioning:
    """train_ldm's training set for ``p.condition`` (text: the captions of ``pairs``; image: each image's own
    embedding), encoded into ``cache``; ``captions_file`` is named when an image has no caption. The grid shows 8 val conditions spread over the split, the same at
    every check."""
    from synthmed.viz import to_array

    if p.condition == "image" and images.ndim == 5:
        raise PipelineError("params.yaml: train_ldm.condition=image needs 2-D images (the image encoders are 2-D); "
                            "use condition: text for volumes")
    at = torch.linspace(0, len(val_rows) - 1, 8).long().unique()
    augment = dict(augment_copies=p.augment_copies, brightness=p.brightness, contrast=p.contrast,
                   generator=generator, latent_patch=p.unet.latent_patch, cache=cache / "train")
    if p.condition == "image":
        encoder = ImageEncoder(p.image_encoder, p.image_tokens, device)
        data = build_image_pairs(vae, encoder, images, **augment)
        val_data = build_image_pairs(vae, encoder, val_images, latent_patch=p.unet.latent_patch, cache=cache / "val")
        return Conditioning(encoder, data, val_data, dict(cross_attention_dim=p.unet.block_out_channels[-1],
                                                          encoder_hid_dim=encoder.dim),
                            val_data.text_emb[at + 1], [to_array(x) for x in val_images[at]],
                            [f"val image {i}" for i in at.tolist()] + ["its variant"] * len(at),
                            rows.assign(caption_source="image"))  # one (image, its own embedding) pair per image
    require_captions(pairs, rows, captions_file)
    encoder = TextEncoder(p.text_encoder, p.text_max_length, device)
    data = build_latent_pairs(vae, encoder, pairs, images, rows["file_name"].tolist(), **augment)
    val_data = build_latent_pairs(vae, encoder, val_rows, val_images, val_rows["file_name"].tolist(),
                                  latent_patch=p.unet.latent_patch, cache=cache / "val")
    captions = val_rows["text"].iloc[at].tolist()
    return Conditioning(encoder, data, val_data, dict(cross_attention_dim=encoder.hidden_size), captions, [],
                        captions, pairs)
