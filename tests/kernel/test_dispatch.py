"""Dispatch without sockets: frames in, frames out; every request ends in exactly one final frame."""

import asyncio
from types import SimpleNamespace

import msgpack
import pytest

from llmos.kernel.dispatch import dispatch
from llmos.kernel.handlers import Caller, Handlers
from llmos.syscalls import codec, protocol


class Collected:
    """The Replies protocol, recorded."""

    def __init__(self) -> None:
        self.frames: list[dict] = []
        self.finals = 0

    def chunk(self, rid, data) -> None:
        self.frames.append(codec.decode(codec.chunk(rid, data)))

    def final(self, rid, frame: bytes) -> None:
        self.finals += 1
        msg = codec.decode(frame)
        assert msg["id"] == rid
        self.frames.append(msg)


def call(frame: bytes, handlers=None, caller=None) -> list[dict]:
    out = Collected()
    # hello and ping need only the kernel's start time
    asyncio.run(dispatch(handlers or Handlers(kernel=SimpleNamespace(started=1.0)), caller or Caller(b"id", "ann"),
                         frame, out))
    assert out.finals == 1, out.frames
    return out.frames


class Fake(Handlers):
    """Handlers whose results the test chooses."""

    def __init__(self, result=None, chunks=()) -> None:
        super().__init__(kernel=None)
        self.result, self.chunks = result, chunks

    async def sys_ps(self, caller, args, emit):
        for c in self.chunks:
            await emit(c)
        return self.result


def test_ping_answers_ok_with_the_request_id():
    [reply] = call(codec.request(5, "ping", {}))
    assert reply["id"] == 5 and reply["t"] == "ok" and "time" in reply["result"]


def test_syscalls_may_be_called_by_number():
    [reply] = call(codec.request(6, 1, {}))
    assert reply["t"] == "ok"


def test_hello_with_another_protocol_version_is_eproto():
    [reply] = call(codec.request(1, "hello", {"version": 99}))
    assert reply["t"] == "err" and reply["error"] == "EPROTO"


def test_hello_cannot_choose_a_user_the_transport_did_not_prove():
    """Regression (the identity spoof): `hello {"user": "root"}` from another user is EPERM, and the caller is
    still who its transport says."""
    caller = Caller(b"id", "alice", False, "ipc")
    [spoof] = call(codec.request(1, "hello", {"version": 1, "user": "root"}), caller=caller)
    assert spoof["error"] == "EPERM" and "alice" in spoof["message"]
    [bad] = call(codec.request(2, "hello", {"version": 1, "user": "has space"}), caller=caller)
    assert bad["error"] == "EINVAL"
    [good] = call(codec.request(3, "hello", {"version": 1, "user": "alice"}), caller=caller)
    assert good["t"] == "ok" and caller.user == "alice"
    assert {k: good["result"][k] for k in ("user", "admin", "transport")} == {"user": "alice", "admin": False,
                                                                              "transport": "ipc"}


class Owned(Handlers):
    """Handlers over a process table of one process, 7, owned by alice; each call records that it ran."""

    def __init__(self) -> None:
        super().__init__(kernel=None)
        self.ran: list[str] = []

    async def owner_of(self, pid):
        from llmos.syscalls.errors import NoSuchProcess

        if pid != 7:
            raise NoSuchProcess(f"no process {pid}")
        return "alice"

    async def sys_stat(self, caller, args, emit):
        self.ran.append("stat")
        return {"pid": 7}

    async def sys_shutdown(self, caller, args, emit):
        self.ran.append("shutdown")
        return {"stopping": True}

    async def sys_model_load(self, caller, args, emit):
        self.ran.append("model_load")
        return {}


ALICE, BOB, ROOT = Caller(b"a", "alice", False, "ipc"), Caller(b"b", "bob", False, "ipc"), Caller(b"r", "root", True,
                                                                                                     "ipc")


def test_the_dispatcher_enforces_the_tables_access_rule_before_the_handler_runs():
    h = Owned()
    [other] = call(codec.request(1, "stat", {"pid": 7}), handlers=h, caller=BOB)
    assert other["error"] == "EPERM" and "belongs to alice" in other["message"] and h.ran == []
    [missing] = call(codec.request(2, "stat", {"pid": 8}), handlers=h, caller=BOB)
    assert missing["error"] == "ESRCH" and h.ran == []
    [down] = call(codec.request(3, "shutdown", {}), handlers=h, caller=BOB)
    assert down["error"] == "EPERM" and h.ran == []
    [load] = call(codec.request(4, "model_load", {"kv_blocks": 100}), handlers=h, caller=BOB)
    assert load["error"] == "EPERM" and "kv_blocks=100" in load["message"] and h.ran == []
    for caller in (ALICE, ROOT):
        assert call(codec.request(5, "stat", {"pid": 7}), handlers=h, caller=caller)[0]["t"] == "ok"
    assert call(codec.request(6, "model_load", {}), handlers=h, caller=BOB)[0]["t"] == "ok"  # no options: anyone
    assert call(codec.request(7, "model_load", {"kv_blocks": 100}), handlers=h, caller=ROOT)[0]["t"] == "ok"
    assert call(codec.request(8, "shutdown", {}), handlers=h, caller=ROOT)[0]["t"] == "ok"
    assert h.ran == ["stat", "stat", "model_load", "model_load", "shutdown"]


def test_refused_calls_and_admin_actions_are_audited_with_the_user(capsys):
    h = Owned()
    call(codec.request(1, "shutdown", {}), handlers=h, caller=BOB)
    call(codec.request(2, "stat", {"pid": 7}), handlers=h, caller=ROOT)  # the admin on alice's process
    call(codec.request(3, "stat", {"pid": 7}), handlers=h, caller=ALICE)  # her own: not an admin action
    lines = [ln for ln in capsys.readouterr().err.splitlines() if '"audit"' in ln]
    assert len(lines) == 2, lines
    assert '"refused"' in lines[0] and '"bob"' in lines[0] and '"shutdown"' in lines[0]
    assert '"admin_action"' in lines[1] and '"root"' in lines[1] and "process 7 of alice" in lines[1]


def test_an_unknown_syscall_is_enosys():
    [reply] = call(codec.request(2, "fork_bomb", {}))
    assert (reply["id"], reply["error"]) == (2, "ENOSYS")


def test_wrong_argument_types_are_einval_with_the_request_id():
    [reply] = call(codec.request(3, "wait", {"pid": "one"}))
    assert (reply["id"], reply["error"], reply["errno"]) == (3, "EINVAL", 22)


def test_undecodable_bytes_get_an_eproto_reply_without_an_id():
    [reply] = call(b"\xc1\xc1\xc1")
    assert reply["id"] is None and reply["error"] == "EPROTO"


def test_a_frame_that_is_not_a_map_is_eproto():
    [reply] = call(msgpack.packb([1, 2, 3]))
    assert reply["error"] == "EPROTO"


def test_a_request_with_the_wrong_envelope_version_keeps_its_id():
    [reply] = call(msgpack.packb({"v": 42, "id": 9, "call": "ping", "args": {}}))
    assert (reply["id"], reply["error"]) == (9, "EPROTO")


def test_a_handler_that_crashes_becomes_eio_not_a_dead_bus():
    # kernel=None makes kernel_info fail inside the handler
    [reply] = call(codec.request(4, "kernel_info", {}))
    assert reply["error"] == "EIO" and "internal kernel error" in reply["message"]


def test_a_crash_whose_exception_carries_a_clients_input_is_reported_short():
    class Crashing(Handlers):
        async def sys_ping(self, caller, args, emit):
            raise OSError(36, "File name too long", "/" + "a" * 5000)  # as pathlib reports a client's path

    [reply] = call(codec.request(5, "ping", {}), Crashing(kernel=None))
    assert reply["error"] == "EIO" and "OSError" in reply["message"] and len(reply["message"]) < 300


@pytest.mark.parametrize("request_", [
    {"v": 1, "id": 8, "call": "x" * 4_000_000, "args": {}},
    {"v": 1, "id": 8, "call": "kill", "args": {"pid": 1, "signal": "S" * 4_000_000}},
    {"v": 1, "id": 8, "call": "ping", "args": {"k" * 4_000_000: 1, "j" * 4_000_000: 2}},
    {"v": "v" * 4_000_000, "id": 8, "call": "ping", "args": {}},
    {"v": 1, "id": 8, "call": list(range(100_000)), "args": {}},
], ids=["call name", "signal", "field names", "version", "a list as call"])
def test_an_error_quotes_a_short_prefix_of_a_huge_input(request_):
    [reply] = call(msgpack.packb(request_))
    assert reply["id"] == 8 and reply["t"] == "err" and len(reply["message"]) < 400, reply["message"][:500]


def test_a_result_too_big_for_a_frame_becomes_emsgsize_with_the_id():
    [reply] = call(codec.request(12, "ps", {}), handlers=Fake({"processes": ["x" * (6 * 2**20)] * 3}))
    assert (reply["id"], reply["t"], reply["error"]) == (12, "err", "EMSGSIZE")


def test_a_result_with_a_string_over_the_string_bound_becomes_emsgsize():
    [reply] = call(codec.request(12, "ps", {}), handlers=Fake({"x": "y" * (protocol.MAX_STR_BYTES + 1)}))
    assert (reply["id"], reply["error"]) == (12, "EMSGSIZE")


def test_a_result_that_cannot_be_encoded_becomes_eio_with_the_id():
    [reply] = call(codec.request(13, "ps", {}), handlers=Fake({"x": object()}))
    assert (reply["id"], reply["error"]) == (13, "EIO")


def test_chunks_come_before_the_one_final_frame():
    frames = call(codec.request(14, "ps", {}), handlers=Fake({"done": 1}, chunks=[{"text": "a"}, {"text": "b"}]))
    assert [f["t"] for f in frames] == ["chunk", "chunk", "ok"] and {f["id"] for f in frames} == {14}


@pytest.mark.parametrize("frame, rid, error", [
    (msgpack.packb({"id": 21, "v": 1, "call": "ping", "args": {"p": "x" * (protocol.MAX_FRAME_BYTES + 1)}}),
     21, "EMSGSIZE"),
    (msgpack.packb({"v": 1, "call": "ping", "args": {"p": [0] * (protocol.MAX_ARRAY_LEN + 1)}, "id": 22}),
     22, "EMSGSIZE"),
    (msgpack.packb({"args": {str(i): i for i in range(protocol.MAX_MAP_LEN + 1)}, "id": 23, "v": 1}), 23, "EMSGSIZE"),
    (msgpack.packb({"id": 24, "v": 1, "call": "ping", "args": {"s": "y" * 100}})[:-30], 24, "EPROTO"),
    (msgpack.packb({"v": 1, "call": "ping", "id": True, "args": {"p": "x" * (protocol.MAX_STR_BYTES + 1)}}),
     None, "EMSGSIZE"),
])
def test_a_frame_over_a_bound_or_cut_short_is_answered_with_its_id_when_readable(frame, rid, error):
    [reply] = call(frame)
    assert (reply["id"], reply["error"]) == (rid, error)


def test_protocol_version_is_one():
    assert protocol.PROTOCOL_VERSION == 1


def _delegating() -> Owned:
    from llmos.kernel.delegation import Delegation, parse_delegates

    h = Owned()
    h.k = SimpleNamespace(started=1.0, delegation=Delegation(parse_delegates("gw=alice"), frozenset({"root"})))
    return h


GW = Caller(b"g", "gw", False, "curve")


def test_a_delegate_s_call_for_a_user_is_checked_as_that_users_own_call():
    h = _delegating()
    [mine] = call(codec.request(1, "stat", {"pid": 7}, act_for="alice"), handlers=h, caller=GW)
    assert mine["t"] == "ok" and h.ran == ["stat"]
    [own] = call(codec.request(2, "stat", {"pid": 7}), handlers=h, caller=GW)  # as itself: not alice's process
    assert own["error"] == "EPERM" and "belongs to alice, not gw" in own["message"]
    [hello] = call(codec.request(3, "hello", {"version": protocol.PROTOCOL_VERSION}, act_for="alice"), handlers=h,
                   caller=GW)
    assert (hello["result"]["user"], hello["result"]["by"], hello["result"]["transport"]) == ("alice", "gw",
                                                                                              "delegated")


def test_acting_for_a_user_one_may_not_is_eperm_audited_and_runs_nothing(capsys):
    h = _delegating()
    [bob] = call(codec.request(1, "stat", {"pid": 7}, act_for="bob"), handlers=h, caller=GW)
    assert bob["error"] == "EPERM" and "only for alice, not bob" in bob["message"]
    [alice] = call(codec.request(2, "stat", {"pid": 7}, act_for="bob"), handlers=h, caller=ALICE)
    assert alice["error"] == "EPERM" and "--delegate alice" in alice["message"]
    [bad] = call(codec.request(3, "ping", {}, act_for=["x"]), handlers=h, caller=GW)
    assert bad["error"] == "EINVAL" and bad["id"] == 3
    assert h.ran == []
    lines = [ln for ln in capsys.readouterr().err.splitlines() if '"refused"' in ln]
    assert len(lines) == 2 and '"gw"' in lines[0] and '"alice"' in lines[1]
