"""Geometric patch matching between two views of the same image (docs/algorithm.md §3).

Two views ``a`` and ``b`` carry their crop box ``(x0, y0, x1, y1)`` in pixels of the original image
(x1, y1 exclusive), a horizontal-flip flag and a patch grid ``(rows, cols)``. Patches of both views that
lie in the intersection of the boxes (strictly more than half of the patch on each axis) are paired
axis by axis; the longer run is subsampled to the shorter with ``(i * (N - 1)) // (n - 1)``.

Two implementations that agree exactly on every input:

* :func:`match_pair`: the plain reference for one pair of views (Python floats and loops).
* :func:`match_patches`: vectorized over a batch of view pairs (tensors, no Python loop over samples).

Both compute in float64 with the same operations in the same order, so their decisions coincide bit
for bit. Token indices exclude the CLS token: patch token ``k`` is sequence position ``k + 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

MATCHERS = ("geometric", "feature-nn")  # loss.matcher: by crop geometry (docs/algorithm.md §3), or by content (EsViT)

__all__ = ["match_pair", "match_patches", "PatchPairs", "match_views", "match_features", "match_views_by_features",
           "axis_run", "pair_runs"]


def axis_run(lo_a: float, hi_a: float, n_cells: int, lo_i: float, hi_i: float) -> tuple[int, int]:
    """Contiguous run of cells of one view axis that lie inside an interval.

    Args:
        lo_a: Start of the view's box on this axis (original-image pixels).
        hi_a: End of the view's box on this axis (exclusive).
        n_cells: Number of patches of the view along this axis.
        lo_i: Start of the intersection interval.
        hi_i: End of the intersection interval.

    Returns:
        ``(start, length)``; ``length == 0`` when no cell overlaps the interval by more than half.
    """
    width = (hi_a - lo_a) / n_cells
    start, length = 0, 0
    for c in range(n_cells):
        cell_lo = lo_a + c * width
        cell_hi = lo_a + (c + 1) * width
        overlap = min(cell_hi, hi_i) - max(cell_lo, lo_i)
        if 2.0 * overlap > width:
            if length == 0:
                start = c
            length += 1
    return start, length


def pair_runs(start_a: int, len_a: int, start_b: int, len_b: int) -> list[tuple[int, int]]:
    """Pair the cells of two runs on one axis (docs/algorithm.md §3 step 3).

    Args:
        start_a: First cell of view a's run.
        len_a: Length of view a's run.
        start_b: First cell of view b's run.
        len_b: Length of view b's run.

    Returns:
        ``(cell_a, cell_b)`` pairs, ordered by the shorter run; empty if either run is empty.
    """
    n, big = min(len_a, len_b), max(len_a, len_b)
    if n == 0:
        return []
    pairs = []
    for i in range(n):
        j = (big - 1) // 2 if n == 1 else (i * (big - 1)) // (n - 1)
        pairs.append((start_a + i, start_b + j) if len_a <= len_b else (start_a + j, start_b + i))
    return pairs


def match_pair(
    box_a: Sequence[float],
    flip_a: bool,
    grid_a: tuple[int, int],
    box_b: Sequence[float],
    flip_b: bool,
    grid_b: tuple[int, int],
) -> list[tuple[int, int]]:
    """Matched patch tokens of two views of one image: the plain reference.

    Args:
        box_a: Crop box ``(x0, y0, x1, y1)`` of view a in original-image pixels.
        flip_a: Whether view a was flipped horizontally after cropping.
        grid_a: Patch grid ``(rows, cols)`` of view a.
        box_b: Crop box of view b.
        flip_b: Whether view b was flipped.
        grid_b: Patch grid of view b.

    Returns:
        List of ``(token_a, token_b)`` patch-token indices (CLS excluded), row-major: row pair first,
        then column pair. Empty when the boxes do not overlap enough.

    Example:
        Two views of 2x2 patches of an 8x8 image: the same crop, once flipped (columns swap); then a crop of
        the right half, whose left column of patches lies inside the right column of the first:

        >>> import pwself
        >>> pwself.match_pair((0, 0, 8, 8), False, (2, 2), (0, 0, 8, 8), True, (2, 2))
        [(0, 1), (1, 0), (2, 3), (3, 2)]
        >>> pwself.match_pair((0, 0, 8, 8), False, (2, 2), (4, 0, 8, 8), False, (2, 2))
        [(1, 0), (3, 2)]
    """
    ax0, ay0, ax1, ay1 = (float(v) for v in box_a)
    bx0, by0, bx1, by1 = (float(v) for v in box_b)
    rows_a, cols_a = grid_a
    rows_b, cols_b = grid_b
    ix0, iy0, ix1, iy1 = max(ax0, bx0), max(ay0, by0), min(ax1, bx1), min(ay1, by1)
    if ix1 <= ix0 or iy1 <= iy0:
        return []
    row_pairs = pair_runs(*axis_run(ay0, ay1, rows_a, iy0, iy1), *axis_run(by0, by1, rows_b, iy0, iy1))
    col_pairs = pair_runs(*axis_run(ax0, ax1, cols_a, ix0, ix1), *axis_run(bx0, bx1, cols_b, ix0, ix1))
    out = []
    for ra, rb in row_pairs:
        for ca, cb in col_pairs:
            ca_shown = cols_a - 1 - ca if flip_a else ca
            cb_shown = cols_b - 1 - cb if flip_b else cb
            out.append((ra * cols_a + ca_shown, rb * cols_b + cb_shown))
    return out


def _inside_cells(lo: Tensor, hi: Tensor, n_cells: int, lo_i: Tensor, hi_i: Tensor) -> Tensor:
    """Vectorized :func:`axis_run` membership: ``[B, n_cells]`` bool, same float64 arithmetic."""
    c = torch.arange(n_cells, dtype=torch.float64, device=lo.device)
    width = ((hi - lo) / n_cells)[:, None]
    cell_lo = lo[:, None] + c * width
    cell_hi = lo[:, None] + (c + 1) * width
    overlap = torch.minimum(cell_hi, hi_i[:, None]) - torch.maximum(cell_lo, lo_i[:, None])
    return 2.0 * overlap > width


def _run_start_len(inside: Tensor) -> tuple[Tensor, Tensor]:
    """Start and length of the (contiguous) run of ``True`` per row of ``[B, n]``."""
    length = inside.sum(1)
    start = torch.where(length > 0, inside.int().argmax(1), torch.zeros_like(length))
    return start, length


def _pair_runs_batched(
    start_a: Tensor, len_a: Tensor, start_b: Tensor, len_b: Tensor, max_pairs: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Vectorized :func:`pair_runs`: ``[B, max_pairs]`` cells of a, cells of b, validity."""
    i = torch.arange(max_pairs, device=start_a.device)[None, :]
    n = torch.minimum(len_a, len_b)[:, None]
    big = torch.maximum(len_a, len_b)[:, None]
    j = torch.where(n == 1, (big - 1) // 2, (i * (big - 1)).div(torch.clamp(n - 1, min=1), rounding_mode="floor"))
    a_short = (len_a <= len_b)[:, None]
    cell_a = start_a[:, None] + torch.where(a_short, i, j)
    cell_b = start_b[:, None] + torch.where(a_short, j, i)
    return cell_a, cell_b, i < n


def _match_grid(
    boxes_a: Tensor, flips_a: Tensor, grid_a: tuple[int, int], boxes_b: Tensor, flips_b: Tensor, grid_b: tuple[int, int]
) -> tuple[Tensor, Tensor, Tensor]:
    """Uncompacted matches: ``[B, R*C]`` tokens of a, tokens of b and validity, in :func:`match_pair` order
    among the valid entries of each row (R, C: the largest row and column run counts)."""
    rows_a, cols_a = grid_a
    rows_b, cols_b = grid_b
    a = boxes_a.to(torch.float64)
    b = boxes_b.to(torch.float64)
    lo = torch.maximum(a[:, :2], b[:, :2])
    hi = torch.minimum(a[:, 2:], b[:, 2:])
    overlap = ((hi - lo) > 0).all(1)  # [B]

    def runs(axis: int, n_a: int, n_b: int) -> tuple[Tensor, Tensor, Tensor]:
        in_a = _inside_cells(a[:, axis], a[:, axis + 2], n_a, lo[:, axis], hi[:, axis])
        in_b = _inside_cells(b[:, axis], b[:, axis + 2], n_b, lo[:, axis], hi[:, axis])
        sa, la = _run_start_len(in_a)
        sb, lb = _run_start_len(in_b)
        zero = torch.zeros_like(la)
        la, lb = torch.where(overlap, la, zero), torch.where(overlap, lb, zero)
        return _pair_runs_batched(sa, la, sb, lb, min(n_a, n_b))

    ra, rb, rv = runs(1, rows_a, rows_b)  # rows: y axis
    ca, cb, cv = runs(0, cols_a, cols_b)  # cols: x axis
    ca = torch.where(flips_a.bool()[:, None], cols_a - 1 - ca, ca)
    cb = torch.where(flips_b.bool()[:, None], cols_b - 1 - cb, cb)

    # Row-major product of row pairs and column pairs: [B, R, C] -> [B, R*C].
    tok_a = (ra[:, :, None] * cols_a + ca[:, None, :]).flatten(1)
    tok_b = (rb[:, :, None] * cols_b + cb[:, None, :]).flatten(1)
    valid = (rv[:, :, None] & cv[:, None, :]).flatten(1)

    return tok_a, tok_b, valid


def match_patches(
    boxes_a: Tensor,
    flips_a: Tensor,
    grid_a: tuple[int, int],
    boxes_b: Tensor,
    flips_b: Tensor,
    grid_b: tuple[int, int],
) -> tuple[Tensor, Tensor, Tensor]:
    """Matched patch tokens for a batch of view pairs, vectorized over the batch.

    Args:
        boxes_a: ``[B, 4]`` crop boxes ``(x0, y0, x1, y1)`` of the a views.
        flips_a: ``[B]`` bool, horizontal flip of the a views.
        grid_a: Patch grid ``(rows, cols)`` shared by all a views.
        boxes_b: ``[B, 4]`` crop boxes of the b views.
        flips_b: ``[B]`` bool flips of the b views.
        grid_b: Patch grid shared by all b views.

    Returns:
        ``(idx_a, idx_b, valid)``: ``[B, M]`` long token indices into the patch tokens of a and b and
        a ``[B, M]`` bool mask. Valid pairs come first in each row, in the order of :func:`match_pair`;
        ``M`` is the largest count in the batch; padding is index 0 with ``valid=False``.
    """
    tok_a, tok_b, valid = _match_grid(boxes_a, flips_a, grid_a, boxes_b, flips_b, grid_b)
    # Move valid pairs to the front, keeping their order, and cut to the largest count.
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
    m = int(valid.sum(1).max().item()) if valid.numel() else 0
    order = order[:, :m]
    valid = valid.gather(1, order)
    idx_a = torch.where(valid, tok_a.gather(1, order), 0)
    idx_b = torch.where(valid, tok_b.gather(1, order), 0)
    return idx_a, idx_b, valid


@dataclass(frozen=True)
class PatchPairs:
    """The matched patch pairs of a multi-crop batch, flattened over (view pair, sample, match).

    Attributes:
        teacher_token: ``[N]`` long patch-token index in teacher view ``i`` of the pair.
        student_token: ``[N]`` long patch-token index in student view ``j`` of the pair.
        pair_index: ``[N]`` long ``p * B + b``: view pair ``p`` (index into the pair list) and sample ``b``.
        n_pairs: ``P``, the number of view pairs.
        batch: ``B``.
    """

    teacher_token: Tensor
    student_token: Tensor
    pair_index: Tensor
    n_pairs: int
    batch: int

    def __len__(self) -> int:
        return self.pair_index.shape[0]

    @property
    def sample(self) -> Tensor:
        """``[N]`` sample ``b`` of each match."""
        return self.pair_index % self.batch

    def count(self) -> Tensor:
        """``[P * B]`` long number of matches of every (view pair, sample)."""
        return torch.bincount(self.pair_index, minlength=self.n_pairs * self.batch)

    def to(self, device: torch.device | str) -> PatchPairs:
        return PatchPairs(self.teacher_token.to(device), self.student_token.to(device), self.pair_index.to(device),
                          self.n_pairs, self.batch)


def match_views(
    boxes: Tensor,
    flips: Tensor,
    grids: Sequence[tuple[int, int]],
    pairs: Sequence[tuple[int, int]],
) -> PatchPairs:
    """Matched tokens of every (teacher view, student view) pair of a multi-crop batch, flattened.

    Args:
        boxes: ``[V, B, 4]`` crop boxes of all views.
        flips: ``[V, B]`` flips of all views.
        grids: Patch grid of each of the ``V`` views.
        pairs: ``P`` pairs ``(i, j)``: teacher view ``i`` against student view ``j``.

    Returns:
        The :class:`PatchPairs` of the batch. The matches of one (pair, sample) are contiguous and in
        :func:`match_pair` order; pairs are grouped by kind (teacher grid, student grid), in ``pairs``
        order inside a kind.

    Example:
        >>> import torch, pwself
        >>> views = pwself.MultiCrop(2, 2, 16, 8)(torch.rand(3, 1, 20, 20), torch.Generator().manual_seed(0))
        >>> m = pwself.match_views(views.boxes, views.flips, [(4, 4)] * 2 + [(2, 2)] * 2, [(0, 1), (0, 2), (0, 3)])
        >>> m.n_pairs, m.batch, len(m.teacher_token) == len(m.student_token) == len(m.pair_index)
        (3, 3, True)
    """
    batch = boxes.shape[1]
    if not pairs:
        empty = torch.zeros(0, dtype=torch.long)
        return PatchPairs(empty, empty, empty, 0, batch)
    # One vectorized call per distinct (teacher grid, student grid): all pairs of a kind (e.g. the 16
    # global-local pairs) are stacked along the batch axis, so the cost is a few dozen tensor ops per
    # step whatever the number of views.
    groups: dict[tuple[tuple[int, int], tuple[int, int]], list[int]] = {}
    for p, (i, j) in enumerate(pairs):
        groups.setdefault((tuple(grids[i]), tuple(grids[j])), []).append(p)
    t_idx = torch.tensor([i for i, _ in pairs])
    s_idx = torch.tensor([j for _, j in pairs])
    samples = torch.arange(batch)
    out = []
    for (grid_t, grid_s), members in groups.items():
        sel = torch.tensor(members)
        tok_t, tok_s, valid = _match_grid(boxes[t_idx[sel]].flatten(0, 1), flips[t_idx[sel]].flatten(), grid_t,
                                          boxes[s_idx[sel]].flatten(0, 1), flips[s_idx[sel]].flatten(), grid_s)
        # masked_select walks rows in order: (member, sample), then match_pair order within a row.
        row_pair = (sel[:, None] * batch + samples).flatten()[:, None].expand_as(valid)
        out.append([x.masked_select(valid) for x in (tok_t, tok_s, row_pair)])
    tok_t, tok_s, pair_index = (torch.cat(x) for x in zip(*out))
    return PatchPairs(tok_t, tok_s, pair_index, len(pairs), batch)


@torch.no_grad()
def match_features(teacher_tokens: Tensor, student_tokens: Tensor) -> Tensor:
    """EsViT-style matching by content: each student patch's most cosine-similar teacher patch.

    Args:
        teacher_tokens: ``[B, Tt, D]`` teacher patch tokens of one view.
        student_tokens: ``[B, Ts, D]`` student patch tokens of another view.

    Returns:
        ``[B, Ts]`` long index of the teacher patch matched to every student patch (ties: lowest index).
    """
    dtype = torch.promote_types(teacher_tokens.dtype, torch.float32)  # float32 at least; float64 stays
    t = torch.nn.functional.normalize(teacher_tokens.to(dtype), dim=-1)
    s = torch.nn.functional.normalize(student_tokens.to(dtype), dim=-1)
    return torch.bmm(s, t.transpose(1, 2)).argmax(-1)


def match_views_by_features(
    teacher_tokens: Sequence[Tensor], student_tokens: Sequence[Tensor], pairs: Sequence[tuple[int, int]]
) -> PatchPairs:
    """:func:`match_views` for the ``feature-nn`` matcher: every student patch of every pair is matched.

    Args:
        teacher_tokens: Per teacher view ``[B, Tt, D]`` patch tokens.
        student_tokens: Per student view ``[B, Ts_j, D]`` patch tokens.
        pairs: ``(i, j)`` pairs.

    Returns:
        The :class:`PatchPairs`, as :func:`match_views` gives them.
    """
    t_tok, s_tok, pair_idx = [], [], []
    for p, (i, j) in enumerate(pairs):
        idx = match_features(teacher_tokens[i], student_tokens[j])  # [B, Ts]
        b, ts = idx.shape
        t_tok.append(idx.flatten())
        s_tok.append(torch.arange(ts, device=idx.device).repeat(b))
        pair_idx.append(torch.arange(b, device=idx.device).repeat_interleave(ts) + p * b)
    return PatchPairs(torch.cat(t_tok), torch.cat(s_tok), torch.cat(pair_idx), len(pairs), teacher_tokens[0].shape[0])
