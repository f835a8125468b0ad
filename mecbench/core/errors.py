"""Domain exceptions. Services raise these; one server interceptor maps them to gRPC status codes.

Library code never imports grpc to report an error: it raises one of these, so the same logic
runs (and is tested) without a server.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class FieldViolation:
    """One bad field: a dotted path into the request (`spec.settings.scenario`) and the reason."""

    field: str
    description: str

    def __str__(self) -> str:
        return f"{self.field}: {self.description}"


class MecbenchError(Exception):
    """Base of every error MECBench reports to callers. The message is safe to show to clients."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(MecbenchError):
    """The request is malformed; nothing was changed. Carries every violation found at once."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: Iterable[FieldViolation] | str, field: str = "") -> None:
        if isinstance(violations, str):
            violations = [FieldViolation(field, violations)]
        self.violations: list[FieldViolation] = list(violations)
        super().__init__("; ".join(str(v) for v in self.violations) or "invalid argument")


class NotFound(MecbenchError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(MecbenchError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(MecbenchError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(MecbenchError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(MecbenchError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(MecbenchError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(MecbenchError):
    code = grpc.StatusCode.CANCELLED


class PermissionDenied(MecbenchError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(MecbenchError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Unimplemented(MecbenchError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Violations:
    """Collects field violations so a request is checked as a whole and all errors reported at once.

    >>> v = Violations()
    >>> v.check(qps >= 0, "spec.settings.server_target_qps", "must not be negative")
    >>> v.raise_if_any()
    """

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field, description))

    def check(self, ok: bool, field: str, description: str) -> bool:
        if not ok:
            self.add(field, description)
        return ok

    def extend(self, other: Iterable[FieldViolation]) -> None:
        self.items.extend(other)

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(self.items)
