"""The trainable heads on the frozen features: the paper's dense head, and the staged one (abnormal, then COVID-19)."""

from __future__ import annotations

import torch
from torch import nn

from covidxr.runtime.errors import CovidxrError

__all__ = ["StagedHead", "make_head"]


class StagedHead(nn.Module):
    """Two decisions instead of one softmax: abnormal vs normal, then COVID-19 vs other pneumonia.

    ``p(COVID-19) = p(abnormal) * p(COVID-19 | abnormal)``. The output is the three classes'
    log-probabilities in ``(COVID-19, NORMAL, PNEUMONIA)`` order, so softmax, temperature scaling,
    ONNX export and Grad-CAM treat it like any head's logits. Trained with ``staged_loss``, each
    decision learns only from sources that hold both of its sides, so "which collection" cannot
    answer either of them on the training data.
    """

    def __init__(self, decisions: nn.Module):
        super().__init__()
        self.decisions = decisions  # -> (abnormal logit, COVID-19-given-abnormal logit)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        abnormal, covid = self.decisions(features).float().unbind(1)
        log_abnormal = nn.functional.logsigmoid(abnormal)
        return torch.stack(
            [
                log_abnormal + nn.functional.logsigmoid(covid),
                nn.functional.logsigmoid(-abnormal),
                log_abnormal + nn.functional.logsigmoid(-covid),
            ],
            dim=1,
        )


def make_head(
    num_features: int, num_classes: int, hidden: int = 256, dropout: float = 0.5, decision: str = "flat"
) -> nn.Module:
    """The paper's new head on pooled features: Dense(hidden, ReLU) → Dropout → Dense(classes).

    ``hidden=0`` gives a linear head. Returns logits: no softmax inside, so losses and Grad-CAM
    gradients do not saturate. ``decision="staged"`` wraps a two-output head in ``StagedHead``
    (three classes only).
    """
    if decision == "staged":
        if num_classes != 3:
            raise CovidxrError("the staged decision needs the three classes COVID-19, NORMAL, PNEUMONIA")
        return StagedHead(make_head(num_features, 2, hidden, dropout))
    if hidden <= 0:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(num_features, num_classes))
    return nn.Sequential(
        nn.Linear(num_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
    )
