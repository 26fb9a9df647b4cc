"""X-Request-Timeout (or the config default) becomes a deadline on the queue's clock."""

from __future__ import annotations

import pytest

from llmserve.admission import request_deadline
from llmserve.errors import InvalidRequest


def test_the_header_gives_seconds_from_now():
    assert request_deadline("2.5", None, now=100.0) == 102.5


def test_the_header_wins_over_the_default():
    assert request_deadline("1", 30.0, now=100.0) == 101.0


def test_without_a_header_the_default_applies_or_none():
    assert request_deadline(None, 30.0, now=100.0) == 130.0
    assert request_deadline("  ", 30.0, now=100.0) == 130.0
    assert request_deadline(None, None, now=100.0) is None


@pytest.mark.parametrize("bad", ["0", "-1", "soon", "nan", "inf", "1e400"])
def test_a_bad_header_is_a_400_naming_the_header(bad):
    with pytest.raises(InvalidRequest) as refused:
        request_deadline(bad, None, now=0.0)
    assert refused.value.status == 400
    assert refused.value.param == "X-Request-Timeout"
