"""Protocol constants shared by the kernel and every client: version, frame kinds, bounds, timing."""

PROTOCOL_VERSION = 1

# Frame kinds ("t" field of every kernel -> client frame).
OK = "ok"  # the final (or only) reply to a request: carries "result"
ERR = "err"  # the final reply, an error: carries "errno", "error", "message"
CHUNK = "chunk"  # one piece of a streamed reply; zero or more precede the final frame
BYE = "bye"  # unsolicited: the kernel is stopping; every pending call of this client fails

# Bounds enforced by the codec on both sides. A request over one of them is answered EMSGSIZE
# (with its id when the id can be read) and the connection stays as it was.
MAX_FRAME_BYTES = 16 * 1024 * 1024
MAX_STR_BYTES = 8 * 1024 * 1024
MAX_ARRAY_LEN = 1_000_000
MAX_MAP_LEN = 10_000
# The transport's own cap (ZeroMQ MAXMSGSIZE), only a memory guard: a bigger message is dropped by
# ZeroMQ together with the connection, unanswered.
MAX_TRANSPORT_BYTES = 64 * 1024 * 1024

# Liveness: a client that has heard nothing for HEARTBEAT_S while a call is pending pings the
# kernel; no frame at all within DEAD_AFTER_S means the kernel is gone.
HEARTBEAT_S = 2.0
DEAD_AFTER_S = 10.0
