"""The training-free dense protocols (issue 43): Hummingbird retrieval against a brute-force numpy reference and
cases worked by hand; overclustering on data whose right answer is known."""

import numpy as np
import pytest
import torch

from pwself.data.dense import IGNORE_INDEX
from pwself.eval.incontext import (
    hbird_labels,
    hbird_memory,
    hummingbird,
    kmeans,
    match_clusters,
    overclustering,
    patch_histograms,
)


def test_patch_histograms_count_labelled_pixels_only():
    mask = torch.tensor([[0, 0, 1, 1],
                         [0, 1, 1, IGNORE_INDEX],
                         [2, 2, IGNORE_INDEX, IGNORE_INDEX],
                         [2, 2, IGNORE_INDEX, IGNORE_INDEX]])
    hist = patch_histograms(mask[None], (2, 2), 3)[0]
    torch.testing.assert_close(hist[0, 0], torch.tensor([0.75, 0.25, 0.0]))  # 3 of 4 pixels class 0
    torch.testing.assert_close(hist[0, 1], torch.tensor([0.0, 1.0, 0.0]))  # the ignored pixel left out
    torch.testing.assert_close(hist[1, 0], torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(hist[1, 1], torch.tensor([0.0, 0.0, 0.0]))  # nothing labelled


def _reference_labels(q, keys, labels, k, temperature):
    """Brute force, one query at a time, in float64 numpy."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    out = []
    for row in q:
        sim = keys @ row
        nearest = np.argsort(-sim, kind="stable")[:k]
        w = np.exp((sim[nearest] - sim[nearest].max()) / temperature)
        out.append((w / w.sum()) @ labels[nearest])
    return np.stack(out)


@pytest.mark.parametrize("k,temperature", [(1, 0.02), (3, 0.5), (30, 0.02)])
def test_hbird_labels_equal_a_brute_force_reference(k, temperature):
    g = torch.Generator().manual_seed(k)
    keys = torch.nn.functional.normalize(torch.randn(50, 8, generator=g, dtype=torch.float64), dim=1)
    labels = torch.rand(50, 4, generator=g, dtype=torch.float64)
    labels /= labels.sum(1, keepdim=True)
    q = torch.randn(20, 8, generator=g, dtype=torch.float64)
    ours = hbird_labels(q, keys.float(), labels.float(), k=k, temperature=temperature)
    ref = _reference_labels(q.numpy(), keys.numpy(), labels.numpy(), k, temperature)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=2e-5, atol=1e-6)


def test_hummingbird_worked_by_hand():
    """Two train images of 2 x 2 one-pixel patches: tokens along x are class 0, along y class 1. Test patches
    near x, near y and an ignored pixel: k = 1 gives each test patch its nearest train patch's class."""
    x, y = [1.0, 0.0], [0.0, 1.0]
    train_tokens = torch.tensor([[[x, y], [x, x]], [[y, y], [x, y]]])
    train_masks = [torch.tensor([[0, 1], [0, 0]]), torch.tensor([[1, 1], [0, 1]])]
    test_tokens = torch.tensor([[[[0.9, 0.2], [0.1, 0.8]], [[0.2, 0.9], [0.7, 0.1]]]])
    test_masks = [torch.tensor([[0, 1], [1, IGNORE_INDEX]])]
    res = hummingbird(train_tokens, train_masks, test_tokens, test_masks, ["a", "b"], k=1)
    assert res["miou"] == pytest.approx(100.0) and res["memory"] == 8
    wrong = [torch.tensor([[1, 0], [0, IGNORE_INDEX]])]  # every labelled pixel the other class
    res = hummingbird(train_tokens, train_masks, test_tokens, wrong, ["a", "b"], k=1)
    assert res["miou"] == pytest.approx(0.0)


def test_the_memory_keeps_rare_classes_first():
    """One image, 4 patches: class 0 in three, class 1 in one. A memory of one patch an image keeps the patch of
    lowest score (summed class frequency x a uniform draw): the class-1 patch (score u) wins against three of
    score 3u' with probability (3/4)(1 - (2/3)^4) = 0.602, where a uniform pick would give 0.25."""
    tokens = torch.randn(1, 2, 2, 3)
    hist = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]]])
    rare = sum(int(hbird_memory(tokens, hist, memory_size=1, seed=s)[1][0, 1] == 1) for s in range(400)) / 400
    assert 0.52 < rare < 0.68  # 0.602 +- 3.3 standard errors
    keys, labels = hbird_memory(tokens, hist, memory_size=0)
    assert len(keys) == 4 and torch.allclose(keys.norm(dim=1), torch.ones(4))


def test_kmeans_recovers_separated_blobs_and_matching_maps_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[5.0, 0.0], [0.0, 5.0], [-5.0, -5.0]])
    truth = torch.arange(3).repeat_interleave(40)
    x = centres[truth] + 0.1 * torch.randn(120, 2, generator=g)
    assign = kmeans(x, 3, seed=1)
    assert len(set(zip(assign.tolist(), truth.tolist()))) == 3  # a bijection between clusters and blobs
    conf = torch.tensor([[0, 5, 1], [7, 1, 0], [0, 0, 9]])  # rows: classes, columns: clusters
    assert match_clusters(conf).tolist() == [1, 0, 2]
    many = torch.tensor([[4, 0, 3, 0], [0, 5, 0, 1]])
    assert match_clusters(many).tolist() == [0, 1, 0, 1]


def test_overclustering_scores_class_structured_tokens_perfectly():
    """Tokens that are their class's direction plus noise: K = classes (Hungarian) and K above it (many-to-one)
    both give 100; tokens of pure noise give far less."""
    g = torch.Generator().manual_seed(0)
    n, side, c = 6, 4, 3
    masks = [torch.randint(0, c, (side, side), generator=g) for _ in range(n)]
    directions = torch.eye(8)[:c] * 4
    tokens = torch.stack([directions[m] for m in masks]) + 0.05 * torch.randn(n, side, side, 8, generator=g)
    res = overclustering(tokens, masks, ["a", "b", "c"], ks=(0, 12), seeds=(0, 1))
    assert res["3"]["miou"] == pytest.approx(100.0) and res["3"]["matching"] == "hungarian"
    assert res["12"]["miou"] == pytest.approx(100.0) and res["12"]["matching"] == "many-to-one"
    noise = overclustering(torch.randn(n, side, side, 8, generator=g), masks, ["a", "b", "c"], ks=(0,), seeds=(0,))
    assert noise["3"]["miou"] < 60
