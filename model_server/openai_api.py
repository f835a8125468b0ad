"""The OpenAI-compatible API as vLLM serves it: models, completions and chat completions, with
server-sent-event streaming (one event per generated token, `data: [DONE]` last).

Decoding is always greedy: temperature, top_p and stop are accepted and ignored. `ignore_eos`
(a vLLM extension) generates up to max_tokens whatever the model says.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from model_server.models import Generation, LanguageModel, ModelNotFoundError, ModelRepository
from model_server.routing import (
    InvalidJson,
    Request,
    Response,
    Route,
    RouteResult,
    StreamingResponse,
    dump_json,
    json_object,
    json_response,
)

COMPLETIONS_DEFAULT_MAX_TOKENS = 16
EVENT_STREAM = "text/event-stream"
DONE_EVENT = b"data: [DONE]\n\n"
OWNER = "mecbench"


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        error_type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type

    def response(self) -> Response:
        body = {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}
        return json_response(body, status=self.status)


def routes(repository: ModelRepository) -> list[Route]:
    api = OpenAIApi(repository)
    return [
        Route("GET", r"/v1/models", api.list_models),
        Route("GET", r"/v1/models/(?P<name>.+)", api.retrieve_model),
        Route("POST", r"/v1/completions", api.completions),
        Route("POST", r"/v1/chat/completions", api.chat_completions),
    ]


@dataclass(frozen=True)
class _Completion:
    """What both endpoints take from a request once it is validated."""

    model: LanguageModel
    prompt_ids: list[int]
    max_tokens: int
    stream: bool
    include_usage: bool
    ignore_eos: bool


def sse(payload: Any) -> bytes:
    return b"data: " + dump_json(payload) + b"\n\n"


def usage(generation: Generation) -> dict[str, int]:
    return {
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.completion_tokens,
        "total_tokens": generation.prompt_tokens + generation.completion_tokens,
    }


class OpenAIApi:
    def __init__(self, repository: ModelRepository) -> None:
        self.repository = repository

    def _model_card(self, model: LanguageModel) -> dict[str, Any]:
        return {"id": model.name, "object": "model", "created": int(model.modified_at.timestamp()), "owned_by": OWNER}

    def list_models(self, _request: Request) -> Response:
        return json_response(
            {"object": "list", "data": [self._model_card(model) for model in self.repository.language_models()]}
        )

    def retrieve_model(self, request: Request) -> Response:
        try:
            return json_response(self._model_card(self._lookup(request.params["name"])))
        except OpenAIError as exc:
            return exc.response()

    def _lookup(self, name: Any) -> LanguageModel:
        if not isinstance(name, str) or not name:
            raise OpenAIError(400, "you must provide a model parameter", param="model")
        try:
            return self.repository.language_model(name)
        except ModelNotFoundError:
            raise OpenAIError(
                404, f"The model `{name}` does not exist.", param="model", code="model_not_found"
            ) from None

    def _parse(self, request: Request, prompt_key: str) -> _Completion:
        try:
            body = json_object(request.body)
        except InvalidJson as exc:
            raise OpenAIError(400, f"We could not parse the JSON body of your request: {exc}") from None
        model = self._lookup(body.get("model"))
        prompt_ids = _prompt_ids(body) if prompt_key == "prompt" else _chat_prompt_ids(body)
        n = body.get("n", 1)
        if n != 1:
            raise OpenAIError(400, "only n=1 is supported: decoding is greedy", param="n")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise OpenAIError(400, "stream must be a boolean", param="stream")
        stream_options = body.get("stream_options") or {}
        if not isinstance(stream_options, dict):
            raise OpenAIError(400, "stream_options must be an object", param="stream_options")
        max_tokens = _max_tokens(body, model, len(prompt_ids), chat=prompt_key == "messages")
        return _Completion(
            model=model,
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            stream=stream,
            include_usage=stream_options.get("include_usage") is True,
            ignore_eos=body.get("ignore_eos") is True,
        )

    def completions(self, request: Request) -> RouteResult:
        try:
            completion = self._parse(request, "prompt")
        except OpenAIError as exc:
            return exc.response()
        generation = completion.model.generate(completion.prompt_ids, completion.max_tokens, completion.ignore_eos)
        envelope = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": completion.model.name,
        }
        if completion.stream:
            return StreamingResponse(
                _completion_events(generation, envelope, completion.include_usage), content_type=EVENT_STREAM
            )
        text = generation.run_to_end()
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": generation.finish_reason}
        return json_response({**envelope, "choices": [choice], "usage": usage(generation)})

    def chat_completions(self, request: Request) -> RouteResult:
        try:
            completion = self._parse(request, "messages")
        except OpenAIError as exc:
            return exc.response()
        generation = completion.model.generate(completion.prompt_ids, completion.max_tokens, completion.ignore_eos)
        envelope = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": completion.model.name}
        if completion.stream:
            return StreamingResponse(
                _chat_events(generation, {**envelope, "object": "chat.completion.chunk"}, completion.include_usage),
                content_type=EVENT_STREAM,
            )
        text = generation.run_to_end()
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": generation.finish_reason,
        }
        return json_response({**envelope, "object": "chat.completion", "choices": [choice], "usage": usage(generation)})


def _completion_events(generation: Generation, envelope: dict[str, Any], include_usage: bool) -> Iterator[bytes]:
    # With include_usage every chunk carries "usage": null but the last, as OpenAI sends them.
    extra = {"usage": None} if include_usage else {}
    for text in generation:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": None}
        yield sse({**envelope, "choices": [choice], **extra})
    final = {"index": 0, "text": "", "logprobs": None, "finish_reason": generation.finish_reason}
    yield sse({**envelope, "choices": [final], **extra})
    if include_usage:
        yield sse({**envelope, "choices": [], "usage": usage(generation)})
    yield DONE_EVENT


def _chat_events(generation: Generation, envelope: dict[str, Any], include_usage: bool) -> Iterator[bytes]:
    extra = {"usage": None} if include_usage else {}
    # The first chunk names the role before any content, as OpenAI's does.
    role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    yield sse({**envelope, "choices": [role], **extra})
    for text in generation:
        choice = {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
        yield sse({**envelope, "choices": [choice], **extra})
    final = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": generation.finish_reason}
    yield sse({**envelope, "choices": [final], **extra})
    if include_usage:
        yield sse({**envelope, "choices": [], "usage": usage(generation)})
    yield DONE_EVENT


def _token_ids(value: Any) -> list[int] | None:
    """A prompt given as token ids (here, bytes), or None when it is not a list of ids."""
    if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        if any(not 0 <= t < 256 for t in value):
            raise OpenAIError(400, "token ids must be in 0..255 (bytes)", param="prompt")
        return list(value)
    return None


def _prompt_ids(body: dict[str, Any]) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return LanguageModel.encode(prompt)
    ids = _token_ids(prompt)
    if ids is not None:
        return ids
    if isinstance(prompt, list) and len(prompt) == 1:
        if isinstance(prompt[0], str):
            return LanguageModel.encode(prompt[0])
        ids = _token_ids(prompt[0])
        if ids is not None:
            return ids
    if isinstance(prompt, list) and len(prompt) > 1:
        raise OpenAIError(400, "only one prompt per request is supported", param="prompt")
    raise OpenAIError(400, "prompt must be a string, a list of one string, or token ids", param="prompt")


def _chat_prompt_ids(body: dict[str, Any]) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise OpenAIError(400, "messages must be a non-empty list", param="messages")
    parts: list[str] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise OpenAIError(400, f"messages[{index}] must be an object with a role", param="messages")
        content = message.get("content")
        if content is None:
            continue
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            # Content parts: only text has a meaning to a byte-level model.
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise OpenAIError(
                        400, f"messages[{index}]: only text content parts are supported", param="messages"
                    )
                parts.append(part["text"])
        else:
            raise OpenAIError(400, f"messages[{index}].content must be a string or a list of parts", param="messages")
    return LanguageModel.encode("".join(parts))


def _max_tokens(body: dict[str, Any], model: LanguageModel, prompt_tokens: int, chat: bool) -> int:
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(key)
    room = model.context_length - prompt_tokens
    if value is None:
        # Completions default to 16 tokens; chat, as vLLM, to whatever the context leaves.
        value = min(COMPLETIONS_DEFAULT_MAX_TOKENS, room) if not chat else room
        if value < 1:
            raise _context_error(model, prompt_tokens, 1)
        return int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise OpenAIError(400, f"{key} must be an integer of at least 1", param=key)
    if value > room:
        raise _context_error(model, prompt_tokens, value)
    return value


def _context_error(model: LanguageModel, prompt_tokens: int, max_tokens: int) -> OpenAIError:
    return OpenAIError(
        400,
        f"This model's maximum context length is {model.context_length} tokens. However, you requested "
        f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the completion). "
        "Please reduce the length of the messages or completion.",
        param="max_tokens",
    )
