"""LoGo (Zhang et al. 2022): global–global and local–global views pulled together (DINO's terms),
local–local views of one image pushed apart through a learned affinity.

The affinity network is this objective's own trainable module: it trains with the student (its own loss)
and is never copied into the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pwself.models import HeadOutput
from pwself.objectives.base import Objective
from pwself.sections import NON_NEGATIVE, check_ranges
from pwself.views import MultiCropViews

if TYPE_CHECKING:
    from pwself.models import HeadConfig
    from pwself.objectives.base import LossConfig
    from pwself.views import ViewConfig

__all__ = ["LoGo", "LoGoOptions", "LoGoAffinity"]


class LoGoAffinity(nn.Module):
    """LoGo's learned affinity between two local representations (LoGo's paper), trained against the encoder.

    ``f(z_a, z_b) = MLP([z_a * z_b, |z_a - z_b|])`` on L2-normalized inputs. The network maximizes the
    paper's Eq. 6, ``E[f(z_1, z_2)] - E[f(z_1, z_-)]`` (two local views of one image against local views of
    different images), on detached representations; the encoder minimizes ``E[f(z_1, z_2)]`` through a copy
    of ``f`` whose parameters are detached, which pushes local views of one image apart while the DINO
    terms keep global-global and local-global pairs together. Eq. 6 is a difference of means and is
    unbounded unless ``f`` is: spectral normalization of every layer bounds its Lipschitz constant (as
    in SN-GAN), so its output and its gradient to the representations stay bounded.

    Args:
        dim: Representation width.
        hidden: Hidden width of the MLP.
    """

    def __init__(self, dim: int, hidden: int = 256) -> None:
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        self.net = nn.Sequential(sn(nn.Linear(2 * dim, hidden)), nn.GELU(), sn(nn.Linear(hidden, 1)))

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        """``[N, D]``, ``[N, D]`` -> ``[N]`` affinities (higher: more alike)."""
        z_a, z_b = F.normalize(z_a, dim=-1), F.normalize(z_b, dim=-1)
        return self.net(torch.cat([z_a * z_b, (z_a - z_b).abs()], -1))[:, 0]

    def terms(self, local: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder term and affinity-network loss from ``[L, B, D]`` local representations (L >= 2).

        Returns:
            ``(encoder_term, affinity_loss)``: the mean same-image affinity (gradient to the
            representations only) and minus Eq. 6 (gradient to the affinity network only).
        """
        n_local = local.shape[0]
        if n_local < 2:
            raise ValueError("LoGo needs at least 2 local views (views.n_local)")
        ia, ib = torch.triu_indices(n_local, n_local, offset=1)
        same_a, same_b = local[ia].flatten(0, 1), local[ib].flatten(0, 1)
        other_b = local[ib].roll(1, dims=1).flatten(0, 1)  # the same view index of the next image
        frozen = {k: v.detach() for k, v in self.named_parameters()}
        encoder_term = torch.func.functional_call(self, frozen, (same_a, same_b)).mean()
        affinity_loss = self(same_a.detach(), other_b.detach()).mean() - self(same_a.detach(), same_b.detach()).mean()
        return encoder_term, affinity_loss


class _LocalTerms(nn.Module):
    """``forward(local) = affinity.terms(local)``: the call that ``DistributedDataParallel`` wraps."""

    def __init__(self, affinity: LoGoAffinity) -> None:
        super().__init__()
        self.affinity = affinity

    def forward(self, local: Tensor) -> tuple[Tensor, Tensor]:
        return self.affinity.terms(local)


@dataclass
class LoGoOptions:
    """LoGo's own knobs (``objectives.logo.*``).

    Attributes:
        weight: Weight lambda of the local-local affinity term (1e-4: the paper's, for SimSiam-LoGo).
    """

    weight: float = 1e-4

    def validate(self, prefix: str) -> None:
        check_ranges(self, prefix, {"weight": NON_NEGATIVE})


class LoGo(Objective):
    """DINO's terms plus ``weight`` times the same-image local affinity, plus the affinity network's loss."""

    Options = LoGoOptions

    def __init__(self, loss: LossConfig, out_dim: int, embed_dim: int, patch_out_dim: int | None = None,
                 options: LoGoOptions | None = None) -> None:
        super().__init__(loss, out_dim, embed_dim, patch_out_dim, options)
        self.logo_weight = self.options.weight
        self.local_terms = _LocalTerms(LoGoAffinity(embed_dim))
        self.wrap_trainable(lambda module: module)

    @classmethod
    def config_problem(cls, views: ViewConfig, head: HeadConfig, loss: LossConfig) -> str | None:
        if views.n_local < 2:
            return f"views.n_local={views.n_local}: it pushes local views apart, use views.n_local=2 or more"
        return super().config_problem(views, head, loss)

    def loss(self, student: HeadOutput, teacher: HeadOutput, views: MultiCropViews, teacher_temp: float
             ) -> dict[str, Tensor]:
        terms = super().loss(student, teacher, views, teacher_temp)
        local = student.cls_tokens[views.n_global * views.batch_size:].unflatten(0, (views.n_local, views.batch_size))
        encoder_term, affinity_loss = self._call_local_terms(local)
        return {**terms, "loss": terms["loss"] + self.logo_weight * encoder_term + affinity_loss,
                "local_affinity": encoder_term.detach(), "affinity_loss": affinity_loss.detach()}

    def wrap_trainable(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        # Kept out of the module tree (a plain attribute), so state_dict keys stay those of local_terms.
        self.__dict__["_call_local_terms"] = wrap(self.local_terms)
