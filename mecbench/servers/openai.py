"""OpenAI-compatible HTTP servers (vLLM, llama.cpp's server, TGI, Ollama's /v1, ...):
completions and chat, streamed or not.

A sample's payload is its prompt as UTF-8 text, or a JSON object whose fields go into the
request body as they are (`{"messages": [...], "max_tokens": 64}`), so a dataset can carry
whole requests. The response given back to LoadGen is the generated text, and its token count
(the server's `usage.completion_tokens`, else one per streamed chunk that carried text). With
streaming on, the first chunk carrying text is the sample's first token (TTFT).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from mecbench.core.errors import FailedPrecondition
from mecbench.servers.base import (
    AnswerDecoder,
    FirstTokenCallback,
    HttpCall,
    InferenceResult,
    Options,
    ServerError,
    ServerType,
    plain_string_field,
    request_fields,
)
from mecbench.servers.http import JSON_HEADERS, HttpClient


class OpenAIServer(ServerType):
    name = "openai"
    # vLLM, SGLang, TGI and llama.cpp (with --metrics) serve it there.
    metrics_path = "/metrics"
    OPTIONS: ClassVar[dict[str, str]] = {
        "api": "chat (POST /v1/chat/completions, the default) or completions (POST /v1/completions)",
        "max_tokens": "tokens to generate per sample (default 128)",
        "stream": "stream tokens as they are generated, for TTFT and TPOT (default true)",
        "temperature": "sampling temperature (default 0: greedy, repeatable)",
        "ignore_eos": "ask the server to generate max_tokens whatever the text (vLLM's extension)",
        "api_key_env": "name of an environment variable of the SUT agent holding the API key",
        "path_prefix": "path of the API under the endpoint (default /v1)",
        "check_model": "refuse to start when /v1/models does not list the model (default true)",
    }

    def configure(self, opts: Options) -> None:
        self.api = opts.choice("api", "chat", ("chat", "completions"))
        self.max_tokens = opts.integer("max_tokens", 128, 1, 1_000_000)
        self.stream = opts.boolean("stream", True)
        self.temperature = opts.number("temperature", 0.0, 0.0, 10.0)
        self.ignore_eos = opts.boolean("ignore_eos", False)
        self.check_model = opts.boolean("check_model", True)
        prefix = "/" + opts.text("path_prefix", "/v1").strip("/")
        key_env = opts.text("api_key_env")
        headers: dict[str, str] = {}
        if key_env:
            key = os.environ.get(key_env)
            if not key:
                opts.violations.add(f"{self.field}.api_key_env", f"the SUT agent has no environment variable {key_env}")
            else:
                headers["Authorization"] = f"Bearer {key}"
        self._path = prefix + ("/chat/completions" if self.api == "chat" else "/completions")
        self._models_path = prefix + "/models"
        self._headers = headers
        self._http = HttpClient(self.endpoint, self.request_timeout_s, self.concurrency, headers)

    def prepare(self, deadline: float) -> None:
        if not self.check_model:
            return
        status, body = self._http.json("GET", self._models_path, timeout_s=max(deadline - time.monotonic(), 1.0))
        if status != 200 or not isinstance(body, dict):
            return  # a server without the listing (some proxies): the warm-up request tells
        served = [str(entry.get("id", "")) for entry in body.get("data", []) if isinstance(entry, dict)]
        if served and self.model not in served:
            raise FailedPrecondition(
                f"the server does not serve model {self.model!r}; it serves {', '.join(served)} "
                "(set option check_model=false for servers that accept any name)"
            )

    def warmup_payloads(self) -> list[bytes]:
        return [b"Hello"]

    def request_body(self, payload: bytes) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": self.max_tokens, "temperature": self.temperature}
        if self.ignore_eos:
            body["ignore_eos"] = True
        fields = request_fields(payload)
        if isinstance(fields, dict):
            body.update(fields)
        elif self.api == "chat":
            body["messages"] = [{"role": "user", "content": fields}]
        else:
            body["prompt"] = fields
        if self.stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    def http_call(self, payload: bytes) -> HttpCall:
        body = self.request_body(payload)
        return HttpCall(
            "POST", self._path, json.dumps(body).encode(), {**self._headers, **JSON_HEADERS}, bool(body.get("stream"))
        )

    def decoder(self) -> OpenAIDecoder:
        return OpenAIDecoder(self.api, self._path)

    def infer(self, payloads: Sequence[bytes], on_first_token: FirstTokenCallback | None) -> InferenceResult:
        outputs: list[bytes] = []
        counts: list[int] = []
        for position, payload in enumerate(payloads):
            text, tokens = self._http.exchange(self.http_call(payload), self.decoder(), position, on_first_token)
            outputs.append(text.encode())
            counts.append(tokens)
        return InferenceResult(outputs, counts)

    def close(self) -> None:
        self._http.close()


class OpenAIDecoder(AnswerDecoder):
    """Chat or completions answers: server-sent events (`data: {...}` lines, `data: [DONE]`
    last) or one JSON body. The token count is the server's `usage.completion_tokens` when it
    sends usage, else one per event that carried text."""

    def __init__(self, api: str, path: str) -> None:
        self.api = api
        self.path = path
        self.parts: list[str] = []
        self.usage_tokens: int | None = None
        self.done = False
        # A token event's text, read without decoding the event (see plain_string_field): the
        # key of the text, and what an event must hold for that (chat: a delta).
        self._text_key = b'"content":' if api == "chat" else b'"text":'
        self._event_marker = b'"delta":' if api == "chat" else b'"choices":'

    def line(self, line: bytes) -> str:
        if not line.startswith(b"data:"):
            return ""  # blank separators, comments (": ping"), event names
        data = line[5:].strip()
        if data == b"[DONE]":
            self.done = True
            return ""
        if self._event_marker in data and not _may_carry(data):
            text = plain_string_field(data, self._text_key)
            if text is not None:
                if text:
                    self.parts.append(text)
                return text
        try:
            event = json.loads(data)
        except ValueError:
            raise ServerError(f"POST {self.path}: a streamed event is not JSON: {data[:200]!r}") from None
        if not isinstance(event, dict):
            return ""
        if "error" in event:
            raise ServerError(f"POST {self.path}: {event['error']}")
        usage = event.get("usage")
        if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
            self.usage_tokens = int(usage["completion_tokens"])
            if usage.get("prompt_tokens") is not None:
                self.input_tokens = int(usage["prompt_tokens"])
        choices = event.get("choices")
        if not choices:
            return ""
        text = _choice_text(choices[0], self.api, streamed=True)
        if text:
            self.parts.append(text)
        return text

    def whole(self, body: bytes, headers: Mapping[str, str] | None = None) -> None:
        try:
            answer = json.loads(body)
        except ValueError:
            raise ServerError(f"POST {self.path}: the answer is not JSON") from None
        self.parts.append(_choice_text(_first_choice(answer), self.api, streamed=False))
        usage = answer.get("usage") if isinstance(answer, dict) else None
        self.usage_tokens = int(usage.get("completion_tokens", 0)) if isinstance(usage, dict) else 0
        if isinstance(usage, dict) and usage.get("prompt_tokens") is not None:
            self.input_tokens = int(usage["prompt_tokens"])
        self.done = True

    def result(self) -> tuple[str, int]:
        tokens = self.usage_tokens if self.usage_tokens is not None else sum(1 for part in self.parts if part)
        return "".join(self.parts), tokens


def _may_carry(data: bytes) -> bool:
    """Whether an event may carry usage or an error (then it is decoded as JSON)."""
    if b'"error"' in data:
        return True
    return b'"usage"' in data and b'"usage":null' not in data and b'"usage": null' not in data


def _first_choice(answer: Any) -> dict[str, Any]:
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not choices or not isinstance(choices[0], dict):
        raise ServerError("the answer has no choices")
    return choices[0]


def _choice_text(choice: Any, api: str, streamed: bool) -> str:
    if not isinstance(choice, dict):
        return ""
    if api == "chat":
        message = choice.get("delta" if streamed else "message") or {}
        content = message.get("content") if isinstance(message, dict) else None
        return content if isinstance(content, str) else ""
    text = choice.get("text")
    return text if isinstance(text, str) else ""
