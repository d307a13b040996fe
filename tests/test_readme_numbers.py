"""Every measured number in the README comes from a JSON file under benchmarks/results/.

A README paragraph (or table) that links ``benchmarks/results/NAME.json`` may only quote numbers
that are in that JSON: each decimal number (``590.41``, ``0.94245``, ``21.9``) and each number with
thousands separators (``10,511``) must equal, at the precision written, some numeric value of one
of the JSON files the paragraph links, possibly as a percentage, in thousands, millions or minutes.
Whole numbers without separators (``10 trees``, ``depth 5``) are settings, not measurements.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
LINK = re.compile(r"\]\((benchmarks/results/[\w.-]+\.json)\)")
NUMBER = re.compile(r"(?<![\w.,/#-])(\d{1,3}(?:,\d{3})+|\d+\.\d+)(?![\w.]|,\d)")
SCALES = (1.0, 100.0, 1e-3, 1e-6, 1 / 60)


def _leaves(node: Any) -> Iterator[float]:
    if isinstance(node, bool):
        return
    if isinstance(node, (int, float)):
        yield float(node)
    elif isinstance(node, dict):
        for v in node.values():
            yield from _leaves(v)
    elif isinstance(node, list):
        for v in node:
            yield from _leaves(v)


def _blocks(text: str) -> list[str]:
    return [b for b in re.split(r"\n\s*\n", text) if LINK.search(b)]


def _matches(token: str, values: list[float]) -> bool:
    decimals = len(token.split(".")[1]) if "." in token else 0
    want = float(token.replace(",", ""))
    tol = 0.5 * 10 ** (-decimals) + 1e-9
    return any(abs(v * s - want) <= tol for v in values for s in SCALES)


def _unmatched() -> list[str]:
    problems: list[str] = []
    for block in _blocks(README.read_text()):
        files = sorted(set(LINK.findall(block)))
        values: list[float] = []
        for f in files:
            path = ROOT / f
            if not path.exists():
                problems.append(f"{f}: linked from the README but missing")
                continue
            values.extend(_leaves(json.loads(path.read_text())))
        prose = LINK.sub("](link)", block)
        for token in NUMBER.findall(prose):
            if not _matches(token, values):
                first = block.strip().splitlines()[0][:80]
                problems.append(f"{token!r} not in {', '.join(files)} (block starting {first!r})")
    return problems


def test_readme_links_result_files() -> None:
    assert len(_blocks(README.read_text())) >= 5, "the README should cite its benchmark JSON files"


def test_every_readme_number_is_in_the_linked_json() -> None:
    problems = _unmatched()
    assert not problems, "README numbers without a source:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("token", "values", "ok"),
    [("590.41", [590.41], True), ("0.945", [0.94506], True), ("21.9", [0.2189], True),
     ("10,511", [10511], True), ("0.75", [745241.0], True),
     ("590.41", [590.4], False), ("10,511", [10512], False)],
)
def test_matching_rules(token: str, values: list[float], ok: bool) -> None:
    assert _matches(token, values) is ok
