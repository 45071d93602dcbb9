"""pwself: patch-wise self-supervised pretraining of Vision Transformers (PW-Self, DINO and relatives)."""

__version__ = "0.1.0"
