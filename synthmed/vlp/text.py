"""The pipeline's text encoder as the VLP text tower: mean-pooled token states, frozen or with
its last layers tuned."""

from __future__ import annotations

import torch
from torch import nn

from synthmed.core.runtime import device_of
from synthmed.text.encoder import TextEncoder


def _layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of BERT-family (MiniLM) or CLIP text models."""
    for path in ("encoder.layer", "text_model.encoder.layers", "encoder.layers"):
        obj = model
        try:
            for name in path.split("."):
                obj = getattr(obj, name)
            return obj
        except AttributeError:
            continue
    raise ValueError(f"{type(model).__name__}: cannot find its transformer layers to tune")


class TextTower(nn.Module):
    def __init__(self, encoder: TextEncoder, trainable_layers: int):
        super().__init__()
        self.encoder, self.model = encoder, encoder.model
        self.trainable_layers = trainable_layers
        self.model.requires_grad_(False)
        if trainable_layers:
            for layer in _layers(self.model)[-trainable_layers:]:
                layer.requires_grad_(True)
        self.out_features = encoder.hidden_size
        self._frozen: dict[str, torch.Tensor] = {}  # caption -> pooled features, while no layer is tuned

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(self.encoder.tokenizer(texts, padding="max_length", truncation=True,
                                           max_length=self.encoder.max_length, return_tensors="pt"))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(1) / mask.sum(1).clamp_min(1)

    @torch.no_grad()
    def pooled(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Pooled features of many captions, on the CPU. A frozen tower encodes each distinct caption once per
        process: every arm and seed of a study reads the same captions."""
        if self.trainable_layers:
            return self._encode(texts, batch_size)
        new = list(dict.fromkeys(t for t in texts if t not in self._frozen))
        self._frozen.update(zip(new, self._encode(new, batch_size)))
        return torch.stack([self._frozen[t] for t in texts]) if texts else torch.zeros(0, self.out_features)

    def _encode(self, texts: list[str], batch_size: int) -> torch.Tensor:
        was = self.model.training
        self.model.eval()
        out, device = [], device_of(self.model)
        for i in range(0, len(texts), batch_size):
            tok = self.tokenize(texts[i : i + batch_size])
            out.append(self(tok["input_ids"].to(device), tok["attention_mask"].to(device)).float().cpu())
        self.model.train(was)
        return torch.cat(out) if out else torch.zeros(0, self.out_features)
