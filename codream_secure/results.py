"""Shared records: each client's data split and the per-method results that reports are made of."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class ClientData:
    """One client's private training tensors and the validation set it is selected on.

    The simulation gives every client the same global held-out validation set (see
    simulation.split_clients); inputs are float32, labels int64.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor


@dataclass
class MethodResult:
    """Accuracy of one method per round and per client, with validation-based selection.

    `val[r][k]` and `test[r][k]` are client k's accuracies after round r (round 0 is after
    warm-up). The reported accuracy of client k is its test accuracy at the round where its
    validation accuracy was highest (earliest on ties): the test set never selects anything.
    """

    name: str
    val: list[list[float]] = field(default_factory=list)
    test: list[list[float]] = field(default_factory=list)

    def record(self, val: list[float], test: list[float]) -> None:
        self.val.append([float(v) for v in val])
        self.test.append([float(t) for t in test])

    @property
    def selected_round(self) -> list[int]:
        return [int(r) for r in np.argmax(np.asarray(self.val), axis=0)]

    @property
    def per_client_accuracy(self) -> list[float]:
        return [self.test[r][k] for k, r in enumerate(self.selected_round)]

    @property
    def mean_accuracy(self) -> float:
        return float(np.mean(self.per_client_accuracy))

    def summary(self) -> dict:
        """The `final.<method>` block of report.json."""
        return {
            "mean_accuracy": self.mean_accuracy,
            "per_client_accuracy": self.per_client_accuracy,
            "selected_round": self.selected_round,
            "last_round_mean_accuracy": float(np.mean(self.test[-1])),
        }
