"""The response bodies built from templates are exactly the JSON of the reference dicts."""

from __future__ import annotations

import json

import pytest

from llmserve.api import objects

TEXTS = ["", "plain", 'quote " backslash \\ slash /', "línea\nnueva\ttab", "emoji 🦙 \u2028",
         "\x00\x1f control"]  # fmt: skip


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("finish_reason", ["stop", "length", None])
def test_completion_json_matches_the_reference_dict(chat: bool, text: str,
                                                    finish_reason: str | None) -> None:  # fmt: skip
    fields = dict(response_id="chatcmpl-ab\"c", created=1_700_000_000, model='m/"x"', text=text,
                  finish_reason=finish_reason, prompt_tokens=7, completion_tokens=3)  # fmt: skip
    reference = (objects.chat_completion if chat else objects.text_completion)(**fields)
    built = objects.completion_json(chat=chat, **fields)
    assert json.loads(built) == reference
    assert built == objects._dumps(reference).encode()  # the same bytes as encoding the dict
    assert json.loads(built)["usage"]["total_tokens"] == 10
