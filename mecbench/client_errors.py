"""Typed exceptions of the Python SDK (`mecbench.Client`, `mecbench.AsyncClient`).

Every SDK method raises a `ClientError` subclass instead of a raw `grpc.RpcError`, chosen by the
gRPC status code, so callers write `except NotFoundError:` rather than comparing codes:

    try:
        client.start_experiment("sweep.yaml")
    except InvalidArgumentError as err:
        for field, reason in err.field_violations.items():
            ...

The controller reports every bad field of a request at once as a google.rpc.BadRequest in the
rich status; `field_violations` holds them, field path to reason. Spec files that cannot be read
on this side (bad YAML, unknown fields) raise the same InvalidArgumentError, so a caller handles
one error whichever side found the problem.
"""

from __future__ import annotations

import grpc

from mecbench.core import codec
from mecbench.core.errors import InvalidArgument, MecbenchError

__all__ = [
    "AlreadyExistsError",
    "CallCancelledError",
    "ClientError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "error_for",
    "from_local_error",
    "from_rpc_error",
]


class ClientError(Exception):
    """A failed SDK call.

    Attributes:
        code: the gRPC status code (`grpc.StatusCode.NOT_FOUND`, ...).
        details: the server's message (or this side's, for errors found before any call).
        field_violations: for INVALID_ARGUMENT, each bad field's dotted path in the request
            (`spec.sweep.clients[0]`) mapped to the reason; empty otherwise.
        method: the Controller RPC that failed (`GetRun`), or the SDK step for errors found on
            this side (`StartExperiment` for an unreadable spec file).
        rpc_error: the underlying `grpc.RpcError` when there was one, for anything else its
            status carries (e.g. `grpc_status.rpc_status.from_call(err.rpc_error)`).
    """

    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        details: str,
        *,
        code: grpc.StatusCode | None = None,
        field_violations: dict[str, str] | None = None,
        method: str = "",
        rpc_error: grpc.RpcError | None = None,
    ) -> None:
        self.code: grpc.StatusCode = code if code is not None else self.default_code
        self.details = details
        self.field_violations: dict[str, str] = dict(field_violations or {})
        self.method = method
        self.rpc_error = rpc_error
        super().__init__(details)

    def __str__(self) -> str:
        where = f" ({self.method})" if self.method else ""
        violations = [f"{field}: {reason}" for field, reason in self.field_violations.items()]
        # The controller's message is the violations joined; said once, one per line, is enough.
        summary = "" if violations and self.details == "; ".join(violations) else f" {self.details}"
        return "\n".join([f"{self.code.name}{where}:{summary}", *(f"  {line}" for line in violations)])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code.name}, details={self.details!r}, method={self.method!r})"


class InvalidArgumentError(ClientError):
    """The request (or a spec file) is malformed; nothing was started. See `field_violations`."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(ClientError):
    """No run, experiment, result or blob by that name."""

    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(ClientError):
    """The id or key is taken (a blob uploaded without `overwrite`, an experiment id in use)."""

    default_code = grpc.StatusCode.ALREADY_EXISTS


class FailedPreconditionError(ClientError):
    """The system is not in a state to do this (a busy SUT under BUSY_POLICY_REJECT)."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class UnavailableError(ClientError):
    """The controller (or a service behind it) could not be reached, after every retry."""

    default_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceededError(ClientError):
    """The call, or a `wait_*` with a timeout, ran out of time."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class PermissionDeniedError(ClientError):
    """The caller is known but may not do this."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class UnauthenticatedError(ClientError):
    """The token is missing or not accepted."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class CallCancelledError(ClientError):
    """The call was cancelled (named so as not to shadow `asyncio.CancelledError`)."""

    default_code = grpc.StatusCode.CANCELLED


class InternalError(ClientError):
    """The server failed; its message carries an incident id to find in its log."""

    default_code = grpc.StatusCode.INTERNAL


class ResourceExhaustedError(ClientError):
    """A limit was hit (a blob over the size limit, a message too large)."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnimplementedError(ClientError):
    """The server does not offer this RPC (an older controller)."""

    default_code = grpc.StatusCode.UNIMPLEMENTED


_BY_CODE: dict[grpc.StatusCode, type[ClientError]] = {
    cls.default_code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        FailedPreconditionError,
        UnavailableError,
        DeadlineExceededError,
        PermissionDeniedError,
        UnauthenticatedError,
        CallCancelledError,
        InternalError,
        ResourceExhaustedError,
        UnimplementedError,
    )
}


def error_for(
    code: grpc.StatusCode,
    details: str,
    *,
    field_violations: dict[str, str] | None = None,
    method: str = "",
    rpc_error: grpc.RpcError | None = None,
) -> ClientError:
    """The ClientError subclass for `code` (plain ClientError for codes without one)."""
    cls = _BY_CODE.get(code, ClientError)
    return cls(details, code=code, field_violations=field_violations, method=method, rpc_error=rpc_error)


def _violations_of(error: grpc.RpcError) -> dict[str, str]:
    violations: dict[str, str] = {}
    for violation in codec.field_violations(error):
        _add_violation(violations, violation.field, violation.description)
    return violations


def _add_violation(violations: dict[str, str], field: str, reason: str) -> None:
    # Two reasons for one field are both kept: a dict has one slot per field.
    violations[field] = f"{violations[field]}; {reason}" if field in violations else reason


def from_rpc_error(error: grpc.RpcError, method: str) -> ClientError:
    """The typed error for a failed call (sync `grpc.RpcError` or `grpc.aio.AioRpcError`)."""
    code, details = codec.code_and_details(error)
    return error_for(
        code,
        details,
        field_violations=_violations_of(error),
        method=method,
        rpc_error=error,
    )


def from_local_error(error: MecbenchError, method: str) -> ClientError:
    """The typed error for a problem found on this side before any call, such as a spec file
    that does not parse: the same class and fields the controller's answer would have."""
    violations: dict[str, str] = {}
    if isinstance(error, InvalidArgument):
        for violation in error.violations:
            _add_violation(violations, violation.field, violation.description)
    return error_for(error.code, str(error), field_violations=violations, method=method)
