"""The outbox without sockets: order, merging while the reader lags, byte accounting, refused sends kept."""

from llmos.kernel.outbox import Outbox
from llmos.syscalls import codec


class Socket:
    """A send callable that takes ``room`` frames, then refuses (EAGAIN) until given more room."""

    def __init__(self, room: int = 0) -> None:
        self.room, self.got = room, []

    def __call__(self, frame: bytes) -> bool:
        if self.room <= 0:
            return False
        self.room -= 1
        self.got.append(codec.decode(frame))
        return True


def test_chunks_of_one_request_merge_while_the_reader_lags_and_the_final_comes_last():
    box, sock = Outbox(), Socket()
    for i in range(1000):
        box.chunk(7, {"text": f"t{i} ", "token_ids": [i]})
    box.final(7, codec.ok(7, {"done": True}))
    assert len(box) == 2 and box.flush(sock) == 0  # one merged chunk and the final, both kept
    sock.room = 10
    assert box.flush(sock) == 2 and not box and box.bytes == 0
    [chunk, final] = sock.got
    assert chunk["data"]["text"] == "".join(f"t{i} " for i in range(1000))
    assert chunk["data"]["token_ids"] == list(range(1000)) and final == {"id": 7, "t": "ok", "result": {"done": True}}


def test_streams_of_different_requests_keep_their_own_order():
    box, sock = Outbox(), Socket()
    box.chunk(1, {"text": "a"})
    box.chunk(2, {"text": "x"})
    box.chunk(1, {"text": "b"})
    box.final(2, codec.ok(2, 0))
    box.chunk(1, {"text": "c"})
    sock.room = 99
    box.flush(sock)
    by_id = {}
    for f in sock.got:
        by_id.setdefault(f["id"], []).append(f["data"]["text"] if f["t"] == "chunk" else "END")
    assert by_id == {1: ["abc"], 2: ["x", "END"]}


def test_a_refused_frame_is_kept_first_in_line_and_later_chunks_start_a_new_one():
    box, sock = Outbox(), Socket()
    box.chunk(1, {"text": "ab"})
    assert box.flush(sock) == 0 and len(box) == 1
    box.chunk(1, {"text": "cd"})  # the refused chunk is frozen as sent; this one is new
    sock.room = 1
    assert box.flush(sock) == 1 and [f["data"]["text"] for f in sock.got] == ["ab"]
    sock.room = 1
    box.flush(sock)
    assert [f["data"]["text"] for f in sock.got] == ["ab", "cd"] and box.bytes == 0


def test_bytes_count_what_is_held_and_a_merged_chunk_never_outgrows_its_cap():
    box = Outbox(max_chunk_bytes=1000)
    for _ in range(100):
        box.chunk(3, {"text": "x" * 100, "token_ids": [1]})
    assert 10_000 < box.bytes < 20_000  # the text and ids held, plus a little per part
    assert len(box) >= 11  # about nine parts a chunk: the cap splits the stream into several frames
    sock = Socket(room=1000)
    box.flush(sock)
    assert all(len(codec.chunk(3, f["data"])) <= 1100 for f in sock.got)
    assert "".join(f["data"]["text"] for f in sock.got) == "x" * 10_000


def test_one_chunk_bigger_than_the_cap_is_split_in_order():
    box, sock = Outbox(max_chunk_bytes=4096), Socket(room=10_000)
    text, ids = "é" * 50_000, list(range(20_000))
    box.chunk(4, {"text": text, "token_ids": ids})
    box.flush(sock)
    assert len(sock.got) > 10
    assert "".join(f["data"]["text"] for f in sock.got) == text
    assert [i for f in sock.got for i in f["data"]["token_ids"]] == ids


def test_a_send_that_raises_leaves_the_frame_queued_for_the_caller_to_drop():
    box = Outbox()
    box.final(1, codec.ok(1, 1))

    def gone(frame):
        raise ConnectionError

    try:
        box.flush(gone)
    except ConnectionError:
        pass
    assert len(box) == 1
    box.clear()
    assert not box and box.bytes == 0
