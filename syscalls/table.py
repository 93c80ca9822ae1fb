"""The syscall table: number, name, request and reply schema, possible errors. The one source of truth.

The kernel's handler table, the client methods and docs/syscalls.md are all checked against
this list by tests/syscalls/test_table.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmos.syscalls.errors import Errno, NoSuchSyscall, quote
from llmos.syscalls.schema import Field

E = Errno

PRIORITY_MIN, PRIORITY_MAX = -20, 19
SIGNALS = ("TERM", "KILL", "STOP", "CONT")
STATES = ("NEW", "READY", "RUNNING", "BLOCKED", "STOPPED", "ZOMBIE")
FINISH_REASONS = ("stop", "length", "killed", "closed", "error")


@dataclass(frozen=True)
class Syscall:
    nr: int
    name: str
    doc: str
    request: tuple[Field, ...]
    reply: tuple[Field, ...]
    errors: tuple[Errno, ...]
    streams: bool = False  # replies with chunk frames before the final frame
    chunk: tuple[Field, ...] = ()
    access: "Access | None" = None  # who may call it (required: checked below)


ANY, OWNER, ADMIN, PATH = "any", "owner", "admin", "path"


@dataclass(frozen=True)
class Access:
    """Who may make a call; the kernel's dispatcher checks it before the handler runs (EPERM otherwise).

    ``who``: ANY authenticated user; OWNER: the owner of the process the call names (its ``pid``) or the
    admin; ADMIN: the admin only (the kernel's owner and root); PATH: by the path, under the namespace's
    rules (FS_RULES), checked in the same store transaction as the operation. ``admin_args``: setting any of
    these arguments (to anything but its default) makes the call the admin's. ``admin_below_zero``: these
    arguments below 0 are the admin's (a negative nice value, as on Unix).
    """

    who: str
    admin_args: tuple[str, ...] = ()
    admin_below_zero: tuple[str, ...] = ()

    def describe(self) -> str:
        base = {ANY: "any user", OWNER: "the process's owner or the admin", ADMIN: "the admin",
                PATH: "by path: " + FS_RULES}[self.who]
        extra = [f"{', '.join(self.admin_args)} only the admin" if self.admin_args else "",
                 f"{', '.join(self.admin_below_zero)} below 0 only the admin" if self.admin_below_zero else ""]
        return "; ".join([base, *(e for e in extra if e)])


ANY_USER, TARGET_OWNER, ADMIN_ONLY, BY_PATH = Access(ANY), Access(OWNER), Access(ADMIN), Access(PATH)
# Acting for another user (kernel/delegation.py enforces it, before the call's own rule)
DELEGATION = ("A request whose envelope says `\"for\": USER` is made as USER, checked by the rules below as "
              "USER's own call: USER owns what it spawns and its quotas count it. Who may ask: the admin, for "
              "any user; an account the admin named with `llmos kernel start --delegate NAME[=USER,USER]` "
              "(a gateway), for the users listed or, with none listed, for any user but an admin; anyone else "
              "gets EPERM (audited). For a delegated call, model directories are as for a tcp caller: models "
              "in the store, `default`, or what the admin loaded")
LOAD_OPTIONS = ("device", "instances", "kv_policy", "kv_blocks", "kv_max_blocks", "user_cap_blocks", "max_batch",
                "keep_alive", "engine", "spill_bytes", "spill_below_bytes", "backend", "num_cpus", "num_gpus", "placement",
                "dtype", "prefix_cache")
FS_RULES = ("/home/<user>: its user and the admin read and write; /models: everyone reads, the admin writes; "
            "/data: everyone reads and creates, a file's owner or the admin replaces or removes it; "
            "/proc/<pid>: the process's owner and the admin read, nobody writes; /var/log: everyone reads, "
            "nobody writes")


PID = Field("pid", "int", "process id", min=1, max=2**63 - 1)
USER_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_.@+-]*"
USER_NAME = dict(max_len=64, pattern=USER_PATTERN, pattern_doc="letters, digits and _ . @ + - (not first: . @ + -)")
OMITTED = Field("omitted", "int", "process records left out so that the reply fits one frame (pid order is kept; "
                "0 unless the table is very large)")

SAMPLING: tuple[Field, ...] = (
    Field("max_new_tokens", "int", "most tokens to generate; cut to what the model's context holds after the "
          "prompt (the result's stats.max_new_tokens and warnings say so)", default=128, min=1, max=1_000_000),
    Field("temperature", "float", "0 means greedy decoding", default=0.8, min=0.0, max=100.0),
    Field("top_p", "float", "nucleus sampling mass", default=0.95, min=1e-6, max=1.0),
    Field("top_k", "int", "keep the k most likely tokens; 0 turns it off", default=0, min=0, max=1_000_000),
    Field("repetition_penalty", "float", "penalty for tokens already in the context (1 = off)",
          default=1.0, min=0.01, max=100.0),
    Field("seed", "int", "sampling seed; null draws a random one", nullable=True, min=0, max=2**63 - 1),
    Field("stop", "list[str]", "stop strings; the output ends before the match completed first, whatever the "
          "list order. They are matched in the decoded output (special tokens skipped): one that is exactly a "
          "special token's text stops on that token; one spanning a special token and other text (' value<|im_end|>') "
          "never matches; a character only half generated never matches (not even U+FFFD)", default=(), max_len=16,
          item_max_len=256, max_bytes=4096),
    Field("stop_token_ids", "list[int]", "extra token ids that end the output", default=(), max_len=64),
    Field("ignore_eos", "bool", "keep generating past the end-of-sequence token", default=False),
)

CAPTURE: tuple[Field, ...] = (
    Field("capture", "list[str]", "intermediates to store as float32 .npy files under /proc/<pid>/capture/ (read them "
          "with Client.capture): 'hidden_states', per layer 0..L of L blocks, [tokens, hidden] (0: the embeddings' "
          "output; l: block l's output; L: the last block's after the final norm, as transformers' "
          "output_hidden_states), and 'attentions', per layer 0..L-1, [tokens, heads, tokens] (row t: the softmax "
          "weights of position t over positions 0..t, zero beyond). tokens: every position the model processed, "
          "the prompt's then each generated token's but the last. Capped per process (--max-capture-bytes) and "
          "per user (--max-capture-bytes-per-user): at the cap the capture stops and the result's warnings say "
          "so; the generation goes on, its output the same as without capture. Not for sessions; attentions "
          "need the paged engine (EINVAL)", default=(), max_len=2, item_max_len=32),
    Field("capture_layers", "list[int]", "the layers to capture (null: all); out of range: EINVAL", nullable=True,
          max_len=4096),
    Field("capture_heads", "list[int]", "the attention heads to keep, in this order (null: all); needs "
          "attentions", nullable=True, max_len=4096),
)

PROCESS_RECORD: tuple[Field, ...] = (
    Field("pid", "int"),
    Field("owner", "str", "user who spawned it"),
    Field("model", "str", "model path or name"),
    Field("priority", "int", "nice value, -20..19, lower runs first"),
    Field("state", "str", "one of " + ", ".join(STATES)),
    Field("prompt_tokens", "int"),
    Field("output_tokens", "int"),
    Field("created", "float", "unix time"),
    Field("finish_reason", "str", "set once ZOMBIE: " + ", ".join(FINISH_REASONS) + " (for a BLOCKED session: "
          "its last turn's)", nullable=True),
    Field("session", "bool", "a session: stays alive between turns (BLOCKED waiting for a write)"),
    Field("kv_blocks", "int", "KV blocks its context holds on the device now (0 when swapped out or not started)"),
    Field("preemptions", "int", "times it was taken out of the batch (priority, memory pressure or STOP)"),
)

SCHED_STATS = Field("sched", "map", "preemptions, swaps_out, swaps_in, recomputed_tokens, prefill_tokens (every "
                    "token prefilled, recomputation included), turns, and time_in_state (seconds per state)")

RESULT: tuple[Field, ...] = (
    Field("pid", "int"),
    Field("state", "str", "ZOMBIE"),
    Field("text", "str", "the generated text (stop string excluded)"),
    Field("token_ids", "list[int]", "the generated token ids"),
    Field("finish_reason", "str", ", ".join(FINISH_REASONS)),
    Field("error", "map", "{errno, error, message} when finish_reason is error", nullable=True),
    Field("signal", "str", "the signal that ended it, if any", nullable=True),
    Field("stats", "map", "prompt_tokens, output_tokens, max_new_tokens (the limit that applied: the one asked "
          "for, or less where the context ends first), queue_time_s, ttft_s, tpot_s, total_time_s"),
    SCHED_STATS,
    Field("warnings", "list[str]", "what the kernel changed about the request, e.g. max_new_tokens cut to what "
          "the context holds after the prompt"),
)

DEFAULT_MODEL_DOC = ("an absolute model directory, the name of a model in the store (<name>, /models/<name> or "
                     "store:/models/<name>: see llmos model import), or 'default' (or null): the small Llama shipped "
                     "with LLMOS (4.2M parameters, drivers/models/default)")
MODEL = Field("model", "str", DEFAULT_MODEL_DOC, nullable=True, max_len=4096)
MODEL_DESCRIPTION = (
    Field("model", "str", "the resolved model: a directory, or store:/models/<name> for a model in the store"),
    Field("loaded", "bool"),
    Field("device", "str", "cpu or cuda:N", nullable=True),
    Field("instances", "int", nullable=True),
    Field("keep_alive", "float", nullable=True),
    Field("kv_policy", "str", nullable=True),
    Field("backend", "str", "local (worker processes of the kernel) or ray (Ray actors)", nullable=True),
    Field("ray", "map", "backend ray: num_cpus, num_gpus, placement", nullable=True),
    Field("estimate", "map", "parameters, weight_bytes, kv_bytes, kv_bytes_per_token, overhead_bytes, total_bytes"),
    Field("executors", "list[map]", "per instance: worker_pid, engine, ready, stage (while it loads: starting "
          "the worker, importing torch and transformers, reading weights, building the KV pool; null once "
          "ready), running, kv_used/free/total, steps, batch_mean/max, tokens_out, preemptions; backend, node "
          "(local, or ray:<node id> where its Ray actor runs), node_id, node_ip; dtype (the precision it runs "
          "in), kernels and kernel_path (native or torch, their precision, the GEMM path, the CPU's vector unit); "
          "prefix_cache (on or off) with prefix_lookups, prefix_hits, prefix_hit_tokens, prefix_cached_blocks, "
          "prefix_evictions, prefix_cow_copies", nullable=True),
)

SYSCALLS: tuple[Syscall, ...] = (
    Syscall(
        0, "hello", "Version handshake: the client states its protocol version; the kernel answers with its own.",
        access=ANY_USER,
        request=(
            Field("version", "int", "the client's protocol version", min=0),
            Field("client", "str", "client name, for logs", nullable=True, max_len=200, pattern=r"[^\x00-\x1f\x7f]*",
                  pattern_doc="no control characters"),
            Field("user", "str", "the user the client expects to be. The kernel takes a caller's identity from "
                  "the transport, never from this field: over ipc the peer's uid (SO_PEERCRED), over tcp its CURVE "
                  "key. Another name than the transport's is EPERM", nullable=True, **USER_NAME),
        ),
        reply=(Field("version", "int"), Field("kernel_version", "str"), Field("pid", "int"),
               Field("started", "float", "the kernel's start, unix time: with pid, which kernel this is"),
               Field("max_frame_bytes", "int"),
               Field("user", "str", "who the kernel knows this connection as: it owns what the connection spawns"),
               Field("admin", "bool", "whether that user is the admin (the kernel's owner or root)"),
               Field("transport", "str", "how the identity was proven: ipc (the peer's uid), curve (its key), "
                     "insecure (a tcp listener started with --insecure: every caller is 'anonymous'), or "
                     "delegated (the envelope's 'for': a delegate acts for this user)"),
               Field("by", "str", "the delegate acting for `user` (this connection's own user), when delegated",
                     nullable=True)),
        errors=(E.EPROTO, E.EINVAL, E.EPERM),
    ),
    Syscall(
        1, "ping", "Liveness probe; answers at once.",
        access=ANY_USER,
        request=(), reply=(Field("time", "float", "kernel's unix time"), Field("pid", "int", "the kernel's pid"),
                          Field("started", "float", "the kernel's start, unix time (as hello's: a client compares "
                                "them to notice a kernel restarted on the same address)")), errors=(),
    ),
    Syscall(
        2, "kernel_info", "The kernel's identity and load: pid, address, uptime, version, counts.",
        access=ANY_USER,
        request=(),
        reply=(Field("pid", "int"), Field("address", "str"), Field("uptime_s", "float"),
               Field("version", "str"), Field("home", "str"), Field("processes", "map", "count per state"),
               Field("models", "list[map]", "loaded model instances: model, worker_pid, running, device, ..."),
               Field("listeners", "list[map]", "every address the kernel serves: {address, transport} (ipc, curve "
                     "or insecure)"),
               Field("owner", "str", "the account the kernel runs as: the admin, with root"),
               Field("group", "str", "the OS group that shares the ipc socket (--group)", nullable=True),
               Field("delegates", "str", "who may act for other users (--delegate), besides the admin",
                     nullable=True),
               Field("metrics_url", "str", "where the Prometheus metrics are served (--metrics-port)",
                     nullable=True),
               Field("ray", "map", "with --ray: address (the cluster's GCS), started_local (the kernel started it), "
                     "kernel_ip (where its actors reach it)", nullable=True)),
        errors=(),
    ),
    Syscall(
        3, "shutdown", "Stop the kernel: pending calls get a bye frame, workers are stopped.",
        access=ADMIN_ONLY,
        request=(), reply=(Field("stopping", "bool"),), errors=(E.EPERM,),
    ),
    Syscall(
        10, "spawn", "Create an LLM process: a generation on one model from a prompt or chat messages.",
        access=Access(ANY, admin_args=("keep_alive",), admin_below_zero=("priority",)),
        request=(
            Field("model", "str", DEFAULT_MODEL_DOC, nullable=True, max_len=4096),
            Field("prompt", "str", "plain text prompt (exactly one of prompt, messages, prompt_ids)", nullable=True,
                  max_len=4_000_000),
            Field("messages", "list[map]", "chat messages {role, content} (strings), rendered with the model's "
                  "chat template, which decides the roles (system, user, assistant for most models)",
                  nullable=True, max_len=10_000, max_bytes=4_000_000),
            Field("prompt_ids", "list[int]", "the prompt as token ids (exactly one of prompt, messages, prompt_ids)",
                  nullable=True, max_len=1_000_000),
            Field("keep_alive", "float", "seconds the model stays loaded once idle (0 unloads after use, -1 pins); "
                  "null keeps the model's setting. It changes the model's setting for everyone: the admin's",
                  nullable=True, min=-1.0),
            Field("priority", "int", "nice value: lower runs first; below 0 only for the admin", default=0,
                  min=PRIORITY_MIN, max=PRIORITY_MAX),
            Field("session", "bool", "a session: after each reply it blocks until a `write` brings the next turn, "
                  "keeping its KV context; `close` ends it. Its prompt (or messages) may be left out: it then "
                  "starts BLOCKED. With messages, a reply is generated first only if the last message is the "
                  "user's", default=False),
            Field("deadline", "float", "seconds from now after which the process ends with ETIMEDOUT, its partial "
                  "output kept (for a session: each turn's deadline, from its write)", nullable=True, min=0.001),
            Field("queue_timeout", "float", "seconds it may wait in the run queue before it first runs; past them "
                  "it ends with ETIMEDOUT", nullable=True, min=0.001),
            *CAPTURE,
            *SAMPLING,
        ),
        reply=(PID,),
        errors=(E.EINVAL, E.ENOENT, E.E2BIG, E.EIO, E.ENOMEM, E.EPERM, E.EAGAIN, E.EDQUOT, E.EBUSY),
    ),
    Syscall(
        11, "wait", "Wait until a process is a ZOMBIE and return its result; reaps it unless reap is false.",
        access=TARGET_OWNER,
        request=(PID, Field("timeout", "float", "seconds; null waits forever", nullable=True, min=0.0),
                 Field("reap", "bool", "remove the process from the table", default=True)),
        reply=RESULT,
        errors=(E.ESRCH, E.EPERM, E.ETIMEDOUT, E.EINVAL),
    ),
    Syscall(
        12, "kill", "Send a signal: TERM cancels and keeps partial output, KILL ends it at once (both harmless on "
        "an ended process), STOP suspends it "
        "(it leaves the batch, its KV swapped out; state STOPPED; the tokens of the step in flight when it arrived "
        "still land), CONT resumes it exactly where it was (STOP and CONT of an ended process: EINVAL). Only the owner "
        "or the admin may signal a process.",
        access=TARGET_OWNER,
        request=(PID, Field("signal", "str", "signal name", default="TERM", choices=SIGNALS)),
        reply=(PID, Field("state", "str", "state after the signal was delivered")),
        errors=(E.ESRCH, E.EPERM, E.EINVAL),
    ),
    Syscall(
        13, "ps", "List processes (ZOMBIEs included until reaped).",
        access=ANY_USER,
        request=(),
        reply=(Field("processes", "list[map]", "process records: " + ", ".join(f.name for f in PROCESS_RECORD)),
               OMITTED),
        errors=(),
    ),
    Syscall(
        14, "stat", "One process's record with its stats and output so far (the owner's or the admin's).",
        access=TARGET_OWNER,
        request=(PID,),
        reply=PROCESS_RECORD + (Field("text", "str", "output so far"), Field("stats", "map"), SCHED_STATS),
        errors=(E.ESRCH, E.EPERM, E.EINVAL),
    ),
    Syscall(
        15, "stream", "Stream a process's output: chunks of text as generated, then its result.",
        access=TARGET_OWNER,
        request=(PID,),
        reply=RESULT,
        errors=(E.ESRCH, E.EPERM, E.EINVAL),
        streams=True,
        chunk=(Field("text", "str", "new text"), Field("token_ids", "list[int]", "new token ids")),
    ),
    Syscall(
        16, "models", "List the loaded models with their instances, devices and KV pools.",
        access=ANY_USER,
        request=(), reply=(Field("models", "list[map]", "model descriptions, as model_info"),), errors=(),
    ),
    Syscall(
        17, "model_load", "Load a model (or return it if loaded): device, instances, KV memory policy, keep-alive.",
        access=Access(ANY, admin_args=LOAD_OPTIONS),
        request=(
            MODEL,
            Field("device", "str", "cpu, cuda:N or auto (one GPU that fits, else the CPU)", nullable=True, max_len=32),
            Field("instances", "int", "model instances (worker processes)", default=1, min=1, max=64),
            Field("kv_policy", "str", "static: fixed pool; dynamic: grows with demand and free memory, shrinks "
                  "when idle; isolated: fixed pool with a hard cap per user", nullable=True,
                  choices=("static", "dynamic", "isolated")),
            Field("kv_blocks", "int", "KV pool size in blocks (the initial size under dynamic)", nullable=True,
                  min=2, max=10_000_000),
            Field("kv_max_blocks", "int", "the dynamic policy's largest pool", nullable=True, min=2, max=10_000_000),
            Field("user_cap_blocks", "int", "the isolated policy's cap per user, in blocks", nullable=True, min=1),
            Field("max_batch", "int", "most processes in one step", nullable=True, min=1, max=4096),
            Field("keep_alive", "float", "seconds to stay loaded once idle; -1 pins, 0 unloads after use",
                  nullable=True, min=-1.0),
            Field("engine", "str", "auto, paged or sequential", nullable=True, choices=("auto", "paged", "sequential")),
            Field("spill_bytes", "int", "most bytes of swapped-out KV a worker keeps on disk (its spill area in the "
                  "store's directory) when its host swap area is full or host memory is short (default 8 GiB; 0: "
                  "never, recompute instead)", nullable=True, min=0, max=2**50),
            Field("spill_below_bytes", "int", "host memory available (bytes) below which swapped-out KV goes to disk "
                  "instead of the host swap area (default: the smaller of RAM/10 and 1 GiB)", nullable=True, min=0,
                  max=2**50),
            Field("backend", "str", "local: worker processes of the kernel (the default); ray: Ray actors placed "
                  "by Ray on the cluster's nodes (a kernel started with --ray); auto: ray when the kernel has Ray",
                  nullable=True, choices=("local", "ray", "auto")),
            Field("num_cpus", "float", "backend ray: CPUs (and torch threads) per instance (default 1)",
                  nullable=True, min=0.01, max=1024.0),
            Field("num_gpus", "float", "backend ray: GPUs per instance, 0 or a fraction up to 1 (default 0: a CPU "
                  "instance)", nullable=True, min=0.0, max=1.0),
            Field("placement", "str", "backend ray: spread the instances over nodes, or pack them onto as few as "
                  "fit (Ray placement group SPREAD or PACK; default spread)", nullable=True,
                  choices=("spread", "pack")),
            Field("dtype", "str", "weights' and KV cache's precision: auto (bfloat16 on CPUs with AMX or "
                  "AVX512-BF16 and on GPUs that have it, else float32 on a CPU, float16 on a GPU), float32, bfloat16 "
                  "or float16; logits and sampling stay float32. model_info's executors say which it took "
                  "(dtype) and the kernel path (kernels)", nullable=True, choices=("auto", "float32", "bfloat16", "float16")),
            Field("prefix_cache", "bool", "share the KV blocks of identical token prefixes between processes "
                  "(a shared system prompt, a few-shot template, a session's earlier turns are prefilled once; "
                  "default true; false for comparison)", nullable=True),
        ),
        reply=MODEL_DESCRIPTION,
        errors=(E.ENOENT, E.ENOMEM, E.EIO, E.EINVAL, E.EPERM),
    ),
    Syscall(
        18, "model_unload", "Unload a model: stop its workers and free its memory.",
        access=Access(ANY, admin_args=("force",)),
        request=(MODEL, Field("force", "bool", "also end its live processes (they finish with error)",
                              default=False)),
        reply=(Field("model", "str"), Field("unloaded", "bool")),
        errors=(E.ENOENT, E.EBUSY, E.EPERM),
    ),
    Syscall(
        19, "model_info", "Describe a model: loaded or not, its memory estimate, its instances and their metrics.",
        access=ANY_USER,
        request=(MODEL,), reply=MODEL_DESCRIPTION, errors=(E.ENOENT,),
    ),
    Syscall(
        20, "devices", "The devices: cpu (cores, load, RAM) and each GPU (memory, utilisation), with reservations.",
        access=ANY_USER,
        request=(),
        reply=(Field("devices", "list[map]", "kind, name, capacity, budget_bytes, reserved_bytes, free_bytes, "
                     "holders, and what the driver reports (load, utilisation, memory); with --ray, one of kind "
                     "node per live Ray node: name ray:<id>, node_id, ip, hostname, head, cpus, cpus_free, gpus, "
                     "gpus_free, memory_total_bytes, memory_free_bytes (Ray's logical resources)"),),
        errors=(),
    ),
    Syscall(
        21, "metrics", "Metrics of every live process and model, and of finished processes.",
        access=ANY_USER,
        request=(),
        reply=(Field("processes", "list[map]", "live processes: record and stats (queue_time_s, ttft_s, tpot_s, "
                     "tokens)"),
               Field("finished", "map", "count, tokens in/out, finish reasons, mean/p50/p95/max of queue_time_s, "
                     "ttft_s, tpot_s, total_time_s over the last 1000"),
               Field("models", "list[map]", "per model instance: batch size per step (last, mean, max), steps, "
                     "tokens_out, KV blocks used/free/total, preemptions, step time"),
               Field("counts", "map", "processes per state"), OMITTED,
               Field("totals", "map", "per model since the kernel started, over finished processes: "
                     "finish_reasons, tokens_in, tokens_out, preemptions, swaps_out, swaps_in, recomputed_tokens, "
                     "prefill_tokens, histograms {queue_time_s, ttft_s, tpot_s, total_time_s: {buckets (upper "
                     "bounds, seconds), counts (one per bucket, then +Inf), sum, count}}")),
        errors=(),
    ),
)

TURN: tuple[Field, ...] = (
    Field("pid", "int"),
    Field("state", "str", "BLOCKED once the reply is done (ZOMBIE if the session ended)"),
    Field("text", "str", "the reply (stop string excluded)"),
    Field("token_ids", "list[int]", "the reply's token ids"),
    Field("finish_reason", "str", ", ".join(FINISH_REASONS)),
    Field("error", "map", "{errno, error, message} when finish_reason is error", nullable=True),
    Field("stats", "map", "prefill_tokens (what this turn computed: its new tokens, plus any recomputation), "
          "context_tokens, output_tokens, ttft_s, total_time_s"),
)

SYSCALLS = SYSCALLS + (
    Syscall(
        22, "nice", "Change a live process's priority (renice; EINVAL once it has ended). Only the owner or the "
        "admin; below 0 only the admin.",
        access=Access(OWNER, admin_below_zero=("priority",)),
        request=(PID, Field("priority", "int", "new nice value, lower runs first", min=PRIORITY_MIN,
                            max=PRIORITY_MAX)),
        reply=(PID, Field("priority", "int"), Field("state", "str")),
        errors=(E.ESRCH, E.EPERM, E.EINVAL),
    ),
    Syscall(
        23, "write", "Send a session its next turn and stream the reply: chunks as generated, then the turn's "
        "result. The session must be BLOCKED (waiting for input).",
        access=TARGET_OWNER,
        request=(PID, Field("content", "str", "the turn's text", max_len=4_000_000),
                 Field("role", "str", "the message's role for a chat model (user, system...)", default="user",
                       max_len=64)),
        reply=TURN,
        errors=(E.ESRCH, E.EPERM, E.EINVAL, E.EBUSY, E.E2BIG, E.EDQUOT, E.EIO),
        streams=True,
        chunk=(Field("text", "str", "new text"), Field("token_ids", "list[int]", "new token ids")),
    ),
    Syscall(
        24, "close", "End a session (or any process, as TERM does) and return its result; reaps it.",
        access=TARGET_OWNER,
        request=(PID,),
        reply=RESULT,
        errors=(E.ESRCH, E.EPERM, E.EINVAL),
    ),
)

# -- the namespace (issue 9): files in the store, and the kernel's log ring ----------------------------------
FS_PATH_MAX = 4096  # bytes of a path (UTF-8); each part at most 255
FS_DATA_MAX = 8 * 2**20  # bytes of one fs_put frame's data (the client sends 4 MiB per frame)
FS_PIECE = 2**20  # bytes of file data in one fs_get frame
LOG_LINES_MAX = 10_000  # lines the kernel's log ring keeps (and the most one dmesg returns)
FS_PATH = Field("path", "str", "an absolute path under /models, /data, /proc, /home or /var/log (no '..', no empty "
                "part, no NUL; each part at most 255 bytes, the whole at most 4096 bytes)", max_len=FS_PATH_MAX)
FS_STAT: tuple[Field, ...] = (
    Field("path", "str", "the normalised path"),
    Field("kind", "str", "file or dir (directories are implied by the paths under them)"),
    Field("size", "int", "bytes of a file; entries of a directory"),
    Field("owner", "str", "the user who wrote the file (the kernel's own files: 'kernel'; a directory: '')"),
    Field("mtime", "float", "unix time of the last write (a directory: 0)"),
    Field("extents", "list[int]", "the file's extents, in bytes, in order (each contiguous in the store's map)"),
)

SYSCALLS = SYSCALLS + (
    Syscall(
        30, "fs_put", "Write a file: one call with `last` true and no `upload` replaces the file atomically; a "
        "bigger value goes as an upload (`last` false starts or continues it, the reply's `upload` id continues "
        "it, `last` true commits it; nothing is visible before the commit). An upload belongs to the connection "
        "that began it. Who may write: " + FS_RULES + ".",
        access=BY_PATH,
        request=(
            FS_PATH,
            Field("data", "bytes", "the bytes to write (appended to the upload when there is one)", default=b"",
                  max_len=FS_DATA_MAX),
            Field("upload", "int", "null: a new write (a whole-file put when `last` is true); an id from an "
                  "earlier reply: continue that upload (of this connection, on the same path)", nullable=True,
                  min=1, max=2**63 - 1),
            Field("new_extent", "bool", "start a new extent with this data (an extent is contiguous in the map: "
                  "one per tensor lets a model load zero-copy)", default=False),
            Field("last", "bool", "commit: the path now names everything sent; false: more data follows",
                  default=True),
        ),
        reply=(Field("upload", "int", "the upload id to continue with, while `last` is false; null once committed",
                     nullable=True), *FS_STAT),
        errors=(E.EPERM, E.EINVAL, E.ENOENT, E.ENOSPC, E.EIO, E.E2BIG, E.EAGAIN),
    ),
    Syscall(
        31, "fs_get", "Read a byte range of a file: pieces of at most 1 MiB as chunk frames, the last piece in the "
        "reply (a range of 1 MiB or less is one frame). The range is read from one snapshot of the store. Who "
        "may read: " + FS_RULES + ".",
        access=BY_PATH,
        request=(
            FS_PATH,
            Field("offset", "int", "first byte of the range", default=0, min=0, max=2**63 - 1),
            Field("length", "int", "bytes in the range; null: to the end of the file (a range past the end is "
                  "cut there)", nullable=True, min=0, max=2**63 - 1),
        ),
        reply=(Field("path", "str"), Field("size", "int", "the file's size in bytes"),
               Field("mtime", "float", "the file's mtime (unix): a reader of several ranges sees a replacement"),
               Field("offset", "int", "first byte of the range"),
               Field("length", "int", "bytes in the whole range (chunks and the reply's data)"),
               Field("data", "bytes", "the range's last piece (at most 1 MiB)")),
        errors=(E.ENOENT, E.EPERM, E.EINVAL, E.EIO),
        streams=True,
        chunk=(Field("data", "bytes", "the next piece of the range, at most 1 MiB, in order"),),
    ),
    Syscall(
        32, "fs_list", "List a directory: its immediate children, sorted by name (a subdirectory is one entry). "
        "'/' lists the namespaces. Who may: whoever may read the directory (" + FS_RULES + ").",
        access=BY_PATH,
        request=(FS_PATH, Field("limit", "int", "most entries to return", default=1000, min=1,
                                max=LOG_LINES_MAX)),
        reply=(Field("path", "str"),
               Field("entries", "list[map]", "one stat per child: " + ", ".join(f.name for f in FS_STAT)),
               Field("truncated", "bool", "more entries exist than `limit`")),
        errors=(E.ENOENT, E.EPERM, E.EINVAL, E.EIO),
    ),
    Syscall(
        33, "fs_remove", "Remove a file, or with `recursive` a directory and everything under it (in one "
        "transaction). Who may: whoever may write the path (" + FS_RULES + "); in /data, a recursive remove "
        "needs every file under it to be the caller's (or the caller to be the admin).",
        access=BY_PATH,
        request=(FS_PATH, Field("recursive", "bool", "remove everything under the path", default=False)),
        reply=(Field("path", "str"), Field("removed", "int", "files removed")),
        errors=(E.ENOENT, E.EPERM, E.EINVAL, E.ENOSPC, E.EIO),
    ),
    Syscall(
        34, "fs_stat", "A file's or directory's stat: kind, size, owner, mtime, extents. Who may: whoever may "
        "read the path (" + FS_RULES + ").",
        access=BY_PATH,
        request=(FS_PATH,),
        reply=FS_STAT,
        errors=(E.ENOENT, E.EPERM, E.EINVAL, E.EIO),
    ),
    Syscall(
        35, "dmesg", "The kernel's log ring (/var/log/kernel; the last 10,000 lines survive restarts): the last "
        "`n` lines, or those after `since`; with `follow`, new lines stream as chunk frames until the caller "
        "goes away. Everyone may read it.",
        access=ANY_USER,
        request=(
            Field("n", "int", "how many of the newest lines", default=100, min=0, max=LOG_LINES_MAX),
            Field("since", "int", "return the lines with a seq after this one instead (the reply's `seq` "
                  "continues where a call left off)", nullable=True, min=0, max=2**63 - 1),
            Field("follow", "bool", "after the lines, stream each new line as it is logged (the call does not "
                  "end by itself)", default=False),
        ),
        reply=(Field("lines", "list[str]", "log lines, oldest first: JSON objects {seq, ts (unix), level, "
                     "component, event, ...}"),
               Field("seq", "int", "the newest line's seq (0 when the log is empty)")),
        errors=(E.EINVAL,),
        streams=True,
        chunk=(Field("lines", "list[str]", "log lines, as in the reply"),),
    ),
)

# -- moving in the namespace (issue 9): what makes an import atomic ------------------------------------------
SYSCALLS = SYSCALLS + (
    Syscall(
        37, "fs_rename", "Move a file, or a directory and everything under it, to another path in one transaction "
        "(no data is copied; owners and mtimes stay): readers see the old tree or the new one, never a mix. What "
        "`dst` holds is removed first (its data freed) when `replace`, else EEXIST. Who may: whoever may remove "
        "every file under `src` and write `dst` (" + FS_RULES + "); in /data, replacing needs every file under "
        "`dst` to be the caller's (or the caller to be the admin). EBUSY while either path holds a loaded store "
        "model.",
        access=BY_PATH,
        request=(
            Field("src", "str", "the file or directory to move (a path as in fs_put)", max_len=FS_PATH_MAX),
            Field("dst", "str", "where it goes: `src/a/b` becomes `dst/a/b`", max_len=FS_PATH_MAX),
            Field("replace", "bool", "remove what `dst` holds first (false: EEXIST when it holds something)",
                  default=False),
        ),
        reply=(Field("src", "str"), Field("dst", "str"), Field("moved", "int", "files moved")),
        errors=(E.ENOENT, E.EEXIST, E.EPERM, E.EINVAL, E.EBUSY, E.ENOSPC, E.EIO),
    ),
)

# -- evaluation (issue 9): what a model makes of a text ------------------------------------------------------
SCORE_TOKENS_MAX = 1_000_000  # tokens one score takes: its reply (ids and log-probabilities) fits one frame

SYSCALLS = SYSCALLS + (
    Syscall(
        36, "score", "Token log-probabilities of a text under a model, for perplexity: the natural log-probability "
        "of each token given those before it (the first token has no context and is not scored). A text longer "
        "than the model's context is scored with a sliding window (windows of the context's length, every half "
        "context; each token is scored once, with at least half a context before it). Computed by the model's "
        "worker between generation steps, one window at a time, with the model's plain forward and a float32 "
        "log_softmax. Everyone may score.",
        access=ANY_USER,
        request=(
            MODEL,
            Field("text", "str", "the text (exactly one of text and prompt_ids)", nullable=True, max_len=4_000_000),
            Field("prompt_ids", "list[int]", "the text as token ids (exactly one of text and prompt_ids)",
                  nullable=True, max_len=SCORE_TOKENS_MAX),
            Field("add_special_tokens", "bool", "tokenise the text as a prompt, with the tokens the model adds (a "
                  "BOS: the text's first token is then scored too)", default=True),
        ),
        reply=(
            Field("model", "str", "the resolved model"),
            Field("tokens", "int", "tokens of the text"),
            Field("token_ids", "list[int]", "the text's token ids"),
            Field("logprobs", "list[float]", "natural log-probability of each token after the first (tokens - 1 "
                  "values, in order)"),
            Field("nll", "float", "negative log-likelihood: minus the sum of logprobs, in nats (perplexity is "
                  "exp(nll / (tokens - 1)))"),
            Field("windows", "int", "forward passes the sliding window took"),
            Field("stride", "int", "tokens between the windows' starts (half the context)"),
        ),
        errors=(E.EINVAL, E.ENOENT, E.E2BIG, E.EIO, E.ENOMEM),
    ),
)

# -- users (issue 10): the CURVE keys the admin authorises for tcp clients -----------------------------------
USER_KEY = (Field("user", "str"), Field("key", "str", "the public key (Z85, 40 characters)"),
            Field("fingerprint", "str", "the key's short name: 16 hex digits of its SHA-256"),
            Field("added", "float", "unix time the key was authorised"))

SYSCALLS = SYSCALLS + (
    Syscall(
        40, "user_add", "Authorise a CURVE public key for a user: a tcp client holding its secret key is that user "
        "(keys/authorized under the kernel's home). The admin's.",
        access=ADMIN_ONLY,
        request=(Field("user", "str", "the user the key stands for", **USER_NAME),
                 Field("key", "str", "the public key, Z85 (40 characters)", max_len=40)),
        reply=USER_KEY,
        errors=(E.EPERM, E.EINVAL, E.EEXIST),
    ),
    Syscall(
        41, "user_list", "The authorised CURVE keys and the users they stand for. The admin's.",
        access=ADMIN_ONLY,
        request=(),
        reply=(Field("keys", "list[map]", "one per key: " + ", ".join(f.name for f in USER_KEY)),),
        errors=(E.EPERM,),
    ),
    Syscall(
        42, "user_remove", "Withdraw a user's CURVE keys (all, or the one named): the kernel refuses the next "
        "call of a connection that used one (EPERM) and new handshakes with it. The admin's.",
        access=ADMIN_ONLY,
        request=(Field("user", "str", "the user", **USER_NAME),
                 Field("key", "str", "only this key (Z85 or its fingerprint); null: every key of the user",
                       nullable=True, max_len=40)),
        reply=(Field("user", "str"), Field("removed", "int", "keys withdrawn")),
        errors=(E.EPERM, E.ENOENT, E.EINVAL),
    ),
    Syscall(
        43, "prometheus", "The kernel's metrics in the Prometheus text exposition format (0.0.4): process counts "
        "by state, KV blocks, batch sizes, device memory, counters of tokens, preemptions and swaps, histograms "
        "of TTFT, TPOT, queue time and latency, per model (docs/operations.md, Metrics). What `kernel start "
        "--metrics-port` serves over HTTP; no process text, no owner names.",
        access=ANY_USER,
        request=(),
        reply=(Field("text", "str", "the exposition text"),),
        errors=(),
    ),
)

BY_NAME: dict[str, Syscall] = {s.name: s for s in SYSCALLS}
BY_NR: dict[int, Syscall] = {s.nr: s for s in SYSCALLS}
assert len(BY_NAME) == len(SYSCALLS) and len(BY_NR) == len(SYSCALLS), "duplicate syscall name or number"
assert all(isinstance(s.access, Access) for s in SYSCALLS), "every syscall states who may call it"


def lookup(call: object) -> Syscall:
    """Find a syscall by name or number; ENOSYS when there is none."""
    if isinstance(call, str) and call in BY_NAME:
        return BY_NAME[call]
    if isinstance(call, int) and not isinstance(call, bool) and call in BY_NR:
        return BY_NR[call]
    raise NoSuchSyscall(f"no syscall {quote(call)}")
