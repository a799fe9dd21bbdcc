"""The K models of a cross-validated trial as one model.

A trial with ``--cv K`` trains one model per inner fold; its test figures are those of the
K models' averaged probabilities, and that ensemble is what a search registers as its best
model. Everything downstream (MLflow ``log_model``, ``train.predict``, Grad-CAM) expects a
model that returns logits, so ``forward`` returns the log of the averaged softmax
probabilities: ``softmax(forward(x))`` is the averaged probabilities (the log-sum-exp of a
probability vector is log 1 = 0), and ``argmax`` is the ensemble's vote by mean probability.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ProbabilityEnsemble(nn.Module):
    """Mean of the members' softmax probabilities; ``forward`` returns its log.

    ``members`` are the fold models (``.members``, an ``nn.ModuleList``). Probabilities are
    averaged in float32 and floored at the smallest normal float before the log, so a class
    that every member rules out gets a very negative finite score instead of -inf.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(members) == 0:
            raise ValueError("ProbabilityEnsemble needs at least one member")
        self.members = nn.ModuleList(members)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """The averaged softmax probabilities, shape (batch, classes)."""
        total = None
        for member in self.members:
            p = torch.softmax(member(x).float(), dim=1)
            total = p if total is None else total + p
        return total / len(self.members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.probabilities(x)
        return p.clamp_min(torch.finfo(p.dtype).tiny).log()
