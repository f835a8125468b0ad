"""The interface every SUT backend implements.

A backend is asynchronous: `submit` queues samples and returns at once (it may complete them
inside the call when that costs nothing); the backend later calls the `on_done` callback given
with them, from any thread, with a `Completion` that covers one or more of those samples. Each
sample is completed exactly once, also when the backend is closed (then with an error).

Everything is per batch, not per sample: ids, timings and outputs travel as parallel lists so the
data plane can copy them into a ResponseBatch without a Python loop per sample.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import NamedTuple


class Completion:
    """Finished samples, as parallel lists.

    `outputs` is None when every output is empty and `errors` None when every sample succeeded,
    so the common cases carry no per-sample lists. `batches` is how many backend executions
    (batches run by the model) these samples account for, for the mean batch size.

    Token streaming: `token_counts` gives each sample's output tokens, and a completion with
    `first_tokens` set reports that these samples' first tokens arrived (`outputs` holds them);
    it completes nothing, and the samples' final completion follows later.
    """

    __slots__ = ("batches", "compute_us", "errors", "first_tokens", "outputs", "queue_us", "sample_ids", "token_counts")

    def __init__(
        self,
        sample_ids: list[int],
        queue_us: list[int],
        compute_us: list[int],
        outputs: list[bytes] | None = None,
        errors: list[str] | None = None,
        batches: int = 0,
        token_counts: list[int] | None = None,
        first_tokens: bool = False,
    ) -> None:
        self.sample_ids = sample_ids
        self.queue_us = queue_us
        self.compute_us = compute_us
        self.outputs = outputs
        self.errors = errors
        self.batches = batches
        self.token_counts = token_counts
        self.first_tokens = first_tokens

    def __len__(self) -> int:
        return len(self.sample_ids)

    @classmethod
    def failed(cls, sample_ids: Sequence[int], error: str) -> Completion:
        count = len(sample_ids)
        return cls(list(sample_ids), [0] * count, [0] * count, None, [error] * count, 0)


CompletionCallback = Callable[[Completion], None]


class ServerInfo(NamedTuple):
    """A server process a backend started (pid 0: none), the address it forwards queries to
    ("" for backends that compute in the agent), and where its output begins in the server log."""

    pid: int = 0
    endpoint: str = ""
    log_start: int = 0
    # The external server's type (its protocol), for clients that speak it directly.
    server_type: str = ""


class Backend(ABC):
    """A running model. Created ready to serve by its factory; `close` ends it."""

    name: str = ""

    @abstractmethod
    def submit(
        self,
        sample_ids: Sequence[int],
        indices: Sequence[int],
        payloads: Sequence[bytes],
        on_done: CompletionCallback,
    ) -> None:
        """Queue samples. `payloads` may be empty (the SUT holds the data) or one per sample."""

    @abstractmethod
    def close(self) -> None:
        """Stop serving: queued and running samples complete with an error; later submits fail."""

    def failure(self) -> str | None:
        """Why the backend can no longer serve (its server process died or hangs); None while it
        can. Samples submitted after a failure complete with this error."""
        return None

    def server_info(self) -> ServerInfo:
        """The server process behind this backend, if any."""
        return ServerInfo()

    def server_metrics(self, reset: bool = False) -> dict[str, float]:
        """The server's own metrics (mecbench.servers.metrics), if it has any."""
        return {}


STOPPED_ERROR = "backend stopped"
