"""Offline data: BBC News split, JSONL, tokenisation limits."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from veil.errors import InputError
from veil.tune.data import (
    BBC_LABELS,
    TuneExample,
    balanced_subset,
    batch_schedule,
    bbc_examples,
    collate,
    encode_examples,
    load_jsonl,
)


class CharTokenizer:
    """One token per character (enough to test lengths and masks)."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> SimpleNamespace:
        return SimpleNamespace(input_ids=[ord(c) % 200 + 3 for c in text])


def test_bbc_split_is_fixed_stratified_and_disjoint() -> None:
    tr1, te1 = bbc_examples(seed=0)
    tr2, te2 = bbc_examples(seed=0)
    assert tr1 == tr2 and te1 == te2
    assert 2000 < len(tr1) + len(te1) <= 2225
    assert {e.label for e in te1} == set(range(5))
    assert not {e.prompt for e in te1} & {e.prompt for e in tr1}  # duplicates removed
    for c, name in enumerate(BBC_LABELS):
        n_c = sum(e.label == c for e in te1 + tr1)
        assert abs(sum(e.label == c for e in te1) - 0.2 * n_c) <= 1
    assert all(e.prompt.startswith("Article: ") and e.prompt.endswith("\nTopic:") for e in te1[:20])
    assert te1[0].completion == " " + BBC_LABELS[te1[0].label]
    _, te3 = bbc_examples(seed=1)
    assert te3 != te1


def test_jsonl_is_validated(tmp_path: Path) -> None:
    good = tmp_path / "d.jsonl"
    good.write_text(json.dumps({"prompt": "Q: 2+2?", "completion": " 4"}) + "\n\n")
    assert load_jsonl(good)[0].completion == " 4"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(InputError, match="bad.jsonl:1"):
        load_jsonl(bad)
    bad.write_text("not json\n")
    with pytest.raises(InputError, match="not valid JSON"):
        load_jsonl(bad)
    with pytest.raises(InputError, match="does not exist"):
        load_jsonl(tmp_path / "missing.jsonl")


def test_encoding_truncates_prompt_or_refuses_too_long() -> None:
    tok = CharTokenizer()
    exs = load_like = [SimpleNamespace(prompt="A" * 50 + "\nTopic:", completion=" tech", label=4)]
    enc = encode_examples(tok, exs, max_length=32)  # type: ignore[arg-type]
    e = enc[0]
    assert len(e.input_ids) == 32 and e.labels[-5:] == e.input_ids[-5:] and e.labels[0] == -100
    assert e.input_ids[e.prompt_len - 7 : e.prompt_len] == tok("\nTopic:").input_ids  # tail kept
    with pytest.raises(InputError, match="longer than"):
        encode_examples(tok, exs, max_length=32, truncate_prompt=False)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="model context"):
        encode_examples(tok, exs, max_length=128, context_length=64)  # type: ignore[arg-type]
    b = collate(enc + encode_examples(tok, [SimpleNamespace(prompt="hi", completion=" x", label=0)], max_length=32), 0)  # type: ignore[list-item]
    assert b.input_ids.shape == (2, 32) and b.attention_mask[1].sum() == 4 and (b.labels[1, 4:] == -100).all()
    assert load_like is exs


def test_batch_schedule_is_deterministic() -> None:
    a = batch_schedule(10, batch_size=3, epochs=2, seed=7)
    assert a == batch_schedule(10, batch_size=3, epochs=2, seed=7)
    assert sorted(i for b in a[:4] for i in b) == list(range(10))
    assert a != batch_schedule(10, batch_size=3, epochs=2, seed=8)


def test_balanced_subset_is_class_balanced_fixed_and_from_the_test_split() -> None:
    _, test = bbc_examples(seed=0)
    sub = balanced_subset(test, 250)
    assert len(sub) == 250 and sub == balanced_subset(test, 250)
    assert [sum(e.label == c for e in sub) for c in range(5)] == [50] * 5
    assert all(e in test for e in sub)
    assert len({e.prompt for e in sub}) == 250
    uneven = balanced_subset(test, 12)
    assert sorted(sum(e.label == c for e in uneven) for c in range(5)) == [2, 2, 2, 3, 3]
    # a class that runs out leaves its share to the others
    skewed = [e for e in test if e.label == 0][:3] + [e for e in test if e.label == 1][:10]
    assert [e.label for e in balanced_subset(skewed, 8)] == [0, 1, 0, 1, 0, 1, 1, 1]
    with pytest.raises(InputError, match="only 13"):
        balanced_subset(skewed, 14)
    with pytest.raises(InputError, match="labelled"):
        balanced_subset([TuneExample(prompt="p", completion=" c")], 1)
