"""Evaluation protocols end to end against independent references: retrieval E/M/H mAP worked by hand, copy
detection against a plain numpy pipeline, the linear probe's choice blind to test labels and its optimizer
against torch.optim, the dense probe's mean accuracy and bilinear upsampling against numpy, kNN across chunk
boundaries against a brute-force vote."""

import json
import math

import numpy as np
import pytest
import torch

import pwself.eval.retrieval as retrieval
from pwself.eval.copydetect import copydetect_map
from pwself.eval.dense import _logits, confusion_matrix, segmentation_scores
from pwself.eval.knn import knn_classify
from pwself.eval.linear import _train_heads, linear_probe


def _unit(deg):
    return np.array([math.cos(math.radians(deg)), math.sin(math.radians(deg))])


def test_retrieval_map_of_a_toy_ground_truth_worked_by_hand(tmp_path, monkeypatch):
    """One query at 0 degrees; database items at 10, 40, 20, 80, 60 degrees rank d0, d2, d1, d4, d3.
    easy = [d0], hard = [d4], junk = [d1]. With revisitop's trapezoidal AP:
    E: positives {d0}, junk {d1, d4}: list d0 d2 d3 -> hit at rank 0 -> AP 1;
    M: positives {d0, d4}, junk {d1}: list d0 d2 d4 d3 -> hits at 0, 2 -> (1+1)/4 + (1/2+2/3)/4 = 19/24;
    H: positives {d4}, junk {d1, d0}: list d2 d4 d3 -> hit at rank 1 -> (0 + 1/2)/2 = 1/4."""
    names = [f"d{i}" for i in range(5)]
    for n in [*names, "q0"]:
        (tmp_path / f"{n}.jpg").touch()
    gnd = {"imlist": names, "qimlist": ["q0"], "gnd": [{"easy": [0], "hard": [4], "junk": [1], "bbx": [0, 0, 1, 1]}]}
    (tmp_path / "gnd_toy.json").write_text(json.dumps(gnd))
    db = np.stack([_unit(a) for a in (10, 40, 20, 80, 60)])

    def features(backbone, files, *args, bboxes=None, **kwargs):
        return np.stack([_unit(0)]) if bboxes is not None else db

    monkeypatch.setattr(retrieval, "retrieval_features", features)
    res = retrieval.evaluate_retrieval(None, tmp_path / "gnd_toy.json", tmp_path, [0.5], [0.25])
    assert res["E"]["mAP"] == pytest.approx(100.0)
    assert res["M"]["mAP"] == pytest.approx(100 * 19 / 24, abs=0.005)  # reported to 2 decimals
    assert res["H"]["mAP"] == pytest.approx(25.0)


def _dino_ap(hit_ranks, n_pos):
    """dino's ``score_ap_from_ranks_1`` (copy detection), as a loop."""
    ap = 0.0
    for ntp, rank in enumerate(hit_ranks):
        prec_0 = 1.0 if rank == 0 else ntp / rank
        ap += (prec_0 + (ntp + 1) / (rank + 1)) / n_pos / 2
    return ap


def _numpy_copydetect(db, queries, positives, white, top_k, subtract_mean=True):
    """dino's copy-detection pipeline in plain numpy: mu of the whitening set, PCA of the uncentred covariance
    (eigenvalues floored at 1e-5 x max, whit 0.5), (x - mu) projected, L2 norm, cosine, top-k, AP."""
    mu = white.mean(0) if subtract_mean else np.zeros(white.shape[1])
    lam, vec = np.linalg.eigh(white.T @ white / len(white))
    lam = np.maximum(lam, 1e-5 * lam.max())
    proj = np.diag(lam ** -0.5) @ vec.T

    def describe(x):
        y = (x - mu) @ proj.T
        return y / np.linalg.norm(y, axis=1, keepdims=True)

    d = describe(db)
    out = {}
    for name, q in queries.items():
        order = np.argsort(-(describe(q) @ d.T), axis=1, kind="stable")[:, :top_k]
        out[name] = float(np.mean([_dino_ap([r for r, i in enumerate(row) if i in pos], len(pos))
                                   for row, pos in zip(order, positives[name])]))
    return out


def test_copy_detection_matches_a_plain_numpy_pipeline():
    """Descriptors far from the origin with a whitening set: subtracting the mean changes the ranking here, so
    the pipeline must do it to match."""
    rng = np.random.default_rng(0)
    offset, spread = 4 * rng.normal(size=16), np.linspace(0.2, 3, 16)
    db = offset + rng.normal(size=(60, 16)) * spread
    white = offset + rng.normal(size=(60, 16)) * spread
    picks = rng.choice(60, size=30, replace=False)
    queries = {"strong": db[picks] + rng.normal(size=(30, 16)) * 1.5 * spread}
    positives = {"strong": [[int(i)] for i in picks]}
    got = copydetect_map(db, queries, positives, whitening=white, top_k=10)
    want = _numpy_copydetect(db, queries, positives, white, 10)
    assert got["strong"] == pytest.approx(want["strong"], abs=1e-12)
    assert _numpy_copydetect(db, queries, positives, white, 10, subtract_mean=False)["strong"] != pytest.approx(
        want["strong"], abs=0.02)  # the mean matters on this data (0.42 without it, 0.37 with it)
    assert copydetect_map(db, queries, positives, top_k=10)["strong"] != pytest.approx(want["strong"], abs=0.02)


def _noisy_classes(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.nn.functional.one_hot(y, 4).float() @ torch.randn(4, 12, generator=g) * 0.8
    return x + torch.randn(n, 12, generator=g) * 1.2 + 5, y


def test_linear_probe_choice_never_reads_the_test_labels():
    x, y = _noisy_classes(300, 0)
    xt, yt = _noisy_classes(200, 1)
    kwargs = dict(lrs=(1e-3, 1e-2, 0.1, 1.0, 10.0), weight_decays=(0.0, 1e-2), epochs=3, batch_size=32)
    res = linear_probe(x, y, xt, yt, **kwargs)
    assert len({g["val_top1"] for g in res["grid"]}) > 2  # the heads differ: a choice is made
    for seed in range(3):
        shuffled = yt[torch.randperm(200, generator=torch.Generator().manual_seed(seed))]
        other = linear_probe(x, y, xt, shuffled, **kwargs)
        assert other["best"] == res["best"] and other["grid"] == res["grid"]


def test_linear_probe_is_blind_to_feature_scale_and_offset():
    """Features are standardized with the train part's statistics: an affine change per dimension changes
    nothing (without standardization the best lr moves with the scale)."""
    x, y = _noisy_classes(300, 0)
    xt, yt = _noisy_classes(200, 1)
    scale, shift = torch.logspace(-2, 2, 12), torch.linspace(-50, 50, 12)
    a = linear_probe(x, y, xt, yt, epochs=3, batch_size=32)
    b = linear_probe(x * scale + shift, y, xt * scale + shift, yt, epochs=3, batch_size=32)
    assert a["best"]["lr"] == b["best"]["lr"] and a["top1"] == pytest.approx(b["top1"], abs=0.51)


def test_one_linear_head_is_torch_sgd_with_momentum_weight_decay_and_a_cosine_schedule():
    """A one-head grid trained by the probe equals nn.Linear under torch.optim.SGD (momentum 0.9, weight decay
    on the weight only) with a per-iteration cosine LambdaLR, the same init and batch order."""
    x, y = _noisy_classes(70, 0)
    lr, wd, epochs, bs = 0.3, 1e-2, 2, 16
    weight, bias = _train_heads(x, y, [(lr, wd)], 4, epochs, bs, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    w = torch.nn.Parameter(torch.randn(1, 12, 4, generator=g)[0] * 0.01)
    b = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([{"params": [w], "weight_decay": wd}, {"params": [b], "weight_decay": 0.0}],
                          lr=lr * bs / 256, momentum=0.9)
    total = epochs * math.ceil(70 / bs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 0.5 * (1 + math.cos(math.pi * it / total)))
    for _ in range(epochs):
        order = torch.randperm(70, generator=g)
        for start in range(0, 70, bs):
            idx = order[start : start + bs]
            loss = torch.nn.functional.cross_entropy(x[idx] @ w + b, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    torch.testing.assert_close(weight[0], w.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bias[0, 0], b.detach(), rtol=1e-5, atol=1e-6)


def test_dense_mean_accuracy_matches_numpy():
    """mmsegmentation's mean accuracy: per class, correct pixels over that class's ground-truth pixels; a class
    absent from the ground truth is left out (even when predicted)."""
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 3, size=(2, 7, 9))  # classes 0..2 present; 3 only predicted; 4 nowhere
    gt[rng.random(gt.shape) < 0.15] = 255
    pred = np.where(rng.random(gt.shape) < 0.6, gt, rng.integers(0, 4, size=gt.shape)) % 255
    pred[pred > 4] = 3
    keep = gt != 255
    accs = [np.mean(pred[keep][gt[keep] == c] == c) for c in range(3)]
    scores = segmentation_scores(confusion_matrix(torch.from_numpy(pred), torch.from_numpy(gt), 5), list("abcde"))
    assert scores["mean_acc"] == pytest.approx(100 * np.mean(accs), rel=1e-12)
    assert scores["mean_acc"] != pytest.approx(scores["miou"], abs=1e-3)


def _numpy_bilinear(a, out_h, out_w):
    """``align_corners=False`` bilinear resize of ``[h, w]``: source coordinate (i + 0.5) * h / H - 0.5, clamped
    at 0, between the two nearest cells (the last one repeated at the edge)."""
    h, w = a.shape

    def axis(n_out, n_in):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    y0, y1, fy = axis(out_h, h)
    x0, x1, fx = axis(out_w, w)
    top = a[y0][:, x0] * (1 - fx) + a[y0][:, x1] * fx
    bottom = a[y1][:, x0] * (1 - fx) + a[y1][:, x1] * fx
    return top * (1 - fy[:, None]) + bottom * fy[:, None]


def test_dense_logits_are_upsampled_bilinearly():
    """Tokens on a 3x4 grid, an identity head: the logits at 12x16 pixels are numpy's bilinear resize of each
    class's token grid (nearest-neighbour upsampling fails)."""
    tokens = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weight, bias = torch.eye(5, dtype=torch.float64)[None], torch.zeros(1, 5, dtype=torch.float64)
    up = _logits(tokens, weight, bias, (12, 16))
    assert up.shape == (1, 2, 5, 12, 16)
    for b in range(2):
        for c in range(5):
            ref = _numpy_bilinear(tokens[b, :, :, c].numpy(), 12, 16)
            np.testing.assert_allclose(up[0, b, c].numpy(), ref, rtol=1e-12, atol=1e-12)


def _brute_force_knn(bank, labels, queries, k, temperature, n_classes):
    """dino's weighted vote, one query at a time: the k most similar rows vote exp(sim / T) for their label."""
    preds = []
    for q in queries:
        sims = bank @ q
        top = np.argsort(-sims, kind="stable")[:k]
        scores = np.zeros(n_classes)
        for i in top:
            scores[labels[i]] += np.exp(sims[i] / temperature)
        preds.append(int(np.argmax(scores)))
    return np.array(preds)


def test_knn_across_chunk_boundaries_equals_a_brute_force_vote():
    g = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(200, 8, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 5, (200,), generator=g)
    queries = torch.nn.functional.normalize(bank[:37] + 0.6 * torch.randn(37, 8, generator=g, dtype=torch.float64),
                                            dim=1)
    qy = labels[:37]
    ks = (1, 7, 20)
    results = {cs: knn_classify(bank, labels, queries, qy, ks=ks, temperature=0.1, chunk_size=cs)
               for cs in (5, 36, 512)}  # 8 chunks (the last of 2), one full chunk + 1, one chunk
    for k in ks:
        pred = _brute_force_knn(bank.float().double().numpy(), labels.numpy(), queries.float().double().numpy(), k,
                                0.1, 5)
        want = 100 * float(np.mean(pred == qy.numpy()))
        assert 0 < want < 100
        for cs, res in results.items():
            assert res[k]["top1"] == pytest.approx(want), (cs, k)
