"""Small pure parts of the LLM path: where the direct client reaches a server, the kinds of
failures, the SSE/NDJSON decoders, and the figures computed from request records."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loadgen_agent.direct import http_error_text, reachable_endpoint
from loadgen_agent.llm_records import RequestRecord, compute_metrics
from mecbench.servers.base import ServerError, plain_string_field
from mecbench.servers.errors import ErrorTally, error_kind
from mecbench.servers.ollama import OllamaDecoder
from mecbench.servers.openai import OpenAIDecoder


def test_a_loopback_or_wildcard_server_is_reached_where_the_sut_agent_is() -> None:
    assert reachable_endpoint("http://0.0.0.0:8000", "10.231.0.2") == "http://10.231.0.2:8000"
    assert reachable_endpoint("127.0.0.1:8000", "10.231.0.2") == "http://10.231.0.2:8000"
    assert reachable_endpoint("http://127.0.0.1:8000/v1", "fd00::2") == "http://[fd00::2]:8000/v1"
    assert reachable_endpoint("http://10.0.0.5:8000", "10.231.0.2") == "http://10.0.0.5:8000"
    assert reachable_endpoint("http://127.0.0.1:8000", "127.0.0.1") == "http://127.0.0.1:8000"


def test_failure_kinds() -> None:
    assert error_kind("POST /v1/chat/completions: HTTP 503: busy") == "http_503"
    assert error_kind("timed out after 60s") == "timeout"
    assert error_kind("POST /x: ('Connection aborted.', BadStatusLine('0\\r\\n'))") == "connection"
    assert error_kind("POST /x: a streamed event is not JSON: b'{'") == "stream"
    assert error_kind("backend stopped") == "server_stopped"
    assert error_kind("something else") == "other"
    tally = ErrorTally("test", kept_messages=2)
    for message in ("HTTP 500: a", "HTTP 500: b", "timed out", "HTTP 500: c"):
        tally.add(message)
    assert tally.snapshot() == ({"http_500": 3, "timeout": 1}, ["HTTP 500: a", "HTTP 500: b"])
    assert http_error_text(429, b'{"error": {"message": "slow down"}}') == "HTTP 429: slow down"


def test_decoders_read_streams_and_errors() -> None:
    decoder = OpenAIDecoder("chat", "/v1/chat/completions")
    lines = [
        b": ping",
        b'data: {"choices": [{"delta": {"role": "assistant"}}]}',
        b'data: {"choices": [{"delta": {"content": "He"}}]}',
        b"",
        b'data: {"choices": [{"delta": {"content": "llo"}}]}',
        b'data: {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}}',
        b"data: [DONE]",
    ]
    assert [decoder.line(line) for line in lines] == ["", "", "He", "", "llo", "", ""]
    assert decoder.done and decoder.result() == ("Hello", 2) and decoder.input_tokens == 4
    with pytest.raises(ServerError, match="overloaded"):
        OpenAIDecoder("chat", "/p").line(b'data: {"error": {"message": "overloaded"}}')
    ollama = OllamaDecoder("generate", "/api/generate")
    assert ollama.line(b'{"response": "Hi", "done": false}') == "Hi"
    ollama.line(b'{"response": "", "done": true, "eval_count": 7, "prompt_eval_count": 3}')
    assert ollama.done and ollama.result() == ("Hi", 7) and ollama.input_tokens == 3


def test_metrics_from_records() -> None:
    ms = 1_000_000
    records = [
        RequestRecord(
            0,
            0,
            sent_ns=0,
            first_token_ns=10 * ms,
            later_tokens_ns=[12 * ms, 14 * ms],
            ended_ns=14 * ms,
            output_tokens=3,
        ),
        RequestRecord(1, 5 * ms, sent_ns=5 * ms, first_token_ns=45 * ms, ended_ns=65 * ms, output_tokens=3),
        RequestRecord(2, 6 * ms, sent_ns=6 * ms, ended_ns=20 * ms, error_kind="http_500", error="HTTP 500"),
    ]
    metrics = compute_metrics(records, ttft_slo_s=0.02, tpot_slo_s=0.005)
    assert metrics["requests_ok"] == 2 and metrics["requests_failed"] == 1
    assert metrics["ttft_p50_s"] == pytest.approx(0.025)
    assert metrics["tpot_mean_s"] == pytest.approx((0.002 + 0.010) / 2)
    assert metrics["itl_mean_s"] == pytest.approx(0.002)
    # Only the first meets TTFT <= 20 ms and TPOT <= 5 ms; the failed one never counts.
    assert metrics["goodput_requests"] == 1 and metrics["goodput_fraction"] == pytest.approx(1 / 3)
    assert metrics["output_tokens_per_s"] == pytest.approx(6 / 0.065)


_TRICKY = st.lists(st.sampled_from(['"', "\\", ":", '"content":', "text", "x", "é", "\n", " ", "{", "}"])).map("".join)


@settings(max_examples=300, deadline=None)
@given(
    text=_TRICKY,
    other=_TRICKY,
    compact=st.booleans(),
    ascii_only=st.booleans(),
    usage_null=st.booleans(),
    logprobs=st.booleans(),
)
def test_token_events_read_without_json_decoding_give_what_json_gives(
    text: str, other: str, compact: bool, ascii_only: bool, usage_null: bool, logprobs: bool
) -> None:
    """The decoders read a token event's text without decoding its JSON when they can
    (plain_string_field); whatever the text and the event's other fields hold, that gives what
    decoding the JSON gives."""
    separators = (",", ":") if compact else (", ", ": ")
    choice: dict[str, object] = {"index": 0, "delta": {"role": other, "content": text}, "finish_reason": None}
    if logprobs:
        choice["logprobs"] = {"content": [{"token": other}]}
    event: dict[str, object] = {"id": other, "choices": [choice]}
    if usage_null:
        event["usage"] = None
    data = json.dumps(event, separators=separators, ensure_ascii=ascii_only).encode()
    decoder = OpenAIDecoder("chat", "/p")
    assert decoder.line(b"data: " + data) == text
    completion = {"choices": [{"index": 0, "text": text, "logprobs": None}], "model": other}
    line = b"data:" + json.dumps(completion, separators=separators, ensure_ascii=ascii_only).encode()
    assert OpenAIDecoder("completions", "/p").line(line) == text
    ollama_event = {"model": other, "message": {"role": "assistant", "content": text}, "done": False}
    ollama_line = json.dumps(ollama_event, separators=separators, ensure_ascii=ascii_only).encode()
    ollama = OllamaDecoder("chat", "/api/chat")
    assert ollama.line(ollama_line) == text
    generate = {"model": other, "response": text, "done": False, "context": [1, 2]}
    assert OllamaDecoder("generate", "/p").line(json.dumps(generate, separators=separators).encode()) == text
    # The fast path was taken where it could be: a plain text read without decoding.
    plain = not logprobs and "\\" not in json.dumps(text, ensure_ascii=ascii_only)
    assert plain_string_field(data, b'"content":') == (text if plain else None)


class _Completions:
    """Stands in for LoadGen's completion calls (LoadGen, one per process, runs in the session
    worker; here only what the client hands it is looked at)."""

    def __init__(self) -> None:
        self.first_tokens: list[tuple[int, ...]] = []
        self.completed: list[tuple[int, ...]] = []

    @staticmethod
    def QuerySampleResponse(*fields: int) -> tuple[int, ...]:
        return fields

    def FirstTokenComplete(self, responses: list[tuple[int, ...]]) -> None:
        self.first_tokens.extend(responses)

    def QuerySamplesComplete(self, responses: list[tuple[int, ...]]) -> None:
        self.completed.extend(responses)


def test_a_request_past_the_response_timeout_fails_as_a_timeout() -> None:
    """A server that accepts and never answers: each request is cancelled by the client's
    timeout sweep once out for the response timeout, fails as `timeout`, and completes with
    LoadGen's token rules kept (a first token, then 2 tokens)."""
    import socket
    import time

    from loadgen_agent.direct import DirectClient
    from loadgen_agent.worker import FAILED_SAMPLE_TOKENS, TestCounters
    from mecbench.servers.openai import OpenAIServer

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # accepted by the kernel, never answered
        endpoint = f"127.0.0.1:{listener.getsockname()[1]}"
        server = OpenAIServer(endpoint, "m", {"check_model": "false"}, 0.3, 1)
        client = DirectClient(server, f"http://{endpoint}", [b"hi"], 0.3, FAILED_SAMPLE_TOKENS, TestCounters)
        completions = _Completions()
        client._lg = completions
        client.start()
        client.begin_test(want_data=False, use_tokens=True)
        client.issue([7, 8], [0, 0])
        deadline = time.monotonic() + 10
        while len(completions.completed) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        counters, _, _ = client.end_test()
    assert sorted(completions.completed) == [(7, 0, 0, FAILED_SAMPLE_TOKENS), (8, 0, 0, FAILED_SAMPLE_TOKENS)]
    assert sorted(completions.first_tokens) == sorted(completions.completed)
    records = client.take_records()
    assert [r.error_kind for r in records] == ["timeout", "timeout"]
    assert all(r.e2e_s >= 0.3 for r in records)
    assert counters.errors.snapshot()[0] == {"timeout": 2}


def test_stage_figures_from_records_and_over_clients() -> None:
    """Each ramp stage's figures come from the records sent in it; over clients, counts, rates
    and concurrencies add up and per-client durations and percentiles are left out."""
    from controller.aggregate import merge_llm_metrics
    from loadgen_agent.llm_records import StageSpan, compute_stage_metrics

    s = 1_000_000_000
    stages = [StageSpan(10.0, 0, 2 * s, start_ns=0, end_ns=2 * s), StageSpan(0.0, 2, 1 * s, 2 * s, 3 * s)]
    records = [RequestRecord(0, i * s // 10, sent_ns=i * s // 10, first_token_ns=i * s // 10 + s // 100,
                             ended_ns=i * s // 10 + s // 20, output_tokens=4, stage=0) for i in range(20)]
    # Two requests in flight the whole second stage, one of them failed.
    records += [RequestRecord(0, 2 * s, sent_ns=2 * s, ended_ns=3 * s, output_tokens=4, stage=1),
                RequestRecord(0, 2 * s, sent_ns=2 * s, ended_ns=3 * s, stage=1, error_kind="http_500", error="x")]
    metrics = compute_stage_metrics(records, stages)
    assert metrics["stage0_sent"] == 20 and metrics["stage0_requests_per_s"] == 10.0
    assert metrics["stage0_target_rate_per_s"] == 10.0 and metrics["stage0_duration_s"] == 2.0
    assert metrics["stage0_concurrency_mean"] == pytest.approx(0.5)  # 20 x 50 ms over 2 s
    assert metrics["stage0_ttft_p50_s"] == pytest.approx(0.01) and metrics["stage0_e2e_p50_s"] == pytest.approx(0.05)
    assert metrics["stage1_target_concurrency"] == 2 and metrics["stage1_concurrency_mean"] == pytest.approx(2.0)
    assert metrics["stage1_sent"] == 2 and metrics["stage1_failed"] == 1
    merged = merge_llm_metrics([metrics, metrics])
    assert merged["stage0_requests_per_s"] == 20.0 and merged["stage1_concurrency_mean"] == pytest.approx(4.0)
    assert merged["stage0_sent"] == 40 and merged["stage1_target_concurrency"] == 4
    assert "stage0_duration_s" not in merged and "stage0_ttft_p50_s" not in merged
