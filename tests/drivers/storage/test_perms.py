"""may() is the permissions table of storage-api.md, row by row."""

import pytest

from llmos.drivers.storage import may
from llmos.syscalls.errors import InvalidArgument, NotPermitted

ADMINS = {"root"}
OK, EPERM, EINVAL = "ok", "EPERM", "EINVAL"

TABLE = [
    # user, op, path, owner_of_file, expected
    ("alice", "read", "/home/alice/notes", "alice", OK),
    ("alice", "write", "/home/alice/notes", None, OK),
    ("root", "read", "/home/alice/notes", "alice", OK),
    ("root", "write", "/home/alice/notes", "alice", OK),
    ("bob", "read", "/home/alice/notes", "alice", EPERM),
    ("bob", "write", "/home/alice/new", None, EPERM),
    ("bob", "read", "/models/tiny/config.json", "root", OK),
    ("bob", "write", "/models/tiny/config.json", None, EPERM),
    ("root", "write", "/models/tiny/config.json", "root", OK),
    ("bob", "read", "/data/corpus", "alice", OK),
    ("bob", "write", "/data/new", None, OK),
    ("bob", "write", "/data/corpus", "alice", EPERM),
    ("alice", "write", "/data/corpus", "alice", OK),
    ("root", "write", "/data/corpus", "alice", OK),
    ("alice", "read", "/proc/7/result", "alice", OK),
    ("bob", "read", "/proc/7/result", "alice", EPERM),
    ("root", "read", "/proc/7/result", "alice", OK),
    ("bob", "read", "/proc/7", None, OK),
    ("alice", "write", "/proc/7/result", "alice", EPERM),
    ("root", "write", "/proc/7/result", "alice", EPERM),
    ("alice", "remove", "/proc/7/capture/attentions/0.npy", "alice", OK),  # frees her capture quota
    ("root", "remove", "/proc/7/capture/index.json", "alice", OK),
    ("bob", "remove", "/proc/7/capture/index.json", "alice", EPERM),
    ("alice", "remove", "/proc/7/result", "alice", EPERM),
    ("alice", "write", "/proc/7/capture/x.npy", "alice", EPERM),
    ("bob", "remove", "/data/corpus", "alice", EPERM),
    ("alice", "remove", "/data/corpus", "alice", OK),
    ("bob", "read", "/var/log/kernel", "kernel", OK),
    ("root", "write", "/var/log/kernel", "kernel", EPERM),
    ("bob", "read", "/", None, OK),
    ("bob", "read", "/home", None, OK),
    ("bob", "write", "/home", None, EPERM),
    ("root", "write", "/models", None, EPERM),
    ("bob", "read", "/etc/passwd", None, EINVAL),
    ("root", "write", "/tmp/x", None, EINVAL),
    ("bob", "read", "/var/lib", None, EINVAL),
    ("bob", "delete", "/home/bob/x", None, EINVAL),
    ("bob", "read", "/home/bob/../alice/x", None, EINVAL),
]


@pytest.mark.parametrize("user, op, path, owner, expected", TABLE)
def test_may_follows_the_permissions_table(user, op, path, owner, expected):
    if expected == OK:
        assert may(user, op, path, ADMINS, owner) is None
    else:
        with pytest.raises(NotPermitted if expected == EPERM else InvalidArgument) as err:
            may(user, op, path, ADMINS, owner)
        assert err.value.errno.name == expected and err.value.message


def test_a_refusal_names_the_rule():
    with pytest.raises(NotPermitted, match="only the admin writes /models"):
        may("bob", "write", "/models/x", ADMINS, None)
    with pytest.raises(InvalidArgument, match="no such namespace.*/models, /data, /proc, /home, /var/log"):
        may("bob", "read", "/srv", ADMINS, None)
