"""Evaluation of frozen features."""

from pwself.eval.features import extract_features
from pwself.eval.knn import knn_classify

__all__ = ["extract_features", "knn_classify"]
