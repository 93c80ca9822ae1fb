"""Acting for another user (kernel/delegation.py): who may, for whom, and what the call then is."""

import pytest

from llmos.kernel.delegation import DELEGATED, Delegation, parse_delegates
from llmos.kernel.handlers import Caller
from llmos.syscalls.errors import InvalidArgument, NotPermitted

ADMINS = frozenset({"root", "owner"})
RULES = Delegation(parse_delegates("gw;svc=alice,bob"), ADMINS)


def test_a_delegate_spec_names_accounts_and_optionally_their_users():
    assert parse_delegates("gw; svc=alice,bob ;") == {"gw": None, "svc": frozenset({"alice", "bob"})}
    assert parse_delegates(None) == {} and parse_delegates("") == {}


@pytest.mark.parametrize("bad", ["svc=", "=alice", "svc=al ice", "g w", ".gw", "svc=alice,+x"])
def test_a_bad_delegate_spec_says_what_is_wrong(bad):
    with pytest.raises(ValueError, match="expected NAME"):
        parse_delegates(bad)


def test_a_named_delegate_acts_for_any_user_but_an_admin():
    assert RULES.check("gw", False, "alice") == "alice"
    assert RULES.check("gw", False, "zed") == "zed"
    for admin in ADMINS:
        with pytest.raises(NotPermitted, match="an admin acts only for itself"):
            RULES.check("gw", False, admin)


def test_a_delegate_with_a_list_acts_only_for_those_users():
    assert RULES.check("svc", False, "bob") == "bob"
    with pytest.raises(NotPermitted, match="only for alice, bob, not carol"):
        RULES.check("svc", False, "carol")


def test_anyone_else_may_act_only_for_itself_and_the_admin_for_anyone():
    assert RULES.check("alice", False, "alice") == "alice"
    with pytest.raises(NotPermitted, match="--delegate alice"):
        RULES.check("alice", False, "bob")
    assert RULES.check("owner", True, "root") == "root"
    assert RULES.check("root", True, "alice") == "alice"


@pytest.mark.parametrize("target", [None, 5, "", "a b", "x" * 65, "-x"])
def test_a_target_that_is_not_a_user_name_is_einval(target):
    with pytest.raises(InvalidArgument, match="'for' must be a user name"):
        RULES.check("root", True, target)


def test_a_call_made_for_a_user_is_that_users_never_the_admins_and_names_its_delegate():
    gw = Caller(b"c", "gw", admin=False, transport="curve")
    alice = gw.acting_for("alice", RULES)
    assert (alice.user, alice.admin, alice.transport, alice.uid, alice.by) == ("alice", False, DELEGATED, None, "gw")
    assert alice.identity == b"c"
    root = Caller(b"r", "root", admin=True, transport="ipc", uid=0)
    assert root.acting_for("alice", RULES).admin is False
    assert root.acting_for("owner", RULES).admin is True  # the admin acting for the admin stays the admin
    assert gw.acting_for("gw", RULES) is gw  # for itself: the connection's own caller, uid and transport kept
