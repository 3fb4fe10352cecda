"""Label-only training (baselines, and the demo's teacher)."""

from __future__ import annotations

from gte.methods.base import Method, Needs, register


@register("ce")
class LabelsOnly(Method):
    """Cross-entropy (BCE for B-cos) on the ground-truth labels; ``ce_weight`` does not apply (it is the loss)."""

    needs = Needs(teacher=False)

    def objective(self, batch, s, t):
        logs: dict = {}
        return self.with_labels(s.logits.new_zeros(()), logs, s.logits, batch.labels, 1.0), logs
