"""Patch matching: the paper's Figure 2, reference vs vectorized, and an independent geometric check."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pwself.matching import match_pair, match_patches


def _batched(box_a, flip_a, grid_a, box_b, flip_b, grid_b):
    idx_a, idx_b, valid = match_patches(
        torch.tensor([box_a], dtype=torch.float64),
        torch.tensor([flip_a]),
        grid_a,
        torch.tensor([box_b], dtype=torch.float64),
        torch.tensor([flip_b]),
        grid_b,
    )
    return [(int(a), int(b)) for a, b, v in zip(idx_a[0], idx_b[0], valid[0]) if v]


def test_figure2_example_from_real_boxes():
    # Original image 320x320. Global view: box (0, 0, 224, 224), 224 px, p=16 -> 14x14 grid, cells of 16 px.
    # Local view: 96 px, p=16 -> 6x6 grid over a 144 px box at (128, 160): cells of 24 px.
    # Intersection [128, 224) x [160, 224): local cols 0..3 and rows 0..2 (third row overlaps 16 > 12 px),
    # global cols 8..13 (6) and rows 10..13 (4): the paper's 3x4 local run vs 4x6 global run.
    global_box, local_box = (0.0, 0.0, 224.0, 224.0), (128.0, 160.0, 272.0, 304.0)
    pairs = match_pair(local_box, False, (6, 6), global_box, False, (14, 14))
    local_rc = sorted({(t // 6, t % 6) for t, _ in pairs})
    global_rc = sorted({(t // 14, t % 14) for _, t in pairs})
    assert {r for r, _ in local_rc} == {0, 1, 2}
    assert {c for _, c in local_rc} == {0, 1, 2, 3}
    # Relative to the run starts (row 10, col 8): rows 0, 1, 3 and cols 0, 1, 3, 5, as in the paper.
    assert sorted({r - 10 for r, _ in global_rc}) == [0, 1, 3]
    assert sorted({c - 8 for _, c in global_rc}) == [0, 1, 3, 5]
    assert len(pairs) == 12
    # Row-major order with first/last paired with first/last.
    assert pairs[0] == (0 * 6 + 0, 10 * 14 + 8)
    assert pairs[-1] == (2 * 6 + 3, 13 * 14 + 13)
    assert _batched(local_box, False, (6, 6), global_box, False, (14, 14)) == pairs


def test_identity_crop_matches_each_patch_to_itself():
    box = (3.0, 5.0, 35.0, 37.0)
    assert match_pair(box, False, (4, 4), box, False, (4, 4)) == [(k, k) for k in range(16)]
    # One flipped view: column c shows at cols-1-c.
    flipped = match_pair(box, True, (4, 4), box, False, (4, 4))
    assert flipped == [(r * 4 + 3 - c, r * 4 + c) for r in range(4) for c in range(4)]


def test_disjoint_and_touching_boxes_give_no_pairs():
    assert match_pair((0, 0, 10, 10), False, (2, 2), (20, 20, 30, 30), False, (2, 2)) == []
    assert match_pair((0, 0, 10, 10), False, (2, 2), (10, 0, 20, 10), False, (2, 2)) == []
    idx_a, idx_b, valid = match_patches(
        torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 10]]), torch.tensor([False, True]), (2, 2),
        torch.tensor([[20.0, 20, 30, 30], [10.0, 0, 20, 10]]), torch.tensor([False, False]), (2, 2),
    )
    assert idx_a.shape == (2, 0) and not valid.any()


def test_exactly_half_overlap_is_not_inside():
    # Cells of 10 px; the intersection [5, 20) covers cell 0 by exactly half: not inside (strictly more).
    assert match_pair((0, 0, 20, 10), False, (1, 2), (5, 0, 20, 10), False, (1, 1)) == [(1, 0)]


def test_single_cell_run_pairs_with_middle_of_longer_run():
    # Big view: 5 columns fully inside a small view with 1 column -> middle column (5-1)//2 = 2.
    pairs = match_pair((0, 0, 50, 10), False, (1, 5), (0, 0, 50, 10), False, (1, 1))
    assert pairs == [(2, 0)]
    pairs = match_pair((0, 0, 40, 10), False, (1, 4), (0, 0, 40, 10), False, (1, 1))
    assert pairs == [(1, 0)]


def _random_box(rng: random.Random, size: float) -> list[float]:
    kind = rng.random()
    if kind < 0.15:  # integer box (touching/identical cases become likely)
        x0, y0 = rng.randint(0, 20), rng.randint(0, 20)
        return [float(x0), float(y0), float(x0 + rng.randint(1, 20)), float(y0 + rng.randint(1, 20))]
    w, h = rng.uniform(1, size), rng.uniform(1, size)
    x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
    return [x0, y0, x0 + w, y0 + h]


def _random_case(rng: random.Random):
    size = 40.0
    box_a = _random_box(rng, size)
    r = rng.random()
    if r < 0.1:
        box_b = list(box_a)  # identical
    elif r < 0.2:  # nested
        x0, y0, x1, y1 = box_a
        fx0, fy0 = rng.uniform(0, 0.5), rng.uniform(0, 0.5)
        fx1, fy1 = rng.uniform(fx0 + 0.1, 1), rng.uniform(fy0 + 0.1, 1)
        box_b = [x0 + fx0 * (x1 - x0), y0 + fy0 * (y1 - y0), x0 + fx1 * (x1 - x0), y0 + fy1 * (y1 - y0)]
    elif r < 0.3:  # touching on the right
        box_b = [box_a[2], box_a[1], box_a[2] + rng.uniform(1, 10), box_a[3]]
    else:
        box_b = _random_box(rng, size)
    grid_a = (rng.choice([1, 1, 2, 3, 4, 7]), rng.choice([1, 2, 3, 6, 7]))
    grid_b = (rng.choice([1, 2, 3, 4, 6, 14]), rng.choice([1, 2, 5, 6, 14]))
    return box_a, rng.random() < 0.5, grid_a, box_b, rng.random() < 0.5, grid_b


def test_vectorized_agrees_with_reference_on_thousands_of_cases():
    rng = random.Random(0)
    groups: dict = {}
    for _ in range(4000):
        case = _random_case(rng)
        groups.setdefault((case[2], case[5]), []).append(case)
    checked = 0
    for (grid_a, grid_b), cases in groups.items():
        idx_a, idx_b, valid = match_patches(
            torch.tensor([c[0] for c in cases], dtype=torch.float64),
            torch.tensor([c[1] for c in cases]),
            grid_a,
            torch.tensor([c[3] for c in cases], dtype=torch.float64),
            torch.tensor([c[4] for c in cases]),
            grid_b,
        )
        assert idx_a.dtype == torch.long and valid.dtype == torch.bool
        assert (idx_a[~valid] == 0).all() and (idx_b[~valid] == 0).all()
        for k, c in enumerate(cases):
            expected = match_pair(*c)
            got = [(int(a), int(b)) for a, b, v in zip(idx_a[k], idx_b[k], valid[k]) if v]
            assert got == expected, c
            assert valid[k, : len(expected)].all() and not valid[k, len(expected):].any()
            checked += 1
    assert checked == 4000


def _patch_center(box, flip, grid, token):
    """Center of a patch token in original-image pixels, computed from scratch (not from the matcher)."""
    x0, y0, x1, y1 = box
    rows, cols = grid
    r, c_shown = divmod(token, cols)
    c = cols - 1 - c_shown if flip else c_shown
    w, h = (x1 - x0) / cols, (y1 - y0) / rows
    return x0 + (c + 0.5) * w, y0 + (r + 0.5) * h, w, h


def test_matched_patch_centers_are_within_one_patch():
    # First/last cells of both runs have their centres inside [edge, edge + cell], so end pairs are
    # within one (larger) patch; the floor in the subsampling can add a fraction of a cell in between
    # (worst seen over 20k random cases: 1.076 patch). Bound: one patch, with 1.5 as the hard limit.
    rng = random.Random(1)
    n_pairs, n_beyond_one = 0, 0
    for _ in range(2000):
        case = _random_case(rng)
        for ta, tb in match_pair(*case):
            xa, ya, wa, ha = _patch_center(case[0], case[1], case[2], ta)
            xb, yb, wb, hb = _patch_center(case[3], case[4], case[5], tb)
            dist = max(abs(xa - xb) / max(wa, wb), abs(ya - yb) / max(ha, hb))
            assert dist <= 1.5
            n_beyond_one += dist > 1 + 1e-9
            n_pairs += 1
    assert n_pairs > 1000
    assert n_beyond_one <= n_pairs // 1000


def test_count_bounded_and_swap_gives_mirrored_pairs():
    rng = random.Random(2)
    for _ in range(500):
        box_a, fa, ga, box_b, fb, gb = _random_case(rng)
        ab = match_pair(box_a, fa, ga, box_b, fb, gb)
        ba = match_pair(box_b, fb, gb, box_a, fa, ga)
        assert sorted(ab) == sorted((y, x) for x, y in ba)
        assert len(ab) <= min(ga[0] * ga[1], gb[0] * gb[1])
        # Subsampling is strictly increasing, so no token is matched twice on either side.
        assert len({a for a, _ in ab}) == len(ab) == len({b for _, b in ab})


@pytest.mark.parametrize("flip_a,flip_b", [(False, False), (True, False), (False, True), (True, True)])
def test_one_row_runs_and_flips(flip_a, flip_b):
    # A 1-row strip view against a 3x6 view: one row pair (middle row), columns paired 1:1 over 6.
    strip = (0.0, 10.0, 60.0, 20.0)
    block = (0.0, 0.0, 60.0, 30.0)
    pairs = match_pair(strip, flip_a, (1, 6), block, flip_b, (3, 6))
    assert len(pairs) == 6
    for ta, tb in pairs:
        ca = 5 - ta if flip_a else ta
        rb, cb = divmod(tb, 6)
        cb = 5 - cb if flip_b else cb
        assert rb == 1 and ca == cb
    assert _batched(strip, flip_a, (1, 6), block, flip_b, (3, 6)) == pairs


def test_feature_nn_matches_most_similar_teacher_token():
    from pwself.matching import match_features, match_views_by_features

    t = torch.randn(2, 5, 8)
    perm = torch.tensor([3, 0, 4])
    s = t[:, perm] + 0.01 * torch.randn(2, 3, 8)  # student tokens are noisy copies of teacher tokens 3, 0, 4
    assert torch.equal(match_features(t, s), perm.expand(2, 3))
    m = match_views_by_features([t], [t, s], [(0, 1)])
    t_tok, s_tok, pair_idx, sample = m.teacher_token, m.student_token, m.pair_index, m.sample
    assert torch.equal(t_tok, perm.repeat(2)) and torch.equal(s_tok, torch.arange(3).repeat(2))
    assert torch.equal(sample, torch.tensor([0, 0, 0, 1, 1, 1])) and torch.equal(pair_idx, sample)


@pytest.mark.parametrize("batch", [1, 5])
def test_match_views_equals_match_pair_for_every_pair_and_sample(batch):
    from pwself.losses import view_pairs
    from pwself.matching import match_views
    from pwself.views import sample_boxes

    g = torch.Generator().manual_seed(batch)
    boxes = torch.stack([sample_boxes(batch, 40, 40, (0.4, 1.0), (3 / 4, 4 / 3), g) for _ in range(2)]
                        + [sample_boxes(batch, 40, 40, (0.05, 0.4), (3 / 4, 4 / 3), g) for _ in range(4)])
    flips = torch.rand(6, batch, generator=g) < 0.5
    grids = [(7, 7)] * 2 + [(3, 3)] * 3 + [(2, 4)]  # three kinds of pair: global-global and two local grids
    pairs = view_pairs(2, 6)
    m = match_views(boxes, flips, grids, pairs)
    t_tok, s_tok, pair_idx = m.teacher_token, m.student_token, m.pair_index
    assert (m.n_pairs, m.batch) == (len(pairs), batch)
    assert torch.equal(m.count(), torch.bincount(pair_idx, minlength=len(pairs) * batch))
    for p, (i, j) in enumerate(pairs):
        for b in range(batch):
            sel = pair_idx == p * batch + b
            got = list(zip(t_tok[sel].tolist(), s_tok[sel].tolist()))
            expected = match_pair(boxes[i, b].tolist(), bool(flips[i, b]), grids[i],
                                  boxes[j, b].tolist(), bool(flips[j, b]), grids[j])
            assert got == expected
    assert len(t_tok) > 0
    empty = match_views(boxes, flips, grids, [])
    assert len(empty) == 0 and empty.n_pairs == 0


# Random cases with shrinking: a failure is reported as the smallest boxes and grids that break agreement.
_coord = st.one_of(st.integers(0, 40).map(float), st.floats(0, 40, allow_nan=False, width=32))


@st.composite
def _box(draw):
    x0, y0 = draw(_coord), draw(_coord)
    w = draw(st.one_of(st.integers(1, 40).map(float), st.floats(0.5, 40, width=32)))
    h = draw(st.one_of(st.integers(1, 40).map(float), st.floats(0.5, 40, width=32)))
    return [x0, y0, x0 + w, y0 + h]


_grid = st.tuples(st.integers(1, 8), st.integers(1, 8))


@settings(derandomize=True, max_examples=400, deadline=None)
@given(box_a=_box(), flip_a=st.booleans(), grid_a=_grid, box_b=_box(), flip_b=st.booleans(), grid_b=_grid)
def test_vectorized_agrees_with_reference_and_swaps_symmetrically(box_a, flip_a, grid_a, box_b, flip_b, grid_b):
    expected = match_pair(box_a, flip_a, grid_a, box_b, flip_b, grid_b)
    idx_a, idx_b, valid = match_patches(torch.tensor([box_a], dtype=torch.float64), torch.tensor([flip_a]), grid_a,
                                        torch.tensor([box_b], dtype=torch.float64), torch.tensor([flip_b]), grid_b)
    assert [(int(a), int(b)) for a, b, v in zip(idx_a[0], idx_b[0], valid[0]) if v] == expected
    assert len(expected) <= min(grid_a[0], grid_b[0]) * min(grid_a[1], grid_b[1])
    swapped = match_pair(box_b, flip_b, grid_b, box_a, flip_a, grid_a)
    assert swapped == [(b, a) for a, b in expected]
