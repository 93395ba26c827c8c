"""LoRA adapters (peft) on a frozen pretrained denoiser, checked before peft sees them.

peft reports a target module that matches nothing late and cryptically; `add_lora` checks the names
first and lists the ones that exist. Only the adapter trains: every base weight stays frozen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass
class LoraParams:
    rank: int
    alpha: float
    dropout: float
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module, e.g. [to_q, to_k, to_v, to_out.0]")


def adaptable_names(model: nn.Module) -> list[str]:
    """The short names a target module may use: the last component of every Linear/Conv layer's dotted
    name, the last two where it ends in an index (`to_out.0`); peft matches targets against name ends."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv1d)) and name:
            parts = name.split(".")
            names.add(".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1])
    return sorted(names)


def matches(model: nn.Module, target: str) -> int:
    """How many layers of ``model`` the target module name would adapt."""
    return sum(1 for name, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d)) and (name == target or name.endswith("." + target)))


def add_lora(model: nn.Module, p: LoraParams, what: str, adapter_name: str = "default") -> int:
    """Freeze ``model`` and add a LoRA adapter on ``p.target_modules``; return the adapter's parameter count.
    ``what`` names the model in errors (e.g. "the Stable Diffusion UNet")."""
    from peft import LoraConfig

    missing = [t for t in p.target_modules if not matches(model, t)]
    if missing:
        raise ValueError(f"target_modules {missing} match no layer of {what}; its adaptable layers are named: "
                         f"{', '.join(adaptable_names(model))}")
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=p.rank, lora_alpha=p.alpha, lora_dropout=p.dropout, init_lora_weights="gaussian",
                                 target_modules=list(p.target_modules)), adapter_name=adapter_name)
    return sum(x.numel() for x in model.parameters() if x.requires_grad)
