"""kNN: EVAL_PROTOCOLS worked examples K1-K3, separable clusters, chance on random labels."""

import pytest
import torch
import torch.nn.functional as F

from pwself.eval.knn import knn_classify

X = torch.tensor([[1.0, 0], [0.8, 0.6], [0.6, 0.8], [0, 1], [-1, 0]])
Y = torch.tensor([0, 1, 1, 2, 0])
Q, QY = torch.tensor([[1.0, 0]]), torch.tensor([1])


def test_worked_example_k1_temperature_007():
    res = knn_classify(X, Y, Q, QY, ks=[3], temperature=0.07)
    assert res[3]["top1"] == 0.0 and res[3]["top5"] == 100.0  # class 0 wins; top-5 window = min(5, k) = 3


def test_worked_example_k2_temperature_1_flips_decision():
    assert knn_classify(X, Y, Q, QY, ks=[3], temperature=1.0)[3]["top1"] == 100.0


def test_worked_example_k3_grid_in_one_pass():
    res = knn_classify(X, Y, Q, torch.tensor([0]), ks=[1, 3], temperature=0.07)
    assert res[1]["top1"] == 100.0 and res[3]["top1"] == 100.0
    # k=1: only one prediction is scored with a nonzero weight -> top-5 window is 1.
    res = knn_classify(X, Y, Q, QY, ks=[1], temperature=0.07)
    assert res[1]["top5"] == 0.0


def test_separable_clusters_reach_100_and_random_labels_chance():
    g = torch.Generator().manual_seed(0)
    centers = F.normalize(torch.randn(5, 32, generator=g), dim=1)
    ytr, yte = torch.arange(500) % 5, torch.arange(200) % 5
    ftr = F.normalize(centers[ytr] + 0.05 * torch.randn(500, 32, generator=g), dim=1)
    fte = F.normalize(centers[yte] + 0.05 * torch.randn(200, 32, generator=g), dim=1)
    res = knn_classify(ftr, ytr, fte, yte, ks=(10, 20, 100, 200))
    assert all(v["top1"] == 100.0 for v in res.values())
    rand = knn_classify(ftr, ytr[torch.randperm(500, generator=g)], fte, yte, ks=(20,))
    assert 5 < rand[20]["top1"] < 40


def test_bad_inputs():
    with pytest.raises(ValueError, match="larger than the train bank"):
        knn_classify(X, Y, Q, QY, ks=[10])
    with pytest.raises(ValueError, match="differ in dimension"):
        knn_classify(X, Y, torch.ones(1, 3), QY, ks=[1])
    with pytest.raises(ValueError, match="needs labels"):
        knn_classify(X, torch.tensor([0, 1, 1, -1, 0]), Q, QY, ks=[1])
