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
from collections.abc import Sequence
from typing import Any, ClassVar

from mecbench.core.errors import FailedPrecondition
from sut_agent.external.base import (
    FirstTokenCallback,
    InferenceResult,
    Options,
    ServerError,
    ServerType,
    request_fields,
)
from sut_agent.external.http import HttpClient


class OpenAIServer(ServerType):
    name = "openai"
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

    def infer(self, payloads: Sequence[bytes], on_first_token: FirstTokenCallback | None) -> InferenceResult:
        outputs: list[bytes] = []
        counts: list[int] = []
        for position, payload in enumerate(payloads):
            body = self.request_body(payload)
            if self.stream:
                text, tokens = self._streamed(body, position, on_first_token)
            else:
                text, tokens = self._whole(body)
            outputs.append(text.encode())
            counts.append(tokens)
        return InferenceResult(outputs, counts)

    def _whole(self, body: dict[str, Any]) -> tuple[str, int]:
        answer = self._http.json_ok("POST", self._path, body)
        choice = _first_choice(answer)
        text = _choice_text(choice, self.api, streamed=False)
        usage = answer.get("usage") if isinstance(answer, dict) else None
        tokens = int(usage.get("completion_tokens", 0)) if isinstance(usage, dict) else 0
        return text, tokens

    def _streamed(
        self, body: dict[str, Any], position: int, on_first_token: FirstTokenCallback | None
    ) -> tuple[str, int]:
        parts: list[str] = []
        chunks_with_text = 0
        usage_tokens: int | None = None
        for line in self._http.stream_lines(self._path, body):
            if not line.startswith(b"data:"):
                continue  # blank separators, comments (": ping"), event names
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            try:
                event = json.loads(data)
            except ValueError:
                raise ServerError(f"POST {self._path}: a streamed event is not JSON: {data[:200]!r}") from None
            if isinstance(event, dict) and "error" in event:
                raise ServerError(f"POST {self._path}: {event['error']}")
            usage = event.get("usage") if isinstance(event, dict) else None
            if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                usage_tokens = int(usage["completion_tokens"])
            choices = event.get("choices") if isinstance(event, dict) else None
            if not choices:
                continue
            text = _choice_text(choices[0], self.api, streamed=True)
            if text:
                if not parts and on_first_token is not None:
                    on_first_token(position, text.encode())
                parts.append(text)
                chunks_with_text += 1
        return "".join(parts), usage_tokens if usage_tokens is not None else chunks_with_text

    def close(self) -> None:
        self._http.close()


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
