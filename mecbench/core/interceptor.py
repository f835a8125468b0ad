"""The one server interceptor every MECBench service installs.

It binds log context (RPC method, and run/experiment/session ids found on the request or in
metadata) into structlog's contextvars, maps domain exceptions to gRPC status codes with
`google.rpc.BadRequest` details for field violations, and turns anything unexpected into
INTERNAL with an incident id instead of a traceback. Given `RpcMetrics`, it also records each
RPC's duration and final status code (a stream's once, when it ends). Given an `Authorizer`, it
asks it about every RPC but health and reflection before the servicer runs, and binds the caller
it names into the log context.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import structlog
from google.protobuf.message import Message
from google.rpc import code_pb2, status_pb2
from grpc_status import rpc_status

from mecbench.core import codec
from mecbench.core.errors import MecbenchError
from mecbench.core.metrics import RpcMetrics

log = structlog.get_logger("mecbench.rpc")

# Request fields (top level or one message down) whose values are bound to the log context.
CONTEXT_FIELDS = ("run_id", "experiment_id", "session_id", "sut_id", "owner", "node")
# Metadata keys a caller may set to carry context across services.
CONTEXT_METADATA = {"x-mecbench-run-id": "run_id", "x-mecbench-experiment-id": "experiment_id"}
# Always open to whoever got through the transport (probes, grpcurl): orchestrators probe
# without tokens, and they reveal only serving status and the (public) service schemas.
OPEN_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

# Decides whether an RPC (its full method name, its context: metadata, peer certificate) may go
# ahead: returns who the caller is, for the logs (None: nobody in particular), or raises
# Unauthenticated / PermissionDenied.
Authorizer = Callable[[str, grpc.ServicerContext], str | None]


def _context_from(request: Any, metadata: tuple[tuple[str, str | bytes], ...]) -> dict[str, str]:
    found: dict[str, str] = {}
    for key, value in metadata:
        name = CONTEXT_METADATA.get(key)
        if name and isinstance(value, str):
            found[name] = value
    if isinstance(request, Message):
        candidates: list[Message] = [request]
        for field, value in request.ListFields():
            if field.message_type is not None and isinstance(value, Message):
                candidates.append(value)
        for message in candidates:
            for name in CONTEXT_FIELDS:
                if name in message.DESCRIPTOR.fields_by_name:
                    value = getattr(message, name)
                    if isinstance(value, str) and value:
                        found.setdefault(name, value)
    return found


def _abort(context: grpc.ServicerContext, exc: BaseException, method: str) -> None:
    if isinstance(exc, MecbenchError):
        log.info("rpc_error", method=method, code=exc.code.name, error=str(exc))
        context.abort_with_status(rpc_status.to_status(codec.encode(exc)))
    incident = uuid.uuid4().hex[:12]
    log.error("rpc_internal_error", method=method, incident=incident, exc_info=exc)
    context.abort_with_status(
        rpc_status.to_status(
            status_pb2.Status(code=code_pb2.INTERNAL, message=f"internal error (incident {incident})")
        )
    )


class ErrorMappingInterceptor(grpc.ServerInterceptor):
    """Maps exceptions to status codes, binds log context and records RPC metrics for every RPC
    shape."""

    def __init__(self, metrics: RpcMetrics | None = None, authorizer: Authorizer | None = None) -> None:
        self._metrics = metrics
        self._authorizer = authorizer

    def _authorize(self, method: str, context: grpc.ServicerContext) -> str | None:
        if self._authorizer is None or method.startswith(OPEN_METHOD_PREFIXES):
            return None
        return self._authorizer(method, context)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        metadata = tuple(handler_call_details.invocation_metadata or ())

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method, metadata),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method, metadata),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, method, metadata),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(handler.stream_stream, method, metadata),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _wrap_unary(
        self,
        behavior: Callable[[Any, grpc.ServicerContext], Any],
        method: str,
        metadata: tuple[tuple[str, str | bytes], ...],
    ) -> Callable[[Any, grpc.ServicerContext], Any]:
        metrics = self._metrics

        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            with structlog.contextvars.bound_contextvars(rpc=method, **_context_from(request, metadata)):
                try:
                    caller = self._authorize(method, context)
                    if caller is None:
                        return behavior(request, context)
                    with structlog.contextvars.bound_contextvars(caller=caller):
                        return behavior(request, context)
                except Exception as exc:
                    if _is_abort(exc, context):
                        raise
                    _abort(context, exc, method)
                    raise  # unreachable: abort raises
                finally:
                    if metrics is not None:
                        metrics.observe(method, _final_code(context), time.perf_counter() - started)

        return wrapped

    def _wrap_stream(
        self,
        behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]],
        method: str,
        metadata: tuple[tuple[str, str | bytes], ...],
    ) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
        metrics = self._metrics

        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            started = time.perf_counter()
            with structlog.contextvars.bound_contextvars(rpc=method, **_context_from(request, metadata)):
                try:
                    caller = self._authorize(method, context)
                    if caller is None:
                        yield from behavior(request, context)
                    else:
                        with structlog.contextvars.bound_contextvars(caller=caller):
                            yield from behavior(request, context)
                except Exception as exc:
                    if _is_abort(exc, context):
                        raise
                    _abort(context, exc, method)
                    raise
                finally:
                    # Also reached when a cancelled stream's generator is closed (GeneratorExit).
                    if metrics is not None:
                        metrics.observe(method, _final_code(context), time.perf_counter() - started)

        return wrapped


def _final_code(context: grpc.ServicerContext) -> str:
    """The status the RPC ends with, as its name. An abort or `set_code` leaves it on the context;
    otherwise a call still active is about to end OK, and one that is not was cancelled by its
    caller or its deadline (the server side never learns which)."""
    code = getattr(context, "code", lambda: None)()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if code is not None:
        return str(code)
    return "OK" if context.is_active() else "CANCELLED"


def _is_abort(exc: Exception, context: grpc.ServicerContext) -> bool:
    """True when the servicer already aborted the RPC itself (context.abort raises)."""
    # context.abort() sets the code on the context before it raises, so the code says it.
    code = getattr(context, "code", lambda: None)()
    return code is not None and code != grpc.StatusCode.OK
