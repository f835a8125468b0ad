"""The ONNX Runtime backend: a real model run inside the SUT agent.

Samples queue in arrival order; each of `max_concurrency` worker threads takes up to
`max_batch_size` queued samples at once, stacks their payloads into one array and runs the
session (ONNX Runtime releases the GIL while it computes, and one session is safe to run from
several threads). Each sample's output is its row of the model's first output.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from mecbench.core.errors import InvalidArgument, Violations
from mecbench.core.logging import get_logger
from mecbench.v1 import common_pb2, sut_agent_pb2
from sut_agent.backends.base import STOPPED_ERROR, Backend, Completion, CompletionCallback

log = get_logger("sut_agent.onnx")

FIELD = "config.onnxruntime"

# ONNX tensor element types (as onnxruntime names them) and the DataType each one is.
_ORT_TYPES: dict[str, common_pb2.DataType.ValueType] = {
    "tensor(float)": common_pb2.DATA_TYPE_FLOAT32,
    "tensor(float16)": common_pb2.DATA_TYPE_FLOAT16,
    "tensor(int64)": common_pb2.DATA_TYPE_INT64,
    "tensor(int32)": common_pb2.DATA_TYPE_INT32,
    "tensor(uint8)": common_pb2.DATA_TYPE_UINT8,
}
_NUMPY_TYPES: dict[common_pb2.DataType.ValueType, type[np.generic]] = {
    common_pb2.DATA_TYPE_FLOAT32: np.float32,
    common_pb2.DATA_TYPE_FLOAT16: np.float16,
    common_pb2.DATA_TYPE_INT64: np.int64,
    common_pb2.DATA_TYPE_INT32: np.int32,
    common_pb2.DATA_TYPE_UINT8: np.uint8,
}


class _Chunk:
    __slots__ = ("arrival_ns", "callback", "ids", "payloads", "position")

    def __init__(self, ids: list[int], payloads: list[bytes], callback: CompletionCallback, arrival_ns: int) -> None:
        self.ids = ids
        self.payloads = payloads
        self.callback = callback
        self.arrival_ns = arrival_ns
        self.position = 0


def _load_session(config: sut_agent_pb2.OnnxRuntimeBackendConfig, path: Path) -> ort.InferenceSession:
    providers = list(config.providers) or ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    unknown = [p for p in providers if p not in available]
    if unknown:
        raise InvalidArgument(
            f"not available here: {', '.join(unknown)} (available: {', '.join(available)})", field=f"{FIELD}.providers"
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.intra_op_threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - any load failure means the file is not a usable model
        raise InvalidArgument(f"cannot load {path}: {exc}", field=f"{FIELD}.model_path") from None


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, config: sut_agent_pb2.OnnxRuntimeBackendConfig, model_dir: Path = Path(".")) -> None:
        path = Path(config.model_path)
        if not path.is_absolute():
            path = model_dir / path
        if not path.is_file():
            raise InvalidArgument(f"no such file: {path}", field=f"{FIELD}.model_path")
        self._session = _load_session(config, path)
        self._input_name, self._sample_shape, dtype, fixed_batch = self._check_input(config)
        self._dtype = np.dtype(dtype)
        self._sample_bytes = int(np.prod(self._sample_shape, dtype=np.int64)) * self._dtype.itemsize
        self._output_name = self._session.get_outputs()[0].name
        self._batch_size = 1 if fixed_batch else max(1, config.max_batch_size)
        self._cond = threading.Condition()
        self._queue: deque[_Chunk] = deque()
        self._closed = False
        self._workers = [
            threading.Thread(target=self._work, name=f"onnx-worker-{i}", daemon=True)
            for i in range(max(1, config.max_concurrency))
        ]
        for worker in self._workers:
            worker.start()
        log.info("onnx_model_loaded", path=str(path), input=self._input_name, shape=self._sample_shape)

    def _check_input(
        self, config: sut_agent_pb2.OnnxRuntimeBackendConfig
    ) -> tuple[str, tuple[int, ...], type[np.generic], bool]:
        """The input to feed, one sample's shape, its numpy type, and whether the batch is fixed at 1."""
        violations = Violations()
        inputs = {i.name: i for i in self._session.get_inputs()}
        name = config.input_name or next(iter(inputs))
        if name not in inputs:
            violations.add(f"{FIELD}.input_name", f"the model has no input {name!r} (inputs: {', '.join(inputs)})")
            violations.raise_if_any()
        model_input = inputs[name]
        model_type = _ORT_TYPES.get(model_input.type)
        data_type = config.data_type or model_type
        if model_type is None:
            violations.add(f"{FIELD}.input_name", f"input {name!r} has unsupported type {model_input.type}")
        elif data_type != model_type:
            wanted, actual = common_pb2.DataType.Name(config.data_type), common_pb2.DataType.Name(model_type)
            violations.add(f"{FIELD}.data_type", f"input {name!r} is {actual}, not {wanted}")
        model_shape: list[Any] = list(model_input.shape)
        fixed_batch = False
        sample_shape = tuple(config.sample_shape)
        if not model_shape:
            violations.add(f"{FIELD}.input_name", f"input {name!r} is a scalar: it needs a batch dimension")
        else:
            batch_dim, model_sample = model_shape[0], model_shape[1:]
            if isinstance(batch_dim, int) and batch_dim > 1:
                violations.add(f"{FIELD}.sample_shape", f"input {name!r} has a fixed batch dimension of {batch_dim}")
            fixed_batch = batch_dim == 1
            if not sample_shape:
                if all(isinstance(d, int) and d > 0 for d in model_sample):
                    sample_shape = tuple(model_sample)
                else:
                    violations.add(
                        f"{FIELD}.sample_shape",
                        f"input {name!r} has symbolic dimensions {model_sample}: set sample_shape",
                    )
            elif len(sample_shape) != len(model_sample) or any(
                isinstance(m, int) and m > 0 and m != s for m, s in zip(model_sample, sample_shape, strict=False)
            ):
                violations.add(
                    f"{FIELD}.sample_shape",
                    f"{list(sample_shape)} does not fit input {name!r} of shape {model_shape} (batch dimension first)",
                )
        violations.raise_if_any()
        assert data_type is not None
        return name, sample_shape, _NUMPY_TYPES[data_type], fixed_batch

    def submit(
        self,
        sample_ids: Sequence[int],
        indices: Sequence[int],
        payloads: Sequence[bytes],
        on_done: CompletionCallback,
    ) -> None:
        if not sample_ids:
            return
        if not payloads:
            on_done(Completion.failed(sample_ids, "no payload: the onnxruntime backend needs the sample data"))
            return
        chunk = _Chunk(list(sample_ids), list(payloads), on_done, time.perf_counter_ns())
        with self._cond:
            if not self._closed:
                self._queue.append(chunk)
                self._cond.notify()
                return
        on_done(Completion.failed(sample_ids, STOPPED_ERROR))

    def _take(self) -> list[tuple[_Chunk, list[int], list[bytes]]] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            taken: list[tuple[_Chunk, list[int], list[bytes]]] = []
            count = 0
            queue = self._queue
            while queue and count < self._batch_size:
                chunk = queue[0]
                start = chunk.position
                end = min(len(chunk.ids), start + self._batch_size - count)
                taken.append((chunk, chunk.ids[start:end], chunk.payloads[start:end]))
                count += end - start
                chunk.position = end
                if end >= len(chunk.ids):
                    queue.popleft()
            if queue:
                self._cond.notify()  # more for another worker
            return taken

    def _work(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                return
            try:
                self._run(taken)
            except Exception:
                log.exception("onnx_batch_failed")

    def _run(self, taken: list[tuple[_Chunk, list[int], list[bytes]]]) -> None:
        started = time.perf_counter_ns()
        size = self._sample_bytes
        good: list[tuple[_Chunk, list[int]]] = []
        data: list[bytes] = []
        for chunk, ids, payloads in taken:
            if all(len(p) == size for p in payloads):
                good.append((chunk, ids))
                data += payloads
                continue
            ok_ids = [i for i, p in zip(ids, payloads, strict=True) if len(p) == size]
            bad_ids = [i for i, p in zip(ids, payloads, strict=True) if len(p) != size]
            reason = f"payload is not {size} bytes ({self._sample_shape}, {self._dtype})"
            chunk.callback(Completion.failed(bad_ids, reason))
            if ok_ids:
                good.append((chunk, ok_ids))
                data += [p for p in payloads if len(p) == size]
        count = len(data)
        if not count:
            return
        outputs: list[bytes] | None = None
        error = ""
        compute_ns = 0
        try:
            batch = np.frombuffer(b"".join(data), dtype=self._dtype).reshape(count, *self._sample_shape)
            begin = time.perf_counter_ns()
            result = self._session.run([self._output_name], {self._input_name: batch})[0]
            compute_ns = time.perf_counter_ns() - begin
            result = np.ascontiguousarray(result)
            if result.ndim == 0 or result.shape[0] != count:
                error = f"output {self._output_name!r} has shape {list(result.shape)}, not one row per sample"
            else:
                raw = result.tobytes()
                row = len(raw) // count
                outputs = [raw[i * row : (i + 1) * row] for i in range(count)]
        except Exception as exc:  # noqa: BLE001 - reported per sample, the backend keeps serving
            error = f"inference failed: {exc}"[:500]
        compute_us = compute_ns // 1000
        offset = 0
        for position, (chunk, ids) in enumerate(good):
            n = len(ids)
            queue_us = [(started - chunk.arrival_ns) // 1000] * n
            batches = 1 if position == 0 else 0
            if outputs is None:
                completion = Completion(ids, queue_us, [compute_us] * n, None, [error] * n, batches)
            else:
                completion = Completion(ids, queue_us, [compute_us] * n, outputs[offset : offset + n], None, batches)
            offset += n
            chunk.callback(completion)

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            queued = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for chunk in queued:
            chunk.callback(Completion.failed(chunk.ids[chunk.position :], STOPPED_ERROR))
        for worker in self._workers:
            if worker is not threading.current_thread():
                worker.join(timeout=10)
