"""What a server type is: one class, in two halves.

What a client needs (used by the LoadGen side's direct client and by the SUT agent's relay
alike, without I/O of its own): `http_call` builds the request for one sample as the server's
protocol has it, and an `AnswerDecoder` reads the answer, streamed line by line (SSE, NDJSON) or
whole, into the generated text and its token count; a streamed answer's first text is the
sample's first token (TTFT).

What managing a server needs (the SUT agent): options checked at construction (unknown or
malformed ones are InvalidArgument under `config.external.options.<key>`), `prepare` (load, pull,
wait for the model), `warmup_payloads`, and `infer` for one request's samples, blocking, called
from the external backend's worker threads (so thread-safe), reporting first tokens through
`on_first_token` as they arrive.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from mecbench.core.errors import Violations

FirstTokenCallback = Callable[[int, bytes], None]
"""Called with a sample's position in the request and its first output token."""


@dataclass
class InferenceResult:
    """One output per sample of the request, and each sample's output tokens for generation."""

    outputs: list[bytes]
    token_counts: list[int] | None = None


class ServerError(Exception):
    """The server answered a request with an error, or could not be reached."""


@dataclass(frozen=True)
class HttpCall:
    """One request in the server's own protocol: what a client sends for one sample."""

    method: str
    # Under the endpoint's URL (its path prefix included by the client).
    path: str
    body: bytes
    headers: Mapping[str, str]
    # The answer streams lines (SSE or NDJSON) rather than coming whole.
    streamed: bool


@dataclass(frozen=True)
class GrpcCall:
    """One unary gRPC call in the server's own protocol: the method's full name and the
    serialized request (the answer is decoded from its serialized bytes)."""

    method: str
    body: bytes


class AnswerDecoder(ABC):
    """Reads one answer without doing I/O: `line` for each line of a streamed answer (returns the
    text it carries, "" for none; sets `done` at the protocol's end marker), or `whole` for a
    complete body; then `result`. Raises ServerError for an error the answer carries."""

    done: bool = False
    # Prompt tokens as the server counted them, when its answer says (OpenAI usage, Ollama).
    input_tokens: int | None = None

    @abstractmethod
    def line(self, line: bytes) -> str:
        """The text of one streamed line."""

    @abstractmethod
    def whole(self, body: bytes, headers: Mapping[str, str] | None = None) -> None:
        """A complete (not streamed) answer body, and its response headers."""

    @abstractmethod
    def result(self) -> tuple[str, int]:
        """The generated text and its token count (the server's, else one per text event)."""

    def output(self) -> bytes:
        """What LoadGen gets back for the sample: the text as UTF-8 (tensor protocols: bytes)."""
        return self.result()[0].encode()


class Options:
    """Typed reads of a server type's string options; every problem is collected with its field
    path and raised at once by `check`."""

    def __init__(self, values: Mapping[str, str], known: Mapping[str, str], field: str) -> None:
        self._values = dict(values)
        self._field = field
        self.violations = Violations()
        for key in sorted(set(self._values) - set(known)):
            self.violations.add(f"{field}.{key}", f"unknown option; known: {', '.join(sorted(known)) or 'none'}")

    def text(self, key: str, default: str = "") -> str:
        return self._values.get(key, default)

    def choice(self, key: str, default: str, choices: Sequence[str]) -> str:
        value = self._values.get(key, default)
        if value not in choices:
            self.violations.add(f"{self._field}.{key}", f"must be one of {', '.join(choices)}")
            return default
        return value

    def integer(self, key: str, default: int, low: int = 0, high: int = 2**31) -> int:
        raw = self._values.get(key)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            self.violations.add(f"{self._field}.{key}", "must be an integer")
            return default
        if not low <= value <= high:
            self.violations.add(f"{self._field}.{key}", f"must be in [{low}, {high}]")
            return default
        return value

    def number(self, key: str, default: float, low: float = 0.0, high: float = 1e9) -> float:
        raw = self._values.get(key)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            self.violations.add(f"{self._field}.{key}", "must be a number")
            return default
        if not low <= value <= high:
            self.violations.add(f"{self._field}.{key}", f"must be in [{low}, {high}]")
            return default
        return value

    def boolean(self, key: str, default: bool) -> bool:
        raw = self._values.get(key)
        if raw is None:
            return default
        lowered = raw.strip().lower()
        if lowered in {"true", "1", "yes", "on"}:
            return True
        if lowered in {"false", "0", "no", "off"}:
            return False
        self.violations.add(f"{self._field}.{key}", "must be true or false")
        return default

    def integers(self, key: str) -> list[int] | None:
        """A comma-separated list of integers ("3,224,224"), or None when not set."""
        raw = self._values.get(key)
        if raw is None:
            return None
        try:
            return [int(part) for part in raw.split(",") if part.strip()]
        except ValueError:
            self.violations.add(f"{self._field}.{key}", "must be comma-separated integers")
            return None

    def check(self) -> None:
        self.violations.raise_if_any()


def request_fields(payload: bytes) -> dict[str, Any] | str:
    """A text-generation sample: a JSON object of request fields, or else the prompt text."""
    text = payload.decode("utf-8", "replace")
    if text.lstrip().startswith("{"):
        try:
            decoded = json.loads(text)
        except ValueError:
            return text
        if isinstance(decoded, dict):
            return decoded
    return text


def plain_string_field(data: bytes, key: bytes) -> str | None:
    """The value of the JSON object key `key` (given quoted with its colon: b'"content":') in the
    JSON text `data`, read without decoding the JSON, when that is sure to give what a JSON
    decoder gives: the key occurs once and its value is a string without escapes. None when
    unsure (the key is missing or repeated, the value is not a string or has escapes); the caller
    then decodes the JSON. (In valid JSON, `"name":` with both quotes unescaped is always a key: a
    quote inside a string is escaped. A raw control character, which a strict decoder refuses in
    a string, is taken as it is.) A stream's per-token events are read this way: a JSON decoding
    per event cost the direct client about a sixth of its time per request.)"""
    at = data.find(key)
    if at < 0:
        return None
    start = at + len(key)
    if data.find(key, start) >= 0:
        return None
    while data[start : start + 1] in (b" ", b"\t"):
        start += 1
    if data[start : start + 1] != b'"':
        return None
    end = data.find(b'"', start + 1)
    if end < 0:
        return None
    value = data[start + 1 : end]
    if b"\\" in value:
        return None
    try:
        return value.decode()
    except UnicodeDecodeError:
        return None


class ServerType(ABC):
    """A kind of inference server: its protocol adapter and model preparation.

    Subclasses set `name` (the `config.external.server_type` that selects them) and `OPTIONS`
    (option name -> what it does; anything else is refused), and read their options in
    `configure`; every problem found there is raised at once, before anything connects.
    """

    name: ClassVar[str] = ""
    OPTIONS: ClassVar[dict[str, str]] = {}
    # Where the server publishes its Prometheus metrics under its endpoint ("" = nowhere known);
    # the SUT agent scrapes it into SutStats.server_metrics when it answers.
    metrics_path: ClassVar[str] = ""

    def __init__(
        self, endpoint: str, model: str, options: Mapping[str, str], request_timeout_s: float, concurrency: int,
        field: str = "config.external.options",
    ) -> None:
        self.endpoint = endpoint
        self.model = model
        self.request_timeout_s = request_timeout_s
        self.concurrency = concurrency
        self.field = field
        self.options = Options(options, self.OPTIONS, field)
        self.configure(self.options)
        self.options.check()

    def configure(self, options: Options) -> None:  # noqa: B027 - optional hook
        """Read the options (problems go to `options.violations`) and set up the client."""

    # --- what a client needs -------------------------------------------------------------

    def http_call(self, payload: bytes) -> HttpCall | None:
        """The HTTP request for one sample, or None when this server type has no HTTP client
        half (then only the SUT agent's relay, through `infer`, reaches the server)."""
        return None

    def grpc_call(self, payload: bytes) -> GrpcCall | None:
        """The gRPC call for one sample, for server types that speak gRPC; None otherwise."""
        return None

    def decoder(self) -> AnswerDecoder:
        """A fresh decoder for the answer to one `http_call`."""
        raise NotImplementedError(f"server type {self.name!r} has no answer decoder")

    def prepare_client(self, deadline: float) -> None:  # noqa: B027 - optional hook
        """What a client must learn from the (prepared) server before its first `http_call`, by
        `deadline` (time.monotonic()); e.g. KServe: the model's metadata. Changes nothing there."""

    # --- what managing a server needs ------------------------------------------------------

    def prepare(self, deadline: float) -> None:  # noqa: B027 - optional hook
        """Make the model ready on the server (load it, pull it, wait for it) before
        `deadline` (time.monotonic()); FailedPrecondition or DeadlineExceeded when it cannot."""

    @abstractmethod
    def warmup_payloads(self) -> list[bytes]:
        """One sample the server accepts, built without the dataset, for warm-up requests."""

    @abstractmethod
    def infer(self, payloads: Sequence[bytes], on_first_token: FirstTokenCallback | None) -> InferenceResult:
        """Send one request for these samples and wait for its answer; ServerError on failure."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
