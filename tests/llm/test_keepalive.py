"""Streaming HTTP clients keep their connections alive correctly: against the model server's
OpenAI and Ollama faces, thousands of streamed requests from 16 threads over a 16-connection
pool all succeed, on at most 16 connections (before the fix, the chunked terminator left
unread after `[DONE]` failed the next request on the connection with BadStatusLine('0\\r\\n'))."""

from __future__ import annotations

import threading
import time

import pytest

from mecbench.core.logging import get_logger
from sut_agent.external.base import ServerType
from sut_agent.external.ollama import OllamaServer
from sut_agent.external.openai import OpenAIServer
from tests.external_servers import LM_NAME, PROMPTS
from tests.llm.conftest import ModelServer

pytestmark = pytest.mark.slow
log = get_logger("tests.llm")

THREADS = 16
REQUESTS_PER_THREAD = 150


@pytest.mark.parametrize("server_class", [OpenAIServer, OllamaServer], ids=["openai", "ollama"])
def test_streamed_requests_keep_their_connections_without_failures(
    model_server: ModelServer, server_class: type[ServerType]
) -> None:
    options = {"max_tokens": "8"} if server_class is OpenAIServer else {"num_predict": "8"}
    if server_class is OpenAIServer:
        options["ignore_eos"] = "true"
    adapter = server_class(model_server.endpoint, LM_NAME, options, 30.0, THREADS)
    failures: list[str] = []
    done = [0]
    lock = threading.Lock()
    first_tokens = [0]

    def on_first_token(_position: int, _data: bytes) -> None:
        with lock:
            first_tokens[0] += 1

    def work(index: int) -> None:
        for n in range(REQUESTS_PER_THREAD):
            prompt = PROMPTS[(index + n) % len(PROMPTS)].encode()
            try:
                result = adapter.infer([prompt], on_first_token)
            except Exception as exc:  # noqa: BLE001 - every failure is the finding
                with lock:
                    failures.append(repr(exc))
                continue
            assert result.outputs[0]
            with lock:
                done[0] += 1

    started = time.monotonic()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    connections = adapter._http._pool.num_connections  # type: ignore[attr-defined]
    adapter.close()
    # The rate is reported, not asserted (no timed assertions): 600-700 req/s here.
    log.info("keepalive_measured", requests=done[0], rate=round(done[0] / elapsed), connections=connections)
    assert failures == []
    assert done[0] == THREADS * REQUESTS_PER_THREAD
    assert first_tokens[0] == done[0]
    assert connections <= THREADS
