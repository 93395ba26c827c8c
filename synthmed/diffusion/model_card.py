"""What train_ldm ships beside its weights: the model card (usage, training figures, every param) and the
summary line; and the pipeline folder written with the weights that ship (the EMA's)."""

from __future__ import annotations

from pathlib import Path

from diffusers.training_utils import EMAModel

from synthmed.core.config import as_dict
from synthmed.diffusion.loop import TAIL, trained_parameters
from synthmed.diffusion.pipeline import SynthMedPipeline
from synthmed.core.io import atomic_path


USAGE = {"text": """Text-to-image latent diffusion (MSDM-style) trained by the `train_ldm` stage of synthmed.
Conditioning: frozen `{p.text_encoder}` token embeddings (max {p.text_max_length} tokens).

```python
import torch
from synthmed.diffusion.pipeline import SynthMedPipeline
pipe = SynthMedPipeline.from_pretrained("data/train_ldm/model")
image = pipe("Superior axial T1-weighted brain MRI slice at z = +40 mm", num_inference_steps=50,
             guidance_scale=3.0, generator=torch.Generator().manual_seed(0)).images[0]  # a PIL image
```
""", "image": """Image-conditioned latent diffusion (DiNO-Diffusion) trained by the `train_ldm` stage of synthmed.
Conditioning: the `{p.image_tokens}` global token(s) of the frozen image encoder `{p.image_encoder}`, linearly
projected to the cross-attention width; the all-zero embedding is the null condition of guidance.

```python
import torch
from synthmed.diffusion.pipeline import SynthMedPipeline
pipe = SynthMedPipeline.from_pretrained("data/train_ldm/model")
# variants of real images (uint8 [N, C, H, W]); or pipe(image_embeds=...) from mixed embeddings
images = pipe(image=real_images, num_inference_steps=50, guidance_scale=3.0,
              generator=torch.Generator().manual_seed(0)).images
```
"""}


def model_card(p, seed: int, fingerprint: str, metrics: dict) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in as_dict(p).items())
    return f"""# synthmed latent diffusion model

{USAGE[p.condition].format(p=p)}
Weights: {'the EMA (decay ' + str(p.ema_decay) + ')' if p.ema_decay > 0 else 'the final training weights'}.

- Run fingerprint (params, seed {seed}, input hashes, code, device, precision, processes, CPU mode, package versions): `{fingerprint}`
- Training data: {metrics['train_images']} images, {metrics['train_pairs']} (image, condition) pairs, \
{metrics['unique_captions']} unique captions; hashes in `provenance.json` next to this folder
- Loss (min-SNR-weighted as trained): training, mean of the last {min(TAIL, p.steps)} steps \
{metrics[f'train_loss_last{TAIL}_mean']:.4f}; validation, these weights {metrics['val_loss_ema']:.4f} \
(the raw training weights {metrics['val_loss_raw']:.4f}); UNet parameters: {metrics['parameters']:,}

| param | value |
|---|---|
{rows}
"""


def save_model(pipe: SynthMedPipeline, ema: EMAModel | None, card: str, folder: str | Path) -> None:
    """The pipeline folder with the weights that ship: the EMA's when training kept one."""
    if ema is not None:
        ema.copy_to(trained_parameters(pipe.unet))
    with atomic_path(folder, is_dir=True) as tmp:
        pipe.to("cpu").save_pretrained(tmp)
        (tmp / "README.md").write_text(card)


def summary_line(n_pairs: int, n_images: int, log: list[dict], metrics: dict) -> str:
    """The stage's last line: the last step's loss and the reported mean, each called what it is."""
    return (f"train_ldm: {n_pairs} pairs over {n_images} images; last-step loss {log[-1]['loss']:.4f}, "
            f"mean of last {len(log[-TAIL:])} steps {metrics[f'train_loss_last{TAIL}_mean']:.4f}; "
            f"val_loss_ema {metrics['val_loss_ema']:.4f}, val_loss_raw {metrics['val_loss_raw']:.4f}")
