"""Ollama's native API: the model is pulled before the test, samples go to /api/generate (or
/api/chat) and the answer streams back as NDJSON lines, the first with text being the first
token. Token counts are Ollama's own `eval_count`."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, ClassVar

from mecbench.core.errors import DeadlineExceeded, FailedPrecondition
from sut_agent.external.base import (
    FirstTokenCallback,
    InferenceResult,
    Options,
    ServerError,
    ServerType,
    request_fields,
)
from sut_agent.external.http import HttpClient


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

    def infer(self, payloads: Sequence[bytes], on_first_token: FirstTokenCallback | None) -> InferenceResult:
        outputs: list[bytes] = []
        counts: list[int] = []
        for position, payload in enumerate(payloads):
            body = self.request_body(payload)
            if body.get("stream", True):
                text, tokens = self._streamed(body, position, on_first_token)
            else:
                answer = self._http.json_ok("POST", self._path, body)
                text, tokens = self._text(answer), int(answer.get("eval_count", 0)) if isinstance(answer, dict) else 0
            outputs.append(text.encode())
            counts.append(tokens)
        return InferenceResult(outputs, counts)

    def _streamed(
        self, body: dict[str, Any], position: int, on_first_token: FirstTokenCallback | None
    ) -> tuple[str, int]:
        parts: list[str] = []
        tokens = 0
        for line in self._http.stream_lines(self._path, body):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError:
                raise ServerError(f"POST {self._path}: a streamed line is not JSON: {line[:200]!r}") from None
            if not isinstance(event, dict):
                continue
            if "error" in event:
                raise ServerError(f"POST {self._path}: {event['error']}")
            text = self._text(event)
            if text:
                if not parts and on_first_token is not None:
                    on_first_token(position, text.encode())
                parts.append(text)
            if event.get("done"):
                tokens = int(event.get("eval_count", len(parts)))
                break
        return "".join(parts), tokens

    def _text(self, event: Any) -> str:
        if not isinstance(event, dict):
            return ""
        if self.api == "chat":
            message = event.get("message") or {}
            content = message.get("content") if isinstance(message, dict) else None
            return content if isinstance(content, str) else ""
        response = event.get("response")
        return response if isinstance(response, str) else ""

    def close(self) -> None:
        self._http.close()
