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


class Completion:
    """Finished samples, as parallel lists.

    `outputs` is None when every output is empty and `errors` None when every sample succeeded,
    so the common cases carry no per-sample lists. `batches` is how many backend executions
    (batches run by the model) these samples account for, for the mean batch size.
    """

    __slots__ = ("batches", "compute_us", "errors", "outputs", "queue_us", "sample_ids")

    def __init__(
        self,
        sample_ids: list[int],
        queue_us: list[int],
        compute_us: list[int],
        outputs: list[bytes] | None = None,
        errors: list[str] | None = None,
        batches: int = 0,
    ) -> None:
        self.sample_ids = sample_ids
        self.queue_us = queue_us
        self.compute_us = compute_us
        self.outputs = outputs
        self.errors = errors
        self.batches = batches

    def __len__(self) -> int:
        return len(self.sample_ids)

    @classmethod
    def failed(cls, sample_ids: Sequence[int], error: str) -> Completion:
        count = len(sample_ids)
        return cls(list(sample_ids), [0] * count, [0] * count, None, [error] * count, 0)


CompletionCallback = Callable[[Completion], None]


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


STOPPED_ERROR = "backend stopped"
