"""One error hierarchy for all of Distill.

Every error a user can see names the thing it is about and the reason. Bad data from the wire
or from a file is an error value (one of these), never an ``assert``.
"""

from __future__ import annotations


class DistillError(Exception):
    """Base of every error Distill raises on purpose."""


class ProtocolError(DistillError):
    """A peer broke the wire protocol (MDP/0.1 framing, message schema)."""


class DecodeError(ProtocolError):
    """A body could not be decoded: not msgpack, wrong schema, disallowed dtype, too large."""


class RequestError(DistillError):
    """A request could not be answered; ``code`` is a short machine-readable reason."""

    def __init__(self, message: str, code: str = "error") -> None:
        super().__init__(message)
        self.code = code


class RequestTimeout(RequestError):
    """No reply came back before the client's timeout (after its retries)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="timeout")


class UnknownService(RequestError):
    """The broker has no such service and no worker registered for it."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="unknown_service")


class JobError(DistillError):
    """A job could not be submitted, found, or finished."""


class JobCancelled(JobError):
    """Raised inside a handler by ``ctx.check_cancel()`` when the job was cancelled."""


class ArtifactError(DistillError):
    """An artifact could not be stored, found or read (hash mismatch, unknown id, in use)."""


class AudioError(DistillError):
    """An audio file could not be used; the message says which file and why."""


class DatasetError(DistillError):
    """A dataset could not be built or loaded."""


class ModelFormatError(DistillError):
    """A checkpoint or model file is corrupt, truncated, or of an unknown/newer version."""


class ConfigError(DistillError):
    """A configuration value is out of range or inconsistent."""


class DeviceError(DistillError):
    """A requested device (cuda, cuda:N, mps) is not usable on this machine."""
