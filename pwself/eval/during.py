"""The ``eval`` section of a run config: what a pretraining run evaluates while it trains and when it ends.

Training itself only trains: it calls the evaluation callbacks its caller passes (:mod:`pwself.experiment`
gives kNN with its floors and the dense probe), and those read these settings.
"""

from __future__ import annotations

from dataclasses import dataclass

from pwself.sections import NON_NEGATIVE, ConfigError, check_ranges

__all__ = ["EvalConfig"]


@dataclass
class EvalConfig:
    """Evaluation during and after training.

    Attributes:
        knn_at_end: Evaluate kNN on the held-out split when training ends.
        knn_every_epochs: Also evaluate kNN every N epochs during training (0: never; 0.5: twice an epoch);
            each row of ``knn_history.jsonl`` carries the training seconds so far (evaluation excluded).
        knn_floors: Beside the final kNN, the same protocol on a random init of the backbone and on raw
            pixels (when small enough): the numbers that give the result meaning.
        dense_every_epochs: Also run the dense probe on ``dense_data`` every N epochs and at the end (0: never):
            ``dense_history.jsonl`` rows carry the training seconds so far, for a dense learning curve.
        dense_data: A dense dataset (``pwself make-scenes`` layout) for ``dense_every_epochs``.
    """

    knn_at_end: bool = True
    knn_every_epochs: float = 0
    knn_floors: bool = True
    dense_every_epochs: float = 0
    dense_data: str = ""

    def validate(self) -> None:
        check_ranges(self, "eval", {k: NON_NEGATIVE for k in ("knn_every_epochs", "dense_every_epochs")})
        if self.dense_every_epochs and not self.dense_data:
            raise ConfigError(f"eval.dense_every_epochs={self.dense_every_epochs} needs eval.dense_data=DIR (made by "
                              "pwself make-scenes)")

    @property
    def knn(self) -> bool:
        """Whether kNN runs at all (at the end or during training)."""
        return bool(self.knn_at_end or self.knn_every_epochs)
