"""Self-distillation objectives over CLS and matched patch tokens (SPEC §4).

Pairs are (teacher global view ``i``, student view ``j``) with ``j != i``. For pair ``p`` and sample ``b``:

* ``H_cls[p, b] = H(t_cls[i, b], s_cls[j, b])``
* ``S[p, b]`` = the sum of ``H`` over the matched patch pairs, ``n[p, b]`` their count.

with ``H(t, s) = -sum softmax((t - C) / tau_t) * log_softmax(s / tau_s)``. Then, per pair and sample:

* ``dino``: ``H_cls``
* ``pwml``: ``(H_cls + S) / (1 + n)`` (mean over the CLS pair and the matched patch pairs)
* ``pwsl``: ``H_cls + S``
* ``pwll``: ``lam * H_cls + (1 - lam) * S / n``, and ``H_cls`` alone when ``n == 0``
* ``bagssl`` (BagSSL, seed 002): the teacher target of an image is the bag, its head applied to the mean
  of the CLS tokens of all teacher views; every student view (a fixed-size patch of the image when the
  views are configured so) predicts it: pairs are (bag, view j) for every j, ``H_cls`` only
* ``cossl`` (CO-SSL, seed 004): as ``pwml``, but every student patch token of view ``j`` is paired with
  the teacher's CLS of view ``i`` (local, pre-pooling representations aligned with the global one);
  those targets are CLS outputs, so they are centred with the CLS center

and the loss is the mean over all pairs and samples. Centering uses one EMA center for CLS outputs and
one for patch outputs; the centers are updated by an explicit call, never as a side effect of the loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "OBJECTIVES",
    "Center",
    "soft_cross_entropy",
    "combine_terms",
    "term_weights",
    "pair_targets",
    "target_cross_entropy",
    "PatchWiseDistillationLoss",
    "view_pairs",
    "LoGoAffinity",
]

Objective = Literal["dino", "pwml", "pwsl", "pwll", "cossl", "logo", "bagssl"]
OBJECTIVES: tuple[str, ...] = ("dino", "pwml", "pwsl", "pwll", "cossl", "logo", "bagssl")


def view_pairs(n_global: int, n_views: int) -> list[tuple[int, int]]:
    """(teacher global, student view) pairs, a view never teaching itself: ``G * V - G`` pairs."""
    return [(i, j) for i in range(n_global) for j in range(n_views) if j != i]


class Center(nn.Module):
    """EMA center of teacher logits, ``C <- m * C + (1 - m) * mean(x)``, all-reduced under DDP.

    Args:
        dim: Logit dimension ``K``.
        momentum: EMA momentum ``m``.
    """

    center: Tensor

    def __init__(self, dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))

    @torch.no_grad()
    def update(self, logits: Tensor) -> None:
        """Update from ``[N, K]`` teacher logits (every row counts once); no-op when ``N == 0``."""
        stats = torch.cat([logits.float().sum(0), logits.new_tensor([logits.shape[0]], dtype=torch.float32)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(stats)
        count = stats[-1]
        if count == 0:
            return
        mean = stats[:-1] / count
        self.center.mul_(self.momentum).add_(mean[None], alpha=1 - self.momentum)


def soft_cross_entropy(teacher_probs: Tensor, student_logits: Tensor, student_temp: float) -> Tensor:
    """``-sum_k t_k log softmax(s / tau_s)_k`` over the last axis, computed in float32."""
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(teacher_probs.float() * log_p).sum(-1)


def term_weights(n_patch: Tensor, objective: Objective, lam: float = 0.5) -> tuple[Tensor, Tensor]:
    """Weights ``(a, c)`` with which each objective combines ``H_cls`` and the patch sum ``S`` per (pair, sample).

    Every objective is ``a * H_cls + c * S`` with ``a`` and ``c`` depending on the match count only; the
    efficient patch loss relies on that (each patch cross-entropy enters with a weight known in advance).

    Args:
        n_patch: ``[P, B]`` number of matched patch pairs.
        objective: One of :data:`OBJECTIVES`.
        lam: Weight of the CLS term for ``pwll``.

    Returns:
        ``[P, B]`` float weights of ``H_cls`` and of ``S``.
    """
    n = n_patch.float()
    one, zero = torch.ones_like(n), torch.zeros_like(n)
    if objective in ("dino", "logo", "bagssl"):  # logo adds its local-local term outside (LoGoAffinity)
        return one, zero
    if objective in ("pwml", "cossl"):  # the mean over the CLS pair and the matched patch pairs
        w = 1 / (1 + n)
        return w, w
    if objective == "pwsl":
        return one, one
    if objective == "pwll":  # H_cls alone when nothing matched
        has = n_patch > 0
        return torch.where(has, lam, one), torch.where(has, (1 - lam) / n.clamp(min=1), zero)
    raise ValueError(f"unknown objective {objective!r}: use one of {', '.join(OBJECTIVES)}")


def combine_terms(
    h_cls: Tensor, patch_sum: Tensor, n_patch: Tensor, objective: Objective, lam: float = 0.5
) -> Tensor:
    """Per-(pair, sample) objective, averaged over pairs and samples.

    Args:
        h_cls: ``[P, B]`` CLS cross-entropies.
        patch_sum: ``[P, B]`` sums of the matched patch cross-entropies.
        n_patch: ``[P, B]`` number of matched patch pairs.
        objective: ``dino``, ``pwml``, ``pwsl`` or ``pwll``.
        lam: Weight of the CLS term for ``pwll``.

    Returns:
        Scalar loss.
    """
    cls_w, patch_w = term_weights(n_patch, objective, lam)
    return (cls_w * h_cls + patch_w * patch_sum).mean()


def pair_targets(
    teacher_probs: Tensor, student_rows: Tensor, teacher_rows: Tensor, weights: Sequence[Tensor], n_student: int
) -> list[Tensor]:
    """Weighted teacher distributions summed per student row: ``Q[u] = sum_{n: s_n = u} w[n] * t[t_n]``.

    Every pair ``n`` contributes ``w[n] * H(t[t_n], s[s_n])`` to a sum that is linear in the student's
    log-probabilities, so ``sum_n w[n] * H_n = -sum_u <Q[u], log_softmax(s[u])>``: one ``[U, K]`` product
    instead of ``[N, K]`` gathered copies. One ``embedding_bag`` (a bag per student row) per weight vector,
    the bags laid out once, without gradient.

    Args:
        teacher_probs: ``[Ut, K]`` teacher distributions.
        student_rows: ``[N]`` long student row of each pair.
        teacher_rows: ``[N]`` long teacher row of each pair.
        weights: ``[N]`` weight vectors, one target wanted for each.
        n_student: Number ``U`` of student rows.

    Returns:
        One ``[U, K]`` float32 target per weight vector (separate tensors, so each can be freed alone).
    """
    order = torch.argsort(student_rows, stable=True)  # a bag is a contiguous run of the input
    counts = torch.bincount(student_rows, minlength=n_student)
    offsets, rows = torch.cumsum(counts, 0) - counts, teacher_rows[order]
    with torch.no_grad(), torch.autocast(teacher_probs.device.type, enabled=False):
        table = teacher_probs.float()
        return [F.embedding_bag(rows, table, offsets, mode="sum", per_sample_weights=w[order].float()) for w in weights]


class _TargetCrossEntropy(torch.autograd.Function):
    """``-sum_u <Q_u, log_softmax(z_u / tau)>`` with a hand-written backward,
    ``dz = g (softmax(z / tau) * sum_k Q - Q) / tau``: it keeps the logits and ``Q`` where autograd through
    log_softmax keeps more ``[U, K]`` buffers, and those dominate a PW-Self step on the CPU. The same sum
    for further targets is reported without gradient."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, temp: float, *reported: Tensor) -> tuple[Tensor, ...]:  # noqa: ANN001
        dtype = torch.promote_types(logits.dtype, torch.float32)  # float32 at least; float64 stays
        with torch.autocast(logits.device.type, enabled=False):  # a bf16 sum of thousands of terms is too coarse
            z = logits.to(dtype) / temp
            lse = torch.logsumexp(z, -1)
            sums = [t.to(dtype).sum(-1) @ lse - t.to(dtype).flatten() @ z.flatten() for t in (target, *reported)]
        ctx.save_for_backward(logits, target, lse)
        ctx.temp = temp
        ctx.mark_non_differentiable(*sums[1:])
        return tuple(sums)

    @staticmethod
    def backward(ctx, grad: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        logits, target, lse = ctx.saved_tensors
        with torch.autocast(logits.device.type, enabled=False):
            target = target.to(lse.dtype)
            g = logits.to(lse.dtype) / ctx.temp
            g.sub_(lse[:, None]).exp_().mul_(target.sum(-1, keepdim=True)).sub_(target)
            g.mul_(grad.to(lse.dtype) / ctx.temp)
        return (g.to(logits.dtype), None, None) + (None,) * (len(ctx.needs_input_grad) - 3)


def target_cross_entropy(logits: Tensor, target: Tensor, temp: float, *reported: Tensor) -> tuple[Tensor, ...]:
    """``-sum_u <target[u], log_softmax(logits[u] / temp)>`` in float32 (at least), differentiable in ``logits``.

    Args:
        logits: ``[U, K]`` student logits.
        target: ``[U, K]`` summed teacher distributions (:func:`pair_targets`).
        temp: Student temperature.
        *reported: More ``[U, K]`` targets whose sums are returned too, without gradient (a metric).

    Returns:
        ``(loss, *reported_sums)``, scalars.
    """
    return _TargetCrossEntropy.apply(logits, target, temp, *reported)


class PatchWiseDistillationLoss(nn.Module):
    """DINO and the PW-Self losses (PWML, PWSL, PWLL) with separate CLS and patch centers.

    Args:
        out_dim: Head output dimension ``K``.
        objective: ``dino``, ``pwml``, ``pwsl`` or ``pwll``.
        lam: CLS weight for ``pwll``.
        student_temp: Student temperature ``tau_s``.
        center_momentum: EMA momentum of both centers.
    """

    def __init__(
        self,
        out_dim: int,
        objective: Objective = "pwml",
        lam: float = 0.5,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}: use one of {', '.join(OBJECTIVES)}")
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"pwll lambda {lam} is outside [0, 1]")
        self.objective, self.lam, self.student_temp = objective, lam, student_temp
        self.cls_center = Center(out_dim, center_momentum)
        self.patch_center = Center(out_dim, center_momentum)

    @property
    def uses_patches(self) -> bool:
        return self.objective not in ("dino", "logo", "bagssl")

    def teacher_probs(self, logits: Tensor, center: Center, teacher_temp: float) -> Tensor:
        """Centered and sharpened teacher distribution ``softmax((t - C) / tau_t)``, no gradient."""
        return F.softmax((logits.detach().float() - center.center) / teacher_temp, dim=-1)

    def forward(
        self,
        student_cls: Tensor,
        teacher_cls: Tensor,
        pairs: list[tuple[int, int]],
        teacher_temp: float,
        student_patch: Tensor | None = None,
        teacher_patch: Tensor | None = None,
        patch_pair_index: Tensor | None = None,
        student_patch_index: Tensor | None = None,
        teacher_patch_index: Tensor | None = None,
        patch_count: Tensor | None = None,
        patch_weight: float = 1.0,
        recompute_head: Callable[[Tensor], Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Compute the loss and its terms.

        Args:
            student_cls: ``[V, B, K]`` student CLS logits of every view.
            teacher_cls: ``[G, B, K]`` teacher CLS logits of the global views.
            pairs: The ``P`` (teacher view, student view) pairs, e.g. :func:`view_pairs`.
            teacher_temp: Teacher temperature for this step.
            student_patch: ``[Us, K]`` student logits of matched patch tokens: one row per matched pair
                (``Us = N``), or one per distinct token with ``student_patch_index`` mapping pairs to rows.
            teacher_patch: ``[Ut, K]`` teacher logits of the matching teacher patch tokens, likewise.
            patch_pair_index: ``[N]`` long, ``p * B + b`` for each matched patch pair.
            student_patch_index: ``[N]`` long row of ``student_patch`` for each matched pair (default:
                row ``n`` for pair ``n``). Softmaxes then run once per distinct token.
            teacher_patch_index: ``[N]`` long row of ``teacher_patch`` for each matched pair.
            patch_count: ``[P * B]`` long number of matched pairs of each (pair, sample) when the ``N``
                given are a random subset of them (default: counted from ``patch_pair_index``).
            patch_weight: Factor on every patch cross-entropy: ``1 / fraction`` for a subset drawn with
                probability ``fraction``, which keeps the patch sums unbiased.
            recompute_head: When given, ``student_patch`` holds the student's patch *tokens* (before the
                head) and ``recompute_head`` is the head: head and patch cross-entropies run under
                activation checkpointing, so their activations (``[Us, K]`` logits and more) are
                recomputed in backward instead of kept. Same loss and gradients, less memory.

        Returns:
            ``loss`` (scalar to minimize), ``cls`` (mean CLS cross-entropy), ``patch`` (mean over
            pairs and samples with a match of the mean patch cross-entropy) and ``n_match`` (mean
            matched patch pairs per pair and sample).
        """
        n_pairs, batch, dev = len(pairs), student_cls.shape[1], student_cls.device
        t_idx = torch.tensor([i for i, _ in pairs], device=dev)
        s_idx = torch.tensor([j for _, j in pairs], device=dev)
        t_probs = self.teacher_probs(teacher_cls, self.cls_center, teacher_temp)
        h_cls = soft_cross_entropy(t_probs[t_idx], student_cls[s_idx], self.student_temp)  # [P, B]

        n_patch = torch.zeros(n_pairs * batch, dtype=torch.long, device=h_cls.device)
        matched = self.uses_patches and student_patch is not None and student_patch.shape[0] > 0
        if matched:
            assert teacher_patch is not None and patch_pair_index is not None
            n_patch = torch.bincount(patch_pair_index, minlength=n_pairs * batch)
        if self.uses_patches and patch_count is not None:
            n_patch = patch_count.to(n_patch.device)
        cls_w, patch_w = term_weights(n_patch.view(n_pairs, batch), self.objective, self.lam)
        loss = (cls_w * h_cls).mean()
        patch_mean = h_cls.new_zeros(())
        if matched:
            center = self.cls_center if self.objective == "cossl" else self.patch_center
            t_probs_patch = self.teacher_probs(teacher_patch, center, teacher_temp)
            n_match = patch_pair_index.shape[0]
            s_rows = student_patch_index if student_patch_index is not None else torch.arange(n_match, device=dev)
            t_rows = teacher_patch_index if teacher_patch_index is not None else torch.arange(n_match, device=dev)
            # The loss is linear in every patch cross-entropy, with weights known from the counts: the
            # teacher targets of all pairs sharing a student token are summed first (pair_targets), so
            # the graph holds one [Us, K] product, not [N, K] gathered copies. The reported metric, the
            # mean over (pair, sample) with a match of (sum of patch H) / count, is another such sum.
            has = n_patch > 0
            w_loss = patch_w.flatten()[patch_pair_index] * (patch_weight / (n_pairs * batch))
            w_report = patch_weight / (has.sum() * n_patch[patch_pair_index]).float()
            n_s = student_patch.shape[0]
            target, report = pair_targets(t_probs_patch, s_rows, t_rows, (w_loss, w_report), n_s)
            if recompute_head is None:
                patch_term, patch_mean = target_cross_entropy(student_patch, target, self.student_temp, report)
            else:
                patch_term, patch_mean = checkpoint(
                    lambda tokens: target_cross_entropy(recompute_head(tokens), target, self.student_temp, report),
                    student_patch, use_reentrant=False)
            loss = loss + patch_term
        return {
            "loss": loss,
            "cls": h_cls.mean().detach(),
            "patch": patch_mean.detach(),
            "n_match": n_patch.float().mean(),
        }

    @torch.no_grad()
    def update_centers(self, teacher_cls: Tensor, teacher_patch: Tensor | None = None) -> None:
        """EMA-update the CLS center from ``[..., K]`` teacher CLS logits and the patch center from the
        ``[U, K]`` teacher logits of the patch tokens that entered the loss (each token once)."""
        self.cls_center.update(teacher_cls.reshape(-1, teacher_cls.shape[-1]))
        if self.uses_patches and self.objective != "cossl" and teacher_patch is not None:
            self.patch_center.update(teacher_patch)


class LoGoAffinity(nn.Module):
    """LoGo's learned affinity between two local representations (seed 003), trained against the encoder.

    ``phi(z_a, z_b) = MLP([z_a * z_b, |z_a - z_b|])`` with spectrally normalized layers, so its gradient
    with respect to the representations is bounded. The affinity network learns to tell local views of
    the same image from local views of different images (logistic loss on detached representations);
    the encoder minimizes the affinity of same-image local pairs (through a copy of ``phi`` whose
    parameters are detached), which pushes local views of one image apart while the DINO terms keep
    global–global and local–global pairs together.

    Args:
        dim: Representation width.
        hidden: Hidden width of the MLP.
    """

    def __init__(self, dim: int, hidden: int = 256) -> None:
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        self.net = nn.Sequential(sn(nn.Linear(2 * dim, hidden)), nn.GELU(), sn(nn.Linear(hidden, 1)))

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        """``[N, D]``, ``[N, D]`` -> ``[N]`` affinity logits."""
        z_a, z_b = F.normalize(z_a, dim=-1), F.normalize(z_b, dim=-1)
        return self.net(torch.cat([z_a * z_b, (z_a - z_b).abs()], -1))[:, 0]

    def terms(self, local: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder term and affinity-network loss from ``[L, B, D]`` local representations (L >= 2).

        Returns:
            ``(encoder_term, affinity_loss)``: the mean same-image affinity (gradient to the
            representations only) and the discriminator loss (gradient to the affinity network only).
        """
        n_local = local.shape[0]
        if n_local < 2:
            raise ValueError("LoGo needs at least 2 local views (views.n_local)")
        ia, ib = torch.triu_indices(n_local, n_local, offset=1)
        same_a, same_b = local[ia].flatten(0, 1), local[ib].flatten(0, 1)
        other_b = local[ib].roll(1, dims=1).flatten(0, 1)  # the same view index of the next image
        frozen = {k: v.detach() for k, v in self.named_parameters()}
        encoder_term = torch.func.functional_call(self, frozen, (same_a, same_b)).mean()
        logits_same = self(same_a.detach(), same_b.detach())
        logits_other = self(same_a.detach(), other_b.detach())
        affinity_loss = F.softplus(-logits_same).mean() + F.softplus(logits_other).mean()
        return encoder_term, affinity_loss
