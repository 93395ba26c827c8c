"""synthmed: a reproducible pipeline for synthetic medical image–text data."""

__version__ = "0.1.0"
