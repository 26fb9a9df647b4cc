"""The drift guard: every request field the installed vLLM accepts has been looked at, and the
documented table of fields is the one llmserve's code produces."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmserve.api import fields

pytestmark = pytest.mark.engine
ROOT = Path(__file__).resolve().parents[2]


def _vllm_fields() -> dict[str, frozenset[str]]:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

    return {
        "chat": frozenset(ChatCompletionRequest.model_fields),
        "completions": frozenset(CompletionRequest.model_fields),
        "responses": frozenset(ResponsesRequest.model_fields),
    }


@pytest.mark.parametrize("route", ["chat", "completions", "responses"])
def test_every_field_vllm_accepts_has_been_reviewed(route):
    installed = _vllm_fields()[route]
    new = sorted(installed - fields.ENGINE_FIELDS[route])
    gone = sorted(fields.ENGINE_FIELDS[route] - installed)
    assert not new, (
        f"vLLM's {route} request accepts fields llmserve has not reviewed: {new}. Decide for "
        "each (served through vLLM, or refused in llmserve/api/fields.py with a reason), add it "
        "to ENGINE_FIELDS, and regenerate docs/api.md."
    )
    assert not gone, f"vLLM's {route} request no longer has {gone}: update ENGINE_FIELDS"


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_the_fast_path_handles_only_fields_vllm_has(route):
    assert fields.FAST_PATH[route] <= _vllm_fields()[route]


def test_deliberate_refusals_are_fields_vllm_would_otherwise_serve_or_openai_defines():
    vllm_fields = set().union(*_vllm_fields().values())
    openai_only = {"functions", "function_call", "modalities", "audio", "prediction",
                   "web_search_options"}  # fmt: skip
    assert set(fields.REFUSED) <= vllm_fields | openai_only


def test_the_documented_field_table_is_current():
    doc = (ROOT / "docs" / "api.md").read_text()
    assert fields.render_table() in doc, "run: python -m llmserve.api.fields docs/api.md"
