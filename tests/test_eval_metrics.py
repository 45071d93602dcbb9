"""Ranking metrics against EVAL_PROTOCOLS' worked examples (revisitop/dino numbers)."""

import numpy as np
import pytest
import torch

from pwself.eval.metrics import PCAWhitening, compute_ap, compute_map, gem, l2n, learn_whitening_dino, revisited_map

QUERY_A = {"easy": [0, 3], "hard": [5], "junk": [1]}
QUERY_B = {"easy": [2], "hard": [], "junk": [4]}
RANK_A = [1, 0, 2, 5, 3, 7, 4, 6]
RANK_B = [4, 2, 6, 0, 1, 3, 5, 7]


def test_compute_ap_examples():
    assert compute_ap([0, 2, 5], 3) == pytest.approx(61 / 90)
    assert compute_ap([0, 2], 4) == pytest.approx(19 / 48)
    assert compute_ap([1], 1) == pytest.approx(0.25)
    # Copy detection C2: two positives at ranks 1 and 4.
    assert compute_ap([1, 4], 2) == pytest.approx(0.2875)
    with pytest.raises(ValueError):
        compute_ap([], 0)


def test_query_a_medium_easy_hard():
    ranks = np.array([RANK_A]).T
    m, _, mp, _ = compute_map(ranks, [{"ok": [0, 3, 5], "junk": [1]}])
    assert m == pytest.approx(55 / 72) and mp == pytest.approx([1, 0.75, 0.75])
    m, _, mp, _ = compute_map(ranks, [{"ok": [0, 3], "junk": [1, 5]}])
    assert m == pytest.approx(19 / 24) and mp == pytest.approx([1, 2 / 3, 2 / 3])
    m, _, mp, _ = compute_map(ranks, [{"ok": [5], "junk": [1, 0, 3]}])
    assert m == pytest.approx(0.25) and mp == pytest.approx([0, 0.5, 0.5])


def test_revisited_two_queries_with_empty_hard_query():
    ranks = np.array([RANK_A, RANK_B]).T
    res = revisited_map(ranks, [QUERY_A, QUERY_B])
    assert res["E"]["mAP"] == round(100 * 43 / 48, 2)
    assert res["M"]["mAP"] == round(100 * 127 / 144, 2)
    assert res["H"]["mAP"] == 25.0  # query B has no hard positive: left out
    assert res["E"]["mP@k"] == [100.0, 83.33, 83.33] and res["M"]["mP@k"] == [100.0, 87.5, 87.5]
    assert res["H"]["mP@k"] == [0.0, 50.0, 50.0]


def test_all_queries_empty_raises():
    with pytest.raises(ValueError, match="no query has a positive"):
        compute_map(np.array([RANK_B]).T, [{"ok": [], "junk": []}])


def test_gem_examples():
    assert gem(torch.tensor([[[1.0], [2.0], [0.0], [-1.0]]]))[0, 0].item() == pytest.approx(1.435811, abs=1e-6)
    grid = torch.tensor([[3.0, 1.0, 0.5, -2.0]]).T[None]
    assert gem(grid)[0, 0].item() == pytest.approx(2.128243, abs=1e-6)


def test_whitening_examples_w1_w2_w3():
    # W1: centred set, dino PCA (no mean inside), x=(1,1) -> (0.447214, 0.894427) after L2.
    f = np.array([[2.0, 0], [-2, 0], [0, 1], [0, -1]])
    mu, pca = learn_whitening_dino(f)
    np.testing.assert_allclose(np.sort(np.abs(pca.P).max(1)), [0.707107, 1.414214], atol=1e-6)
    y = l2n(pca.apply(np.array([[1.0, 1.0]]) - mu))
    np.testing.assert_allclose(np.sort(np.abs(y[0])), [0.447214, 0.894427], atol=1e-6)
    # W2: eigenvalue floor.
    p = PCAWhitening(whit=0.5).train_pca(np.diag([4.0, 1e-7]))
    np.testing.assert_allclose(np.sort(np.abs(p.P).max(1)), [0.5, 158.113883], rtol=1e-6)
    # W3: uncentred covariance quirk vs centred variant.
    f = np.array([[3.0, 0], [-1, 0], [1, 1], [1, -1]])
    mu, pca = learn_whitening_dino(f)
    np.testing.assert_allclose(mu, [1, 0])
    y = l2n(pca.apply(np.array([[2.0, 1.0]]) - mu))
    np.testing.assert_allclose(np.abs(y[0]), [0.377964, 0.925820], atol=1e-6)
    mu, pca = learn_whitening_dino(f, centered_cov=True)
    y = l2n(pca.apply(np.array([[2.0, 1.0]]) - mu))
    np.testing.assert_allclose(np.abs(y[0]), [0.447214, 0.894427], atol=1e-6)


def test_whitening_learned_on_one_set_applied_to_another_matches_numpy_reference():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(200, 5)) @ rng.normal(size=(5, 5))
    other = rng.normal(size=(7, 5))
    mu, pca = learn_whitening_dino(train)
    cov = train.T @ train / len(train)  # plain reference: eigh, sort, scale
    w, v = np.linalg.eigh(cov)
    order = np.argsort(-w)
    ref = (other - train.mean(0)) @ v[:, order] / np.sqrt(w[order])
    got = pca.apply(other - mu)
    np.testing.assert_allclose(np.abs(got), np.abs(ref), rtol=1e-8, atol=1e-10)  # eigenvector signs are arbitrary
