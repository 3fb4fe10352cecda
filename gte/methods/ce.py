"""Label-only training (baselines, and the demo's teacher)."""

from __future__ import annotations

import torch

from gte.methods.base import Method


class LabelsOnly(Method):
    """Cross-entropy (BCE for B-cos) on the ground-truth labels."""

    def loss(self, images: torch.Tensor, labels: torch.Tensor, step: int, frozen=None) -> tuple[torch.Tensor, dict]:
        logits = self.student_logits(images)
        logs: dict[str, torch.Tensor] = {}
        loss = self.with_labels(logits.new_zeros(()), logs, logits, labels, 1.0)
        return loss, logs
