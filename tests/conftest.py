"""Shared pytest fixtures for veil's tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from veil.testing import run_parties as _run_parties


@pytest.fixture
def run_parties() -> Callable[..., tuple[Any, Any]]:
    """``run_parties(fn_a, fn_b, transport="memory"|"grpc", timeout=120, args_a=(), args_b=())``.

    Runs ``fn(channel, *args)`` for both roles and returns ``(result_a, result_b)``; the first
    failure on either side is raised here. See :mod:`veil.testing`.
    """
    return _run_parties
