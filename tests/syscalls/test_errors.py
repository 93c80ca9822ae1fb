from llmos import LLMOSError, NoSuchProcess
from llmos.syscalls.errors import Errno, error_from_errno


def test_an_errno_from_the_wire_becomes_the_class_named_by_its_fault():
    err = error_from_errno(3, "no process 9")
    assert isinstance(err, NoSuchProcess) and isinstance(err, LLMOSError)
    assert err.errno is Errno.ESRCH and "no process 9" in str(err)


def test_an_unknown_errno_still_becomes_an_llmos_error():
    err = error_from_errno(9999, "strange")
    assert type(err) is LLMOSError and "9999" in err.message


def test_every_errno_has_its_own_class():
    for code in Errno:
        assert error_from_errno(int(code), "x").errno is code
