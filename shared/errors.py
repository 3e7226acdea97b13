"""One error hierarchy for all of Distill, and the stable codes errors cross the wire as.

Every error a user can see names the thing it is about and the reason. Bad data from the wire
or from a file is an error value (one of these), never an ``assert``.

An error reply is ``{"ok": false, "error": {"code": CODE, "message": ...}}`` where CODE is one
of :data:`ERROR_CODES` (the README's table lists the same). Senders take the code from
:func:`code_of`; receivers compare against the constants below, never against Python class
names, so renaming a class never changes the protocol.
"""

from __future__ import annotations

# --- wire codes --------------------------------------------------------------------------------
BAD_REQUEST = "bad_request"
INTERNAL = "internal"
EXPIRED = "expired"
WORKER_LOST = "worker_lost"
CANCELLED = "cancelled"
OFFSET_MISMATCH = "offset_mismatch"
DAMAGED = "damaged"
STORE_FULL = "store_full"
JOB = "job"
ARTIFACT = "artifact"
AUDIO = "audio"
DATASET = "dataset"
MODEL_FORMAT = "model_format"
CONFIG = "config"
DEVICE = "device"
ERROR = "error"
# Raised on the client side only (never sent by a peer):
TIMEOUT = "timeout"
UNKNOWN_SERVICE = "unknown_service"
BAD_REPLY = "bad_reply"

ERROR_CODES: dict[str, str] = {
    BAD_REQUEST: "the request could not be decoded, lacks a field, or names an unknown op",
    INTERNAL: "a bug in the broker or a worker handler; the message holds the exception",
    EXPIRED: "no worker took the request within the broker's request timeout",
    WORKER_LOST: "the workers holding the request died, more times than a request is redelivered",
    CANCELLED: "the job was cancelled (the reply also carries cancelled: true)",
    OFFSET_MISMATCH: "an artifact chunk arrived at the wrong offset (the error holds expected)",
    JOB: "a job could not be submitted, found, or changed",
    ARTIFACT: "an artifact could not be stored, found or read (bad id, hash mismatch, in use)",
    DAMAGED: "a stored artifact's bytes no longer hash to its id: the broker removed it",
    STORE_FULL: "the artifact store has no room for it (its size bound or the disk's free floor)",
    AUDIO: "an audio file could not be used",
    DATASET: "a dataset could not be built or loaded",
    MODEL_FORMAT: "a checkpoint or model file is corrupt, truncated, or of a newer version",
    CONFIG: "a configuration value is out of range or inconsistent",
    DEVICE: "the requested device is not usable on the worker's machine",
    ERROR: "any other Distill error",
    TIMEOUT: "(client side) no reply within the client's timeout",
    UNKNOWN_SERVICE: "(client side) no worker for the service is registered with the broker",
    BAD_REPLY: "(client side) a reply that does not match its request",
}


class DistillError(Exception):
    """Base of every error Distill raises on purpose. ``code`` is its wire code."""

    code: str = ERROR


class ProtocolError(DistillError):
    """A peer broke the wire protocol (MDP/0.1 framing, message schema)."""

    code = BAD_REQUEST


class DecodeError(ProtocolError):
    """A body could not be decoded: not msgpack, wrong schema, disallowed dtype, too large."""


class RequestError(DistillError):
    """A request could not be answered; ``code`` is one of :data:`ERROR_CODES`."""

    def __init__(self, message: str, code: str = ERROR) -> None:
        super().__init__(message)
        self.code = code


class RequestTimeout(RequestError):
    """No reply came back before the client's timeout (after its retries)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code=TIMEOUT)


class UnknownService(RequestError):
    """The broker has no such service and no worker registered for it."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code=UNKNOWN_SERVICE)


class JobError(DistillError):
    """A job could not be submitted, found, or finished."""

    code = JOB


class JobCancelled(JobError):
    """Raised inside a handler by ``ctx.check_cancel()`` when the job was cancelled."""

    code = CANCELLED


class ArtifactError(DistillError):
    """An artifact could not be stored, found or read (hash mismatch, unknown id, in use)."""

    code = ARTIFACT


class ArtifactDamaged(ArtifactError):
    """A stored artifact's bytes no longer hash to its id (a bad disk, a file changed by hand):
    the broker removes it as it notices, so that it can be uploaded or made again."""

    code = DAMAGED


class StoreFull(ArtifactError):
    """The broker's store has no room for an artifact: its size bound
    (``DISTILL_STORE_MAX_BYTES``) or the free space it keeps on its disk. A job that meets it
    fails at once rather than spending its attempts on the same refusal; ``distill jobs retry``
    resumes it from its checkpoint once there is room."""

    code = STORE_FULL


class AudioError(DistillError):
    """An audio file could not be used; the message says which file and why. ``stated`` holds
    (seconds, sample rate, channels) as the file's header gives them when it was refused from
    its header (too long), so a manifest can still say what the file is."""

    code = AUDIO

    def __init__(self, message: str, *, stated: tuple[float, int, int] | None = None) -> None:
        super().__init__(message)
        self.stated = stated


class DatasetError(DistillError):
    """A dataset could not be built or loaded."""

    code = DATASET


class ModelFormatError(DistillError):
    """A checkpoint or model file is corrupt, truncated, or of an unknown/newer version."""

    code = MODEL_FORMAT


class ConfigError(DistillError):
    """A configuration value is out of range or inconsistent."""

    code = CONFIG


class UnknownSettings(ConfigError):
    """A config map holds keys its class does not have: a typo in what a user gave, or, in
    something stored (a model file, weights, a checkpoint), settings of a newer Distill."""

    def __init__(self, message: str, keys: list[str]) -> None:
        super().__init__(message)
        self.keys = keys

    def newer(self, what: str) -> str:
        """The message for ``what`` read from storage: written by a newer Distill."""
        return (f"{what} holds settings this Distill does not know ({', '.join(self.keys)}): "
                "it was written by a newer Distill; upgrade Distill to read it")


class DeviceError(DistillError):
    """A requested device (cuda, cuda:N, mps) is not usable on this machine."""

    code = DEVICE


def code_of(error: BaseException) -> str:
    """The wire code for an error: its own for a Distill error, ``internal`` for anything else."""
    if isinstance(error, DistillError):
        return error.code
    return INTERNAL
