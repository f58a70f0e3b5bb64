"""Exceptions mapped from the daemon's error kinds (`tierckpt_tiers::ErrorKind`)."""


class TierckptError(Exception):
    """Base of every error from the daemon or the client. `kind` is the daemon's error kind."""

    kind = "internal"

    def __init__(self, message: str, kind: str | None = None):
        super().__init__(message)
        self.message = message
        if kind is not None:
            self.kind = kind


def unsupported_request(e: Exception) -> bool:
    """Whether `e` is an older daemon refusing a request it does not know."""
    return getattr(e, "kind", None) == "invalid_argument" or "unknown variant" in str(e)


class NotFoundError(TierckptError):
    kind = "not_found"


class AlreadyExistsError(TierckptError):
    kind = "already_exists"


class CorruptError(TierckptError):
    kind = "corrupt"


class CapacityExceededError(TierckptError):
    kind = "capacity_exceeded"


class InvalidArgumentError(TierckptError, ValueError):
    kind = "invalid_argument"


class UnavailableError(TierckptError, ConnectionError):
    kind = "unavailable"


class UnauthorizedError(TierckptError, PermissionError):
    kind = "unauthorized"


class TierckptIOError(TierckptError, OSError):
    kind = "io"


class CancelledError(TierckptError):
    kind = "cancelled"


class InternalError(TierckptError):
    kind = "internal"


_BY_KIND = {
    cls.kind: cls
    for cls in (NotFoundError, AlreadyExistsError, CorruptError, CapacityExceededError,
                InvalidArgumentError, UnavailableError, UnauthorizedError, TierckptIOError,
                CancelledError, InternalError)
}


def from_wire(err: dict) -> TierckptError:
    """`{"kind": ..., "message": ...}` as the matching exception."""
    kind = str(err.get("kind", "internal"))
    message = str(err.get("message", "")) or kind
    return _BY_KIND.get(kind, TierckptError)(message, kind)
