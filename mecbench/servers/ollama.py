"""Ollama's native API: the model is pulled before the test, samples go to /api/generate (or
/api/chat) and the answer streams back as NDJSON lines, the first with text being the first
token. Token counts are Ollama's own `eval_count`."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from mecbench.core.errors import DeadlineExceeded, FailedPrecondition
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


class OllamaServer(ServerType):
    name = "ollama"
    OPTIONS: ClassVar[dict[str, str]] = {
        "api": "generate (POST /api/generate, the default) or chat (POST /api/chat)",
        "num_predict": "tokens to generate per sample (default 128)",
        "stream": "stream tokens, for TTFT and TPOT (default true)",
        "temperature": "sampling temperature (default 0: greedy, repeatable)",
        "pull": "pull the model before the test (default true)",
        "keep_alive": "how long Ollama keeps the model loaded after a request (default 30m)",
    }

    def configure(self, opts: Options) -> None:
        self.api = opts.choice("api", "generate", ("generate", "chat"))
        self.num_predict = opts.integer("num_predict", 128, 1, 1_000_000)
        self.stream = opts.boolean("stream", True)
        self.temperature = opts.number("temperature", 0.0, 0.0, 10.0)
        self.pull = opts.boolean("pull", True)
        self.keep_alive = opts.text("keep_alive", "30m")
        self._path = f"/api/{self.api}"
        self._http = HttpClient(self.endpoint, self.request_timeout_s, self.concurrency)

    def prepare(self, deadline: float) -> None:
        if not self.pull:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded(f"no time left to pull model {self.model!r}")
        status, body = self._http.json(
            "POST", "/api/pull", {"model": self.model, "stream": False}, timeout_s=remaining
        )
        if status != 200 or not isinstance(body, dict) or body.get("status") != "success":
            reason = body.get("error") if isinstance(body, dict) else None
            raise FailedPrecondition(f"Ollama could not pull model {self.model!r}: {reason or f'HTTP {status}'}")

    def warmup_payloads(self) -> list[bytes]:
        return [b"Hello"]

    def request_body(self, payload: bytes) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "stream": self.stream,
            "keep_alive": self.keep_alive,
            "options": {"num_predict": self.num_predict, "temperature": self.temperature},
        }
        fields = request_fields(payload)
        if isinstance(fields, dict):
            body.update(fields)
        elif self.api == "chat":
            body["messages"] = [{"role": "user", "content": fields}]
        else:
            body["prompt"] = fields
        return body

    def http_call(self, payload: bytes) -> HttpCall:
        body = self.request_body(payload)
        return HttpCall("POST", self._path, json.dumps(body).encode(), JSON_HEADERS, bool(body.get("stream", True)))

    def decoder(self) -> OllamaDecoder:
        return OllamaDecoder(self.api, self._path)

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


class OllamaDecoder(AnswerDecoder):
    """NDJSON lines, the last with `"done": true` and Ollama's `eval_count`, or one JSON body."""

    def __init__(self, api: str, path: str) -> None:
        self.api = api
        self.path = path
        self.parts: list[str] = []
        self.tokens: int | None = None
        self.done = False

    def line(self, line: bytes) -> str:
        if not line.strip():
            return ""
        if (b'"done":false' in line or b'"done": false' in line) and b'"error"' not in line:
            # A token line, read without decoding it (see plain_string_field).
            text = plain_string_field(line, b'"content":' if self.api == "chat" else b'"response":')
            if text is not None:
                if text:
                    self.parts.append(text)
                return text
        try:
            event = json.loads(line)
        except ValueError:
            raise ServerError(f"POST {self.path}: a streamed line is not JSON: {line[:200]!r}") from None
        if not isinstance(event, dict):
            return ""
        if "error" in event:
            raise ServerError(f"POST {self.path}: {event['error']}")
        text = self._text(event)
        if text:
            self.parts.append(text)
        if event.get("done"):
            self.tokens = int(event.get("eval_count", len(self.parts)))
            if event.get("prompt_eval_count") is not None:
                self.input_tokens = int(event["prompt_eval_count"])
            self.done = True
        return text

    def whole(self, body: bytes, headers: Mapping[str, str] | None = None) -> None:
        try:
            answer = json.loads(body)
        except ValueError:
            raise ServerError(f"POST {self.path}: the answer is not JSON") from None
        if isinstance(answer, dict) and "error" in answer:
            raise ServerError(f"POST {self.path}: {answer['error']}")
        self.parts.append(self._text(answer))
        self.tokens = int(answer.get("eval_count", 0)) if isinstance(answer, dict) else 0
        if isinstance(answer, dict) and answer.get("prompt_eval_count") is not None:
            self.input_tokens = int(answer["prompt_eval_count"])
        self.done = True

    def result(self) -> tuple[str, int]:
        return "".join(self.parts), self.tokens if self.tokens is not None else len(self.parts)

    def _text(self, event: Any) -> str:
        if not isinstance(event, dict):
            return ""
        if self.api == "chat":
            message = event.get("message") or {}
            content = message.get("content") if isinstance(message, dict) else None
            return content if isinstance(content, str) else ""
        response = event.get("response")
        return response if isinstance(response, str) else ""
