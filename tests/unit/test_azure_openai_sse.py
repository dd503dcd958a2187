"""The OpenAI wire's SSE reading as the Azure OpenAI relay uses it, line by line (the wire itself is tested
against the simulator)."""

from __future__ import annotations

import pytest

from gateway_lib.errors import ProviderError
from gateway_lib.providers.azure_openai.adapter import WIRE
from gateway_lib.providers.base import StreamEvent
from gateway_lib.providers.openai_wire import SseStream


def _Stream(chat: bool) -> SseStream:
    return SseStream(WIRE, chat)


def _events(lines: list[bytes]) -> list[StreamEvent]:
    return _Stream(chat=True).events(lines)


PREAMBLE = b'data: {"choices":[],"prompt_filter_results":[{"prompt_index":0}]}'
CHUNK = b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}'
USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}'


def test_one_read_becomes_events_marked_to_go_out_together() -> None:
    events = _events([PREAMBLE, b"", CHUNK, b"", b": keep-alive", CHUNK + b"\r", USAGE, b"data: [DONE]", b""])
    assert [e.more for e in events] == [True, True, False], "the preamble and [DONE] are no events"
    assert [e.text for e in events] == ["Hi", "Hi", ""]
    assert events[0].raw == CHUNK[6:] and events[1].raw == CHUNK[6:], "the JSON as received, CR stripped"
    assert events[2].usage is not None and events[2].usage.completion_tokens == 1


def test_an_error_event_inside_the_stream_is_a_provider_error() -> None:
    with pytest.raises(ProviderError) as raised:
        _events([CHUNK, b'data: {"error":{"message":"overloaded"}}'])
    assert raised.value.kind == "server_error" and raised.value.retryable


def test_an_event_name_split_from_its_data_across_reads_still_names_it() -> None:
    stream = _Stream(chat=False)
    assert stream.feed(b"event: response.created\ndata: {\"type\":\"response.cr") == []
    first = stream.feed(b"eated\"}\n\nevent: response.completed\n")
    last = stream.feed(b"data: {\"type\":\"response.completed\"}\n\n")
    assert [(e.name, e.chunk["type"], e.usage) for e in first + last] == [
        ("response.created", "response.created", None), ("response.completed", "response.completed", None)]
    assert stream.end() == []
