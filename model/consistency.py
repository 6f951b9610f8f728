"""Hierarchy-consistent decoding. Pure tensor functions, batched, no Python loop over images.

Single-label taxonomies (each fine label has exactly one coarse parent): the two heads are combined as a
product of experts over the *valid* (coarse, fine) pairs only,

    p(c, f) ∝ p_coarse(c) * p_fine(f)   if c == parent(f), else 0,

so the primary pair is the best valid pair, the fine score is the joint pair probability and the coarse
score is the sum over its children. A coarse score is therefore never below any of its children's
scores and the primary coarse label is always the primary fine label's parent.

Multi-label taxonomies: the C-HMCNN max-constraint (Giunchiglia & Lukasiewicz, NeurIPS 2020): a coarse
score is the max of its own sigmoid and its fine children's sigmoids.
"""

from __future__ import annotations

import torch


def parent_index(parents: tuple[tuple[int, ...], ...], device: torch.device | str | None = None) -> torch.Tensor:
    """parents[f] -> LongTensor [F] of each fine label's single parent."""
    if any(len(p) != 1 for p in parents):
        raise ValueError("single-label decoding needs exactly one parent per fine label")
    return torch.tensor([p[0] for p in parents], dtype=torch.long, device=device)


def child_mask(parents: tuple[tuple[int, ...], ...], n_coarse: int, device=None) -> torch.Tensor:
    """Boolean [C, F]: mask[c, f] is True when coarse c is a parent of fine f."""
    mask = torch.zeros(n_coarse, len(parents), dtype=torch.bool, device=device)
    for f, ps in enumerate(parents):
        for c in ps:
            mask[c, f] = True
    return mask


def decode_single(
    coarse_logits: torch.Tensor, fine_logits: torch.Tensor, parent: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (coarse_scores [N,C], fine_scores [N,F], primary_coarse [N], primary_fine [N]).

    ``parent`` is ``parent_index(...)`` on the logits' device.
    """
    coarse_logits = coarse_logits.float()
    fine_logits = fine_logits.float()
    # log p(parent(f), f) up to a per-row constant; softmax over fine labels normalises the valid pairs.
    joint = torch.log_softmax(fine_logits, 1) + torch.log_softmax(coarse_logits, 1).index_select(1, parent)
    fine_scores = torch.softmax(joint, 1)
    coarse_scores = torch.zeros_like(coarse_logits).index_add_(1, parent, fine_scores)
    primary_fine = fine_scores.argmax(1)
    primary_coarse = parent[primary_fine]
    return coarse_scores, fine_scores, primary_coarse, primary_fine


def decode_independent(coarse_logits: torch.Tensor, fine_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed's decoding: each head's own argmax. May be inconsistent; kept for the ablation."""
    return coarse_logits.argmax(1), fine_logits.argmax(1)


def max_constraint(coarse_probs: torch.Tensor, fine_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """C-HMCNN max-constraint module: coarse'[c] = max(coarse[c], max_{f child of c} fine[f]).

    ``mask`` is ``child_mask(...)`` [C, F]. Works on probabilities in [0, 1] (zeros where masked out).
    """
    kids = (fine_probs.unsqueeze(1) * mask.to(fine_probs.dtype)).amax(2)  # [N, C]
    return torch.maximum(coarse_probs, kids)


def decode_multi(
    coarse_logits: torch.Tensor, fine_logits: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multi-label scores (coarse max-constrained) and the best label of each level.

    The primary coarse label is the best parent of the primary fine label, so the pair is always valid.
    """
    fine = torch.sigmoid(fine_logits.float())
    coarse = max_constraint(torch.sigmoid(coarse_logits.float()), fine, mask)
    primary_fine = fine.argmax(1)
    parents_of_best = mask.t()[primary_fine]  # [N, C]
    primary_coarse = coarse.masked_fill(~parents_of_best, -1.0).argmax(1)
    return coarse, fine, primary_coarse, primary_fine


def consistency_rate(primary_coarse: torch.Tensor, primary_fine: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of rows whose (coarse, fine) pair is a valid parent/child pair."""
    if primary_fine.numel() == 0:
        return 1.0
    return mask[primary_coarse, primary_fine].float().mean().item()
