"""Every error that crosses the wire, defined once: a stable numeric code, a message for
people, and a `detail` that carries the data (expected and actual revision, missing ids...).

`to_wire` and `from_wire` turn these into `[code, message, detail]` and back, so the agent
raises `StaleRevision(3, 4)` and the launcher catches exactly that. The CLI maps classes to
exit codes in one place (launcher/cli.py). This module performs no I/O.
"""

from __future__ import annotations

from typing import Any, ClassVar


class LaunchError(Exception):
    """Base of every error the project raises on purpose. `code` is stable on the wire."""

    code: ClassVar[int] = 1
    detail: Any = None
    # Set by the launcher on an error that one node raised, so each is reported by name.
    node: str | None = None

    def __init__(self, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def __str__(self) -> str:
        return self.message

    @classmethod
    def from_detail(cls, message: str, detail: Any) -> LaunchError:
        """Rebuild from the wire; subclasses with typed fields override this."""
        return cls(message, detail)


class ProtocolError(LaunchError):
    """The connection broke the protocol; after this it is dead."""

    code = 2


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow (a bug on our side)."""

    code = 3


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""

    code = 4


class VersionMismatch(LaunchError):
    code = 5

    def __init__(self, ours: int, theirs: object) -> None:
        super().__init__(
            f"protocol version mismatch: we speak {ours}, the peer speaks {theirs}; "
            "install the same version of launch on both sides",
            [ours, theirs],
        )
        self.ours, self.theirs = ours, theirs

    @classmethod
    def from_detail(cls, message: str, detail: Any) -> LaunchError:
        ours, theirs = _pair(detail)
        return cls(ours, theirs)


class UnknownMethod(LaunchError):
    code = 6


class InvalidParams(LaunchError):
    code = 7


class InvalidManifest(LaunchError):
    """A manifest, revision or path breaks the grammar. `detail` is the offending path."""

    code = 10

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message, path)
        self.path = path

    @classmethod
    def from_detail(cls, message: str, detail: Any) -> LaunchError:
        return cls(message, detail if isinstance(detail, str) else "")


class ChecksumMismatch(LaunchError):
    code = 11

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(
            f"checksum mismatch: expected {expected[:12]}, got {actual[:12]}", [expected, actual]
        )
        self.expected, self.actual = expected, actual

    @classmethod
    def from_detail(cls, message: str, detail: Any) -> LaunchError:
        return cls(*_pair(detail, str))


class ObjectMissing(LaunchError):
    code = 12

    def __init__(self, ids: list[str] | str) -> None:
        ids = [ids] if isinstance(ids, str) else list(ids)
        shown = ", ".join(i[:12] for i in ids[:5]) + (" ..." if len(ids) > 5 else "")
        super().__init__(f"object(s) missing from the store: {shown}", ids)
        self.ids = ids

    @classmethod
    def from_detail(cls, message: str, detail: Any) -> LaunchError:
        return cls([str(i) for i in detail] if isinstance(detail, list) else str(detail))


class PathNotFound(LaunchError):
    code = 13

    def __init__(self, path: str) -> None:
        super().__init__(f"no such path in the tree: {path}", path)
        self.path = path

    @classmethod
    def from_detail(cls, message: str, detail: Any) -> LaunchError:
        return cls(str(detail))


class JobNotFound(LaunchError):
    code = 20

    def __init__(self, ref: str) -> None:
        super().__init__(f"no job matches {ref!r} (see `launch ls`)", ref)
        self.ref = ref

    @classmethod
    def from_detail(cls, message: str, detail: Any) -> LaunchError:
        return cls(str(detail))


class AmbiguousRef(LaunchError):
    code = 21


class PermissionDenied(LaunchError):
    code = 22


class JobStateError(LaunchError):
    """The job is not in a state that allows this (already started, already ended...)."""

    code = 23


class StaleRevision(LaunchError):
    code = 24

    def __init__(self, expected: int, actual: int) -> None:
        super().__init__(
            f"stale revision: based on r{expected} but the head is r{actual}; "
            "see `launch revisions` and patch again",
            [expected, actual],
        )
        self.expected, self.actual = expected, actual

    @classmethod
    def from_detail(cls, message: str, detail: Any) -> LaunchError:
        return cls(*_pair(detail, int))


class Busy(LaunchError):
    """The node cannot take the job now (resources held by others)."""

    code = 25


class NodeUnreachable(LaunchError):
    """Raised on the launcher side only: the node could not be reached or stopped answering."""

    code = 30

    def __init__(self, node: str, reason: str) -> None:
        super().__init__(f"{node}: unreachable: {reason}", [node, reason])
        self.node, self.reason = node, reason

    @classmethod
    def from_detail(cls, message: str, detail: Any) -> LaunchError:
        return cls(*_pair(detail, str))


class InternalError(LaunchError):
    """An unexpected failure on the peer; detail holds its traceback as text."""

    code = 99


def _pair(detail: Any, kind: type | None = None) -> tuple[Any, Any]:
    # A detail that is not a pair (of `kind`) is malformed: raising here makes from_wire fall
    # back to a plain LaunchError instead of building e.g. StaleRevision("x", None).
    if not (isinstance(detail, (list, tuple)) and len(detail) == 2):
        raise ValueError("error detail is not a pair")
    if kind is not None and not all(
        isinstance(x, kind) and not isinstance(x, bool) for x in detail
    ):
        raise ValueError(f"error detail is not a pair of {kind.__name__}")
    return detail[0], detail[1]


def _all_subclasses(cls: type[LaunchError]) -> list[type[LaunchError]]:
    out: list[type[LaunchError]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


_ALL: list[type[LaunchError]] = [LaunchError, *_all_subclasses(LaunchError)]
BY_CODE: dict[int, type[LaunchError]] = {c.code: c for c in _ALL}
assert len(BY_CODE) == len(_ALL), "error codes must be unique"


def to_wire(error: LaunchError) -> list[Any]:
    return [error.code, error.message, error.detail]


def from_wire(value: object) -> LaunchError:
    """Rebuild the exception the peer raised. A malformed error is a RemoteProtocolError."""
    if not (
        isinstance(value, list)
        and len(value) == 3
        and isinstance(value[0], int)
        and not isinstance(value[0], bool)
        and isinstance(value[1], str)
    ):
        # Name only the type: repr() of a peer's value can be deep (RecursionError) or huge.
        return RemoteProtocolError(f"malformed error from peer (a {type(value).__name__})")
    code, message, detail = value
    cls = BY_CODE.get(code, LaunchError)
    try:
        return cls.from_detail(message, detail)
    except Exception:
        return LaunchError(message, detail)
