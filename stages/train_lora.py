"""DVC stage `train_lora`: LoRA fine-tuning of a pretrained text-to-image pipeline; `generate` samples its output.

`base: none` (the default) hands train_ldm's model to generate unchanged. The other bases are fine-tuned
with peft LoRA by train_ldm's loop (the same loss, context dropout for guidance, EMA of the adapter,
checkpoints and resume): `synthmed` (a SynthMedPipeline folder, by default this run's own train_ldm
model) and `stable-diffusion` (a folder or hub id) on their UNet's attention; `kandinsky-2.2` on its
prior and/or its decoder UNet, one after the other.

Outputs: `data/train_lora/adapter/` (`pytorch_lora_weights.safetensors`, one folder per Kandinsky part,
`base.json`, model card) and `data/train_lora/model/` (the base with the adapters merged, what generate
samples). The merged model is made by loading the saved adapters onto a fresh copy of the base, so a
written adapter is one that loads.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from typing import Literal

from synthmed.diffusion.config import LDMTrainConfig
from synthmed.core.io import atomic_path
from synthmed.models.lora import LoraParams
from synthmed.core.stage import Stage, run_stage

SCRATCH = "data/train_ldm/model"  # the default base (synthmed): this run's own train_ldm model


@dataclass
class KandinskyParams:
    prior_path: str  # the KandinskyV22PriorPipeline (train_lora.path: the decoder, KandinskyV22Pipeline)
    parts: list[Literal["prior", "decoder"]]  # which get an adapter
    prior_target_modules: list[str]
    decoder_target_modules: list[str]

    def __post_init__(self):
        if not self.parts:
            raise ValueError("kandinsky.parts must name prior, decoder or both")


@dataclass
class TrainLoraParams(LDMTrainConfig):  # the training-loop knobs, plus the base's and the adapter's
    base: Literal["none", "synthmed", "stable-diffusion", "kandinsky-2.2"]
    path: str  # the base: a local pipeline folder or a hub id; "" = data/train_ldm/model (synthmed)
    kandinsky: KandinskyParams
    rank: int
    alpha: float
    lora_dropout: float
    target_modules: list[str]
    text_encoder_lora: bool  # stable-diffusion: an adapter on the CLIP text encoder too
    text_encoder_target_modules: list[str]
    resolution: int  # training image side for a pretrained base; 0 = its native size
    caption_sources: list[Literal["original", "paraphrase", "rule", "llm"]]
    validate_every: int  # steps between validation losses + sample grids (0 = only at the end)

    def __post_init__(self):
        super().__post_init__()
        self.lora = LoraParams(self.rank, self.alpha, self.lora_dropout, self.target_modules)  # checks them
        if self.base in ("stable-diffusion", "kandinsky-2.2") and not self.path:
            raise ValueError(f"path is empty: name the {self.base} pipeline (a local folder or a hub id)")
        if self.text_encoder_lora and self.base != "stable-diffusion":
            raise ValueError(f"text_encoder_lora is for base stable-diffusion; {self.base} has no text encoder "
                             "it trains with")
        if self.base == "kandinsky-2.2" and not self.kandinsky.prior_path:
            raise ValueError("kandinsky.prior_path is empty: name the Kandinsky 2.2 prior pipeline (a local folder "
                             "or a hub id, e.g. kandinsky-community/kandinsky-2-2-prior)")

    @property
    def base_path(self) -> str:
        return self.path or SCRATCH

    def kandinsky_lora(self, part: str) -> LoraParams:
        k = self.kandinsky
        return LoraParams(self.rank, self.alpha, self.lora_dropout,
                          k.prior_target_modules if part == "prior" else k.decoder_target_modules)


def pass_through(stage: Stage) -> None:
    """base: none: generate samples train_ldm's model; the adapter folder says there is none."""
    scratch, model = stage.dep("train_ldm/model"), stage.out_path("model")
    with atomic_path(model, is_dir=True) as tmp:
        shutil.copytree(scratch, tmp, dirs_exist_ok=True)
    with atomic_path(stage.out_path("adapter"), is_dir=True) as tmp:
        (tmp / "README.md").write_text(f"# No LoRA adapter\n\n`train_lora.base: none`: `{model}` is "
                                       "train_ldm's model, unchanged. Set `train_lora.base` to fine-tune one.\n")
    with atomic_path(stage.out_path("progress"), is_dir=True) as tmp:  # a declared output: DVC wants it
        (tmp / "README.md").write_text("No adapter was trained (`train_lora.base: none`); train_ldm's progress grids "
                                       "are in data/train_ldm/progress.\n")
    stage.write_provenance([scratch])
    stage.write_metrics({"lora_parameters": 0}, headline=["lora_parameters"])
    print(f"train_lora: base none: {model} is {scratch}")


def main(stage: Stage) -> None:
    if stage.params.base == "none":
        return pass_through(stage)
    from synthmed.diffusion.lora_finetune import finetune  # diffusers, peft: only when a base is tuned

    finetune(stage)


def cli(argv: list[str] | None = None) -> int:
    return run_stage(main, TrainLoraParams, argv, data_parallel=True)


if __name__ == "__main__":
    sys.exit(cli())
