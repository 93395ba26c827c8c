import torch

from synthmed.text.encoder import TextEncoder


def test_minilm_token_embeddings_offline():
    enc = TextEncoder(max_length=16)
    emb, mask = enc.encode(["axial slice at z = +10 mm", "sagittal slice", ""])
    assert emb.shape == (3, 16, 384) and mask.shape == (3, 16) and enc.hidden_size == 384
    assert mask[2].sum() == 2  # the empty caption is just [CLS] [SEP]
    assert not torch.allclose(emb[0], emb[1])
    again, _ = enc.encode(["axial slice at z = +10 mm"])
    assert torch.allclose(again[0], emb[0], atol=1e-5)


def test_unloadable_encoder_says_which_and_how(monkeypatch):
    import pytest

    from synthmed.core.errors import PipelineError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PipelineError, match=r"text encoder 'openai/clip-vit-large-patch14' cannot be loaded.*local folder"):
        TextEncoder("openai/clip-vit-large-patch14")
