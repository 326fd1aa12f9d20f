"""[data]: which data set, how much of it, and how it is split among the clients."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from codream_secure.config.checks import Checks
from codream_secure.config.section import Section
from codream_secure.data import DATASET_NAMES, PARTITION_SCHEMES


@dataclass(frozen=True)
class DataConfig(Section):
    """The data set, its sampling, the number of clients and the partition among them."""

    SECTION = "data"
    TUPLES = ("data_mean", "data_std")
    PATHS = ("data_dir",)

    dataset: str = "digits"
    data_dir: str | None = None
    data_mean: tuple[float, ...] = ()  # () = data.public_normalization's constants
    data_std: tuple[float, ...] = ()
    max_train: int | None = None
    max_test: int | None = None
    clients: int = 4
    partition: str = "dirichlet"
    alpha: float = 0.1
    val_fraction: float = 0.1

    def validate(self, check: Checks) -> None:
        check.choice("dataset", self.dataset, DATASET_NAMES)
        if self.data_dir is not None:
            check.path("data_dir", self.data_dir)
            if self.dataset == "digits":
                raise check.fail("data_dir", "digits is embedded and takes no data_dir; "
                                             f"got {self.data_dir!r}")
            if not Path(self.data_dir).expanduser().exists():
                raise check.fail("data_dir", f"{self.data_dir!r} does not exist")
        self._validate_normalization(check)
        for key in ("max_train", "max_test"):
            if getattr(self, key) is not None:
                check.count(key, getattr(self, key), minimum=1)
        check.count("clients", self.clients, minimum=2)
        check.choice("partition", self.partition, PARTITION_SCHEMES)
        check.real("alpha", self.alpha, low=0.0)
        check.real("val_fraction", self.val_fraction, low=0.0, high=1.0)

    def _validate_normalization(self, check: Checks) -> None:
        if len(self.data_mean) != len(self.data_std):
            raise check.fail("data_std", f"give as many values as data_mean, one per channel; "
                                         f"got {list(self.data_std)} and {list(self.data_mean)}")
        for key in ("data_mean", "data_std"):
            values = tuple(float(v) if isinstance(v, int) and not isinstance(v, bool) else v
                           for v in getattr(self, key))
            object.__setattr__(self, key, values)
            for value in values:
                check.real(key, value, low=0.0 if key == "data_std" else -math.inf)
