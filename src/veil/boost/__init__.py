"""veil.boost: two-party secure XGBoost on vertically partitioned data (HE + secret sharing).

See docs/protocols/boost.md. Public API: :class:`SecureXGBClassifier`, :class:`SecureXGBRegressor`
(one role per process), :func:`veil.boost.train.secure_train`,
:func:`veil.boost.predict.secure_predict_margin`, model files in :mod:`veil.boost.model`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BoostParams", "SecureXGBClassifier", "SecureXGBRegressor"]


def __getattr__(name: str) -> Any:
    if name in ("SecureXGBClassifier", "SecureXGBRegressor"):
        from veil.boost import api

        return getattr(api, name)
    if name == "BoostParams":
        from veil.boost.params import BoostParams

        return BoostParams
    raise AttributeError(f"module 'veil.boost' has no attribute {name!r}")
