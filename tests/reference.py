"""Deliberately naive reference implementations (loops, float64) that the library is tested against."""

from __future__ import annotations

import torch

from pwself.matching import match_pair


def h(t_logit, center, t_temp, s_logit, s_temp):
    """Cross-entropy H(t, s) for one token pair, float64."""
    t = torch.softmax((t_logit.double() - center.double()) / t_temp, -1)
    return -(t * torch.log_softmax(s_logit.double() / s_temp, -1)).sum()


def reference_loss(s_cls, t_cls, s_patch, t_patch, boxes, flips, grids, objective, lam,
                   cls_center, patch_center, t_temp, s_temp):
    """PW-Self loss, SPEC §4, by loops over teacher view i, student view j != i, sample b, matched pair.

    s_cls [V, B, K]; t_cls [G, B, K]; s_patch[v] [B, T_v, K]; t_patch[g] [B, T_g, K] (logits of all tokens).
    """
    g_n, b_n = t_cls.shape[0], t_cls.shape[1]
    v_n = s_cls.shape[0]
    total, count = 0.0, 0
    for i in range(g_n):
        for j in range(v_n):
            if j == i:
                continue
            for b in range(b_n):
                hc = h(t_cls[i, b], cls_center, t_temp, s_cls[j, b], s_temp)
                pairs = match_pair(boxes[i, b].tolist(), bool(flips[i, b]), grids[i],
                                   boxes[j, b].tolist(), bool(flips[j, b]), grids[j])
                hp = [h(t_patch[i][b, ti], patch_center, t_temp, s_patch[j][b, sj], s_temp) for ti, sj in pairs]
                if objective == "dino":
                    term = hc
                elif objective == "pwml":
                    term = (hc + sum(hp)) / (1 + len(hp))
                elif objective == "pwsl":
                    term = hc + sum(hp)
                elif objective == "pwll":
                    term = lam * hc + (1 - lam) * sum(hp) / len(hp) if hp else hc
                total = total + term
                count += 1
    return total / count


def reference_cossl(s_cls, t_cls, s_patch, cls_center, t_temp, s_temp, w_s=1.0):
    """CO-SSL (CO-DINO) as its paper writes it: per pair (i, j != i) and sample, the image-level H plus ``w_s``
    times the mean over the student patch tokens of j of H(teacher CLS of i, token), centred with the CLS center."""
    g_n, b_n = t_cls.shape[0], t_cls.shape[1]
    total, count = 0.0, 0
    for i in range(g_n):
        for j in range(s_cls.shape[0]):
            if j == i:
                continue
            for b in range(b_n):
                local = [h(t_cls[i, b], cls_center, t_temp, tok, s_temp) for tok in s_patch[j][b]]
                total = total + h(t_cls[i, b], cls_center, t_temp, s_cls[j, b], s_temp) + w_s * sum(local) / len(local)
                count += 1
    return total / count


def reference_bagssl(s_cls, t_cls_bag, cls_center, t_temp, s_temp):
    """BagSSL as pwself defines it: every student view j predicts the teacher bag of its image."""
    total, count = 0.0, 0
    for j in range(s_cls.shape[0]):
        for b in range(s_cls.shape[1]):
            total = total + h(t_cls_bag[b], cls_center, t_temp, s_cls[j, b], s_temp)
            count += 1
    return total / count
