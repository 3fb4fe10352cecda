"""The e2KD loss terms, each the paper's formula and nothing more."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(p_T ‖ p_S) with p = softmax(logits / T), summed over classes, averaged over the batch."""
    t = temperature
    log_ps = F.log_softmax(student_logits.float() / t, dim=1)
    log_pt = F.log_softmax(teacher_logits.float() / t, dim=1)
    return t * t * F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)


def explanation_loss(student_maps: torch.Tensor, teacher_maps: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of 1 − cos(student map, teacher map), each map flattened."""
    s = student_maps.float().flatten(1)
    t = teacher_maps.float().flatten(1)
    return (1.0 - F.cosine_similarity(s, t, dim=1, eps=1e-8)).mean()


def multilabel_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Multi-label KD (VOC): T² · Σ_classes KL(Bernoulli(σ(t/T)) ‖ Bernoulli(σ(s/T))), averaged over the batch."""
    t = temperature
    s, q = student_logits.float() / t, teacher_logits.float() / t
    p_t = torch.sigmoid(q)
    # log σ(z) = -softplus(-z), log(1 - σ(z)) = -softplus(z): stable for large |z|
    kl = p_t * (F.softplus(-s) - F.softplus(-q)) + (1 - p_t) * (F.softplus(s) - F.softplus(q))
    return t * t * kl.sum(1).mean()


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, bcos: bool) -> torch.Tensor:
    """Label loss: BCE-with-logits on one-hot targets for B-cos models (their convention), cross-entropy otherwise.

    ``labels`` of shape N×C (multi-hot, multi-label data) always take BCE.
    """
    if labels.ndim == 2:
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    if bcos:
        onehot = F.one_hot(labels.long(), logits.shape[1]).to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits.float(), onehot.float())  # mean over N·C, as bcos
    return F.cross_entropy(logits.float(), labels.long())
