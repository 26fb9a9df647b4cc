"""Prompts, arrival times and SSE decoding of `llmserve bench`: pure, no sockets."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from llmserve.bench import datasets
from llmserve.bench.arrivals import arrival_offsets
from llmserve.bench.errors import BenchError
from llmserve.bench.sse import SSEDecoder


def test_sse_events_split_across_chunks_and_line_ends() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b'data: {"a"') == []
    assert decoder.feed(b": 1}\r") == []  # "\r" may be half of "\r\n": held back
    assert decoder.feed(b"\n\r\n: heartbeat\n\ndata: [DO") == ['{"a": 1}']
    assert decoder.feed(b"NE]\n\n") == ["[DONE]"]


def test_sse_joins_multiline_data_and_ignores_other_fields() -> None:
    decoder = SSEDecoder()
    events = decoder.feed(b"event: x\nid: 3\ndata: one\ndata:two\n\n")
    assert events == ["one\ntwo"]


def test_sse_utf8_split_inside_a_character() -> None:
    decoder = SSEDecoder()
    raw = "data: é\n\n".encode()
    assert decoder.feed(raw[:7]) == []
    assert decoder.feed(raw[7:]) == ["é"]


def test_sse_flush_returns_an_event_left_without_its_blank_line() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: [DONE]") == []
    assert decoder.flush() == ["[DONE]"]
    assert SSEDecoder().flush() == []


def test_infinite_rate_sends_everything_at_once() -> None:
    assert arrival_offsets(3, float("inf")) == [0.0, 0.0, 0.0]


def test_arrivals_end_exactly_at_num_over_rate_and_increase() -> None:
    offsets = arrival_offsets(50, 10.0, 1.0, random.Random(1))
    assert offsets[-1] == pytest.approx(5.0)
    assert all(b >= a for a, b in itertools.pairwise(offsets))


def test_infinite_burstiness_gives_even_spacing() -> None:
    assert arrival_offsets(4, 2.0, float("inf")) == pytest.approx([0.5, 1.0, 1.5, 2.0])


def test_low_burstiness_clusters_arrivals() -> None:
    def spread(b: float) -> float:
        offsets = arrival_offsets(2000, 100.0, b, random.Random(7))
        gaps = [y - x for x, y in itertools.pairwise([0.0, *offsets])]
        mean = sum(gaps) / len(gaps)
        return (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean

    # gamma(k): coefficient of variation 1/sqrt(k): 0.25 -> 2, 1 -> 1, 4 -> 0.5
    assert spread(0.25) == pytest.approx(2.0, rel=0.15)
    assert spread(1.0) == pytest.approx(1.0, rel=0.1)
    assert spread(4.0) == pytest.approx(0.5, rel=0.1)


def test_bad_rates_are_rejected() -> None:
    with pytest.raises(BenchError):
        arrival_offsets(3, 0.0)
    with pytest.raises(BenchError):
        arrival_offsets(3, 1.0, burstiness=0.0)


def test_random_prompts_have_the_word_count_asked_and_are_reproducible() -> None:
    first = datasets.random_requests(5, 32, 8, seed=3)
    assert [len(r.prompt.split()) for r in first] == [32] * 5
    assert [(r.prompt_len, r.expected_output_len) for r in first] == [(32, 8)] * 5
    assert first == datasets.random_requests(5, 32, 8, seed=3)
    assert first != datasets.random_requests(5, 32, 8, seed=4)


def test_random_range_ratio_spreads_lengths_within_bounds() -> None:
    requests = datasets.random_requests(200, 100, 10, seed=0, range_ratio=0.5)
    inputs = [r.prompt_len for r in requests]
    outputs = [r.expected_output_len for r in requests]
    assert min(inputs) >= 50 and max(inputs) <= 150 and len(set(inputs)) > 20
    assert min(outputs) >= 5 and max(outputs) <= 15


class WordTokenizer:
    """A toy tokenizer: each id is a word; special id 0."""

    vocab_size = 50
    all_special_ids = (0,)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [int(w[1:]) for w in text.split()]
        return [0, *ids] if add_special_tokens else ids

    def decode(self, ids: list[int]) -> str:
        return " ".join(f"w{i}" for i in ids)


def test_random_prompts_with_a_tokenizer_have_exact_lengths_without_specials() -> None:
    requests = datasets.random_requests(3, 60, 4, seed=1, tokenizer=WordTokenizer())
    for r in requests:
        ids = WordTokenizer().encode(r.prompt, add_special_tokens=False)
        assert len(ids) == r.prompt_len == 60
        assert 0 not in ids


def sharegpt(tmp_path: Path, conversations: list[list[str]]) -> Path:
    path = tmp_path / "sg.json"
    data = [
        {"id": str(i), "conversations": [{"from": "human", "value": t} for t in turns]}
        for i, turns in enumerate(conversations)
    ]
    path.write_text(json.dumps(data))
    return path


def test_sharegpt_prunes_short_and_single_turn_entries(tmp_path: Path) -> None:
    long_enough = "x" * 40  # 10 approximate tokens
    path = sharegpt(tmp_path, [[long_enough, long_enough], ["hi", long_enough], [long_enough]])
    requests = datasets.sharegpt_requests(path, 3, seed=0)
    assert len(requests) == 3  # oversampled from the one usable entry
    assert {(r.prompt, r.prompt_len, r.expected_output_len) for r in requests} == {
        (long_enough, 10, 10)
    }


def test_sharegpt_output_len_override(tmp_path: Path) -> None:
    path = sharegpt(tmp_path, [["y" * 40, "ok"]])
    (request,) = datasets.sharegpt_requests(path, 1, output_len=2)
    assert request.expected_output_len == 2


def test_sharegpt_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="no such file"):
        datasets.sharegpt_requests(tmp_path / "missing.json", 1)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(BenchError, match=r"bad\.json"):
        datasets.sharegpt_requests(bad, 1)
    with pytest.raises(BenchError, match="no usable"):
        datasets.sharegpt_requests(sharegpt(tmp_path, [["a", "b"]]), 1)
