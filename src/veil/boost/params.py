"""Hyper-parameters of secure XGBoost, with xgboost's names and defaults where they exist."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from veil.boost.errors import BoostConfigError

Objective = Literal["binary:logistic", "reg:squarederror"]
Algorithm = Literal["he-agg", "ss-agg"]

OBJECTIVES: tuple[str, ...] = ("binary:logistic", "reg:squarederror")
ALGORITHMS: tuple[str, ...] = ("he-agg", "ss-agg")


@dataclasses.dataclass(frozen=True)
class BoostParams:
    """Training parameters; both parties must use the same values (checked in the handshake)."""

    objective: str = "binary:logistic"
    n_estimators: int = 10
    max_depth: int = 5
    learning_rate: float = 0.3
    reg_lambda: float = 1.0
    gamma: float = 0.0
    min_child_weight: float = 1.0
    max_bin: int = 16
    subsample: float = 1.0
    colsample_bytree: float = 1.0
    base_score: float | None = None
    early_stopping_rounds: int | None = None
    algorithm: str = "ss-agg"
    seed: int = 0

    def validate(self) -> BoostParams:
        """Raise :class:`BoostConfigError` on an invalid value; return self."""
        if self.objective not in OBJECTIVES:
            raise BoostConfigError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.algorithm not in ALGORITHMS:
            raise BoostConfigError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}")
        if not 1 <= self.n_estimators <= 10_000:
            raise BoostConfigError(f"n_estimators must be in [1, 10000], got {self.n_estimators}")
        if not 1 <= self.max_depth <= 10:
            raise BoostConfigError(f"max_depth must be in [1, 10], got {self.max_depth}")
        if not 0.0 < self.learning_rate <= 1.0:
            raise BoostConfigError(f"learning_rate must be in (0, 1], got {self.learning_rate}")
        if self.reg_lambda < 0 or self.gamma < 0 or self.min_child_weight < 0:
            raise BoostConfigError("reg_lambda, gamma and min_child_weight must be >= 0")
        if self.reg_lambda == 0 and self.min_child_weight == 0:
            raise BoostConfigError("reg_lambda and min_child_weight cannot both be 0 (division by zero)")
        if not 2 <= self.max_bin <= 256:
            raise BoostConfigError(f"max_bin must be in [2, 256], got {self.max_bin}")
        if not 0.0 < self.subsample <= 1.0 or not 0.0 < self.colsample_bytree <= 1.0:
            raise BoostConfigError("subsample and colsample_bytree must be in (0, 1]")
        if self.early_stopping_rounds is not None and self.early_stopping_rounds < 1:
            raise BoostConfigError("early_stopping_rounds must be >= 1")
        return self

    def public_dict(self) -> dict[str, Any]:
        """The parameters both parties must agree on (seed and base_score excluded)."""
        d = dataclasses.asdict(self)
        d.pop("seed")
        d.pop("base_score")
        return d
