"""Wire constants: MDP/0.1 (ZeroMQ RFC 7), MMI (RFC 8), ports, timings and size limits.

Everything that two processes must agree on byte for byte lives here and nowhere else.
"""

from __future__ import annotations

# --- MDP/0.1 (RFC 7) -------------------------------------------------------------------------
MDPC = b"MDPC01"  # client header
MDPW = b"MDPW01"  # worker header

W_READY = b"\x01"
W_REQUEST = b"\x02"
W_REPLY = b"\x03"
W_HEARTBEAT = b"\x04"
W_DISCONNECT = b"\x05"
WORKER_COMMANDS = frozenset({W_READY, W_REQUEST, W_REPLY, W_HEARTBEAT, W_DISCONNECT})

# --- MMI (RFC 8) -----------------------------------------------------------------------------
MMI_PREFIX = b"mmi."
MMI_SERVICE = b"mmi.service"
MMI_FOUND = b"200"
MMI_NOT_FOUND = b"404"
MMI_NOT_IMPLEMENTED = b"501"

# --- Services the broker serves itself --------------------------------------------------------
SERVICE_JOBS = b"distill.jobs"
SERVICE_ARTIFACTS = b"distill.artifacts"
SERVICE_WORKERS = b"distill.workers"
SERVICE_EVENTS = b"distill.events"
# the services the broker answers itself: no worker may register them
BROKER_SERVICES = frozenset({SERVICE_JOBS, SERVICE_ARTIFACTS, SERVICE_WORKERS, SERVICE_EVENTS})
SERVICE_ECHO = b"echo"
SERVICE_PREPROCESS = b"distill.preprocess"
SERVICE_VQVAE = b"distill.train.vqvae"
SERVICE_PRIOR = b"distill.train.prior"
SERVICE_INFER = b"distill.infer"

# --- Ports (bound to 127.0.0.1 unless told otherwise) ------------------------------------------
DEFAULT_HOST = "127.0.0.1"
PORT_MDP = 5555
PORT_EVENTS_OUT = 5556  # broker XPUB: subscribers read stamped events here
PORT_EVENTS_IN = 5557  # broker XSUB: workers publish raw events here

# --- Heartbeats ------------------------------------------------------------------------------
HEARTBEAT_INTERVAL_S = 2.5
HEARTBEAT_LIVENESS = 3  # a peer silent for INTERVAL x LIVENESS is dead
RECONNECT_INITIAL_S = 0.25
RECONNECT_MAX_S = 5.0

# --- Requests --------------------------------------------------------------------------------
# A request that no live worker holds expires this long after it arrived.
REQUEST_TIMEOUT_S = 30.0

# --- Sizes -----------------------------------------------------------------------------------
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # whole multipart message, enforced by ZMQ_MAXMSGSIZE
MAX_FRAMES = 64  # more frames than this in one message is malformed
MAX_SERVICE_NAME_BYTES = 255
ARTIFACT_CHUNK_BYTES = 4 * 1024 * 1024
MAX_ARTIFACT_NAME_CHARS = 255  # an artifact's name is metadata (a file's path may be longer)
MAX_JOB_PARAMS_BYTES = 256 * 1024  # params name artifacts and settings; audio travels as artifacts
ARTIFACT_CREDIT = 4  # chunk requests in flight during a get (credit-based flow control)
SOCKET_HWM = 10_000
