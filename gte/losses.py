"""The e2KD loss terms, each the paper's formula and nothing more."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _f32(t: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 logits and maps are promoted; float64 stays float64, for gradient checks)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(p_T ‖ p_S) with p = softmax(logits / T), summed over classes, averaged over the batch."""
    t = temperature
    log_ps = F.log_softmax(_f32(student_logits) / t, dim=1)
    log_pt = F.log_softmax(_f32(teacher_logits) / t, dim=1)
    return t * t * F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)


def explanation_loss(student_maps: torch.Tensor, teacher_maps: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of 1 − cos(student map, teacher map), each map flattened."""
    s = _f32(student_maps).flatten(1)
    t = _f32(teacher_maps).flatten(1)
    return (1.0 - F.cosine_similarity(s, t, dim=1, eps=1e-8)).mean()


def log_norm_gap(student_maps: torch.Tensor, teacher_maps: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of (log‖W_S‖ − log‖W_T‖)², each map flattened: the magnitude the cosine ignores.
    Not part of the paper's e2KD (``distill.exp_norm_weight``)."""
    s = torch.linalg.vector_norm(_f32(student_maps).flatten(1), dim=1)
    t = torch.linalg.vector_norm(_f32(teacher_maps).flatten(1), dim=1)
    return (torch.log(s + 1e-12) - torch.log(t + 1e-12)).square().mean()


def multilabel_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Multi-label KD (VOC): T² · Σ_classes KL(Bernoulli(σ(t/T)) ‖ Bernoulli(σ(s/T))), averaged over the batch."""
    t = temperature
    s, q = _f32(student_logits) / t, _f32(teacher_logits) / t
    p_t = torch.sigmoid(q)
    # log σ(z) = -softplus(-z), log(1 - σ(z)) = -softplus(z): stable for large |z|
    kl = p_t * (F.softplus(-s) - F.softplus(-q)) + (1 - p_t) * (F.softplus(s) - F.softplus(q))
    return t * t * kl.sum(1).mean()


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, bcos: bool) -> torch.Tensor:
    """Label loss: for B-cos models the official code's BCE-with-logits against one-hot targets clamped below at 1/C
    (off-labels 1/C), cross-entropy otherwise.

    ``labels`` of shape N×C (multi-hot, multi-label data) always take plain BCE against the multi-hot targets.
    """
    if labels.ndim == 2:
        return F.binary_cross_entropy_with_logits(_f32(logits), labels.to(_f32(logits).dtype))
    if bcos:  # the official B-cos loss (UniformOffLabelsBCEWithLogitsLoss): off-labels 1/C, mean over N·C
        n_cls = logits.shape[1]
        target = F.one_hot(labels.long(), n_cls).to(_f32(logits).dtype).clamp_(min=1.0 / n_cls)
        return F.binary_cross_entropy_with_logits(_f32(logits), target)
    return F.cross_entropy(_f32(logits), labels.long())
