"""Joint loss L = w_c * L_coarse + w_f * L_fine.

Single-label levels: cross-entropy with optional label smoothing (targets are class indices).
Multi-label taxonomies: the C-HMCNN loss. Both levels are trained as multi-hot targets through the
max-constraint module; for a positive coarse label the max runs only over positive children, so the
gradient goes to the right child and is not stolen by a confident wrong one (their MCLoss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .consistency import child_mask, max_constraint
from .taxonomy import Taxonomy


class HierarchicalLoss(nn.Module):
    def __init__(self, taxonomy: Taxonomy, w_coarse: float = 1.0, w_fine: float = 1.0, label_smoothing: float = 0.0):
        super().__init__()
        self.multi_label = taxonomy.multi_label
        self.w_coarse = w_coarse
        self.w_fine = w_fine
        self.label_smoothing = label_smoothing
        self.register_buffer("mask", child_mask(taxonomy.parents, len(taxonomy.coarse.labels)), persistent=False)

    def forward(
        self, coarse_logits: torch.Tensor, fine_logits: torch.Tensor, coarse_t: torch.Tensor, fine_t: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        coarse_logits = coarse_logits.float()
        fine_logits = fine_logits.float()
        if self.multi_label:
            lc, lf = mcloss(coarse_logits, fine_logits, coarse_t.float(), fine_t.float(), self.mask)
        else:
            ls = self.label_smoothing
            lc = F.cross_entropy(coarse_logits, coarse_t, label_smoothing=ls) if self.w_coarse else coarse_logits.new_zeros(())
            lf = F.cross_entropy(fine_logits, fine_t, label_smoothing=ls) if self.w_fine else fine_logits.new_zeros(())
        total = self.w_coarse * lc + self.w_fine * lf
        return total, {"coarse": float(lc.detach()), "fine": float(lf.detach())}


def mcloss(
    coarse_logits: torch.Tensor,
    fine_logits: torch.Tensor,
    coarse_t: torch.Tensor,
    fine_t: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """C-HMCNN's MCLoss split into its coarse and fine parts (BCE on constrained probabilities)."""
    fine_p = torch.sigmoid(fine_logits)
    coarse_p = torch.sigmoid(coarse_logits)
    constrained = max_constraint(coarse_p, fine_p, mask)
    # For positives: max over positive descendants only (y * h), then constrained.
    pos = max_constraint(coarse_t * coarse_p, fine_t * fine_p, mask)
    coarse_train = (1 - coarse_t) * constrained + coarse_t * pos
    eps = 1e-7
    lc = F.binary_cross_entropy(coarse_train.clamp(eps, 1 - eps), coarse_t)
    # Fine labels are leaves: the constraint leaves them unchanged; BCE with logits is the stable form.
    lf = F.binary_cross_entropy_with_logits(fine_logits, fine_t)
    return lc, lf
