import pytest

from llmos.drivers.storage import normpath
from llmos.syscalls.errors import InvalidArgument


@pytest.mark.parametrize("given, canonical", [
    ("/", "/"), ("//", "/"), ("/a", "/a"), ("/a/", "/a"), ("/a//b/./c/", "/a/b/c"), ("/./x", "/x"),
    ("/home/ü/日本.txt", "/home/ü/日本.txt"), ("/a/" + "n" * 255, "/a/" + "n" * 255),
])
def test_normpath_gives_the_canonical_absolute_form(given, canonical):
    assert normpath(given) == canonical


@pytest.mark.parametrize("bad, says", [
    ("a/b", "relative"), ("", "relative"), ("/a/../b", ".."), ("/..", ".."), ("/a\0b", "NUL"),
    ("/a/" + "n" * 256, "over 255"), ("/" + "/".join(["abcdefg"] * 600), "limit"), (b"/a", "string"),
    (None, "string"), ("/a\udc80", "Unicode"), ("/" + "é" * 128, "over 255"),
])
def test_normpath_rejects_what_could_escape_or_overflow(bad, says):
    with pytest.raises(InvalidArgument) as err:
        normpath(bad)
    assert says in err.value.message
