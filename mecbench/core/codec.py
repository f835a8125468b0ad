"""The one codec between domain errors and gRPC statuses.

Servers encode (`encode`, used by the interceptor): the status code of the domain error, its
message, and an INVALID_ARGUMENT's field violations as a `google.rpc.BadRequest` detail.
Everything that calls a service decodes with the same functions: the controller's agent clients
(`decode`: a domain error naming the agent, its code and field violations kept), the SDK (its
typed errors read `field_violations`) and the tests.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from mecbench.core.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    MecbenchError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)

# The domain error a status code decodes to, so a caller catches `Unavailable` (say) whether it
# was raised here or by a service it called. Codes without a class of their own decode to
# MecbenchError carrying the code.
_ERRORS: dict[grpc.StatusCode, type[MecbenchError]] = {
    error.code: error
    for error in (AlreadyExists, Cancelled, DeadlineExceeded, FailedPrecondition, NotFound, PermissionDenied,
                  ResourceExhausted, Unauthenticated, Unavailable, Unimplemented)
}


def encode(exc: MecbenchError) -> status_pb2.Status:
    """The rich status a server answers a domain error with."""
    status = status_pb2.Status(code=exc.code.value[0], message=str(exc))
    if isinstance(exc, InvalidArgument):
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in exc.violations
            ]
        )
        detail = any_pb2.Any()
        detail.Pack(bad_request)
        status.details.append(detail)
    return status


def field_violations(error: grpc.RpcError) -> list[FieldViolation]:
    """The BadRequest field violations a failed call carries, in the server's order; none when
    its status has no such detail or cannot be trusted (a status that disagrees with the call's
    code, an error raised before any call existed)."""
    try:
        status = rpc_status.from_call(error)
    except (ValueError, AttributeError, TypeError):
        return []
    found: list[FieldViolation] = []
    for detail in status.details if status is not None else []:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            found.extend(FieldViolation(v.field, v.description) for v in bad_request.field_violations)
    return found


def code_and_details(error: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """A failed call's status code (UNKNOWN when it has none, as an error raised before any call
    existed) and message (the error's text when it has no details)."""
    code_of = getattr(error, "code", None)
    code = code_of() if callable(code_of) else grpc.StatusCode.UNKNOWN
    details_of = getattr(error, "details", None)
    details = details_of() if callable(details_of) else str(error)
    return (code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN), details or ""


def decode(error: grpc.RpcError, component: str) -> MecbenchError:
    """A service's failed call as a domain error that names `component` (e.g. "LoadGen agent
    x"): the error class of its status code (UNKNOWN, an unmapped failure there, becomes
    INTERNAL), and an INVALID_ARGUMENT's field violations kept, so whoever called the controller
    learns which field the agent refused and why."""
    code, details = code_and_details(error)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        violations = field_violations(error)
        if violations:
            return InvalidArgument([FieldViolation(v.field, f"{v.description} ({component})") for v in violations])
    message = f"{component}: {details or code.name}"
    error_class = _ERRORS.get(code)
    if error_class is not None:
        return error_class(message)
    decoded = MecbenchError(message)
    decoded.code = code if code != grpc.StatusCode.UNKNOWN else grpc.StatusCode.INTERNAL
    return decoded
