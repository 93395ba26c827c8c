"""synthmed: a reproducible pipeline for synthetic medical image–text data."""

__version__ = "0.1.0"

# diffusers' pipeline loader resolves a saved component ["synthmed", "<class>"] as getattr(synthmed, class)
# and finds its load method through getattr(synthmed, "ModelMixin"): resolved lazily, so that importing
# synthmed stays light.
_LAZY = {"ConditionalUNet": "synthmed.models.cond_unet", "VolumeAutoencoderKL": "synthmed.models.volume_autoencoder",
         "ModelMixin": "diffusers"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'synthmed' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
