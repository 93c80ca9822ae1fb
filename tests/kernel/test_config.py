"""The kernel's configuration table: every flag parses its range and refuses the rest by name; so does a
config made in code."""

import argparse
import math

import pytest

from llmos.kernel import config
from llmos.kernel.config import FLAGS, KernelConfig, parse_size
from llmos.kernel.main import build_parser

# for each kind of parser: text the command line may hold that must be refused
BAD_TEXT = {
    config._IntIn: ["", "x", "1.5", "1e3", "nan", "-1", "0", "99999999999"],
    config._FloatIn: ["", "x", "nan", "inf", "-inf", "-1", "1e30"],
    config._SizeIn: ["", "banana", "G", "12Q", "nan", "inf", "1e400", "-5G", "0", "0.5", "1K"],
    config._Choice: ["", "x", "STATIC", "static "],
    config._Quotas: ["x", "alice", ":procs=1", "alice:procs", "alice:procs=-1", "alice:cpu=3", "alice:tpm=1.5"],
    config._Addresses: ["", " ", "x", "http://h:1", "tcp://h", "tcp://h:0", "ipc://relative", "tcp://h:1,"],
    config._Group: ["", "no-such-group-llmos", "root "],
    config._Delegates: ["=alice", "gw=", "g w", "gw=al ice", ".gw"],
    config._Host: ["", "http://h", "h:80", "-h", "a b", "h..x"],
    config._RayAddress: ["", "x", "LOCAL", "local ", "head", "head:", "http://head:6379", "a b:1", "h:123456",
                          "ray://head:10001"],
}
VALUED = [f for f in FLAGS if not isinstance(f.parse, config._Switch)]  # --insecure takes no value


def parse(argv):
    return build_parser().parse_args(argv)


@pytest.mark.parametrize("flag", VALUED, ids=lambda f: f.option)
def test_every_flag_refuses_text_out_of_its_kind_or_range_naming_the_flag(flag, capsys):
    bad = [t for t in BAD_TEXT[type(flag.parse)] if not _accepted(flag, t)]
    assert bad, f"no bad value applies to {flag.option}"
    for text in bad:
        with pytest.raises(SystemExit) as exc:
            parse([flag.option, text])
        assert exc.value.code == 2, (flag.option, text)
        err = capsys.readouterr().err
        assert f"argument {flag.option}:" in err and "Traceback" not in err, err


def _accepted(flag, text):
    try:
        flag.parse(text)
        return True
    except argparse.ArgumentTypeError:
        return False


def test_max_batch_zero_and_a_banana_memory_limit_are_refused_with_exit_code_2(capsys):
    for argv, named in ((["--max-batch", "0"], "--max-batch"), (["--memory-limit", "banana"], "--memory-limit")):
        with pytest.raises(SystemExit) as exc:
            parse(argv)
        assert exc.value.code == 2 and f"argument {named}:" in capsys.readouterr().err


@pytest.mark.parametrize("flag", VALUED, ids=lambda f: f.option)
def test_every_flag_accepts_its_bounds_and_the_default_round_trips(flag):
    p = flag.parse
    if isinstance(p, config._Choice):
        values = list(p.choices)
    elif isinstance(p, config._Quotas):
        values = ["alice:procs=4,kv_blocks=800,tpm=20000;bob:tpm=0", ""]
    elif isinstance(p, config._Addresses):
        values = ["tcp://127.0.0.1:5556", "tcp://*:1,ipc:///tmp/k.sock,tcp://[::1]:65535"]
    elif isinstance(p, config._Group):
        values = ["root"]
    elif isinstance(p, config._Host):
        values = ["127.0.0.1", "::1", "0.0.0.0", "metrics.example.org", "localhost"]
    elif isinstance(p, config._Delegates):
        values = ["gateway", "gateway;svc=alice,bob"]
    elif isinstance(p, config._RayAddress):
        values = ["local", "auto", "10.0.0.5:6379", "head-1.example.org:6379", "[::1]:6379"]
    else:
        values = [p.lo, p.hi]
    for v in values:
        text = str(int(v)) if isinstance(v, (int, float)) and float(v).is_integer() else str(v)
        assert p(text) == v
    default = getattr(KernelConfig(), flag.field)
    if default is not None:
        assert p.check(default) == default  # the defaults are inside their own ranges


def test_sizes_take_binary_units_and_refuse_what_is_not_a_size():
    assert parse_size("8G") == 8 * 2**30 and parse_size("512m") == 512 * 2**20 and parse_size("1.5GiB") == 3 * 2**29
    assert parse_size("100000") == 100000 and parse_size("2KB") == 2048
    for text in ("banana", "", "G", "nan", "inf", "1e400"):
        with pytest.raises(ValueError):
            parse_size(text)


def test_flags_parse_into_a_config_and_back_into_the_same_argv():
    ns = parse(["--max-batch", "3", "--memory-limit", "600M", "--kv-policy", "dynamic", "--zombie-ttl", "2.5"])
    cfg = config.from_args(ns)
    assert (cfg.max_batch, cfg.memory_limit, cfg.kv_policy, cfg.zombie_ttl_s) == (3, 600 * 2**20, "dynamic", 2.5)
    assert cfg.max_zombies == KernelConfig().max_zombies  # unset flags keep the defaults
    assert config.from_args(parse(config.to_argv(ns))) == cfg


def test_ray_without_an_address_is_a_local_ray_and_every_form_round_trips_through_the_argv():
    assert config.from_args(parse([])).ray is None
    for argv, want in ((["--ray"], "local"), (["--ray", "auto"], "auto"), (["--ray", "10.0.0.5:6379"], "10.0.0.5:6379")):
        ns = parse(argv)
        assert config.from_args(ns).ray == want and config.from_args(parse(config.to_argv(ns))).ray == want


def test_insecure_is_a_switch_that_round_trips_through_the_argv():
    assert config.from_args(parse([])).insecure is False
    ns = parse(["--insecure", "--listen", "tcp://127.0.0.1:5556", "--group", "root"])
    cfg = config.from_args(ns)
    assert (cfg.insecure, cfg.listen, cfg.group) == (True, "tcp://127.0.0.1:5556", "root")
    assert "--insecure" in config.to_argv(ns) and config.from_args(parse(config.to_argv(ns))) == cfg


@pytest.mark.parametrize("field, value", [
    ("max_batch", 0), ("max_batch", -3), ("max_batch", 2.0), ("max_batch", True), ("max_batch", "4"),
    ("kv_policy", "greedy"), ("memory_limit", 0), ("memory_limit", "8G"), ("zombie_ttl_s", -1.0),
    ("zombie_ttl_s", math.nan), ("max_zombies", -1), ("worker_silence_s", 0.0), ("worker_silence_s", math.inf),
    ("client_buffer_bytes", 10), ("insecure", "yes"), ("group", "no-such-group-llmos"), ("listen", "tcp://h"),
    ("ray", "somewhere"), ("ray_placement_s", 0.0),
])
def test_a_config_made_in_code_is_held_to_the_same_ranges(field, value):
    option = next(f.option for f in FLAGS if f.field == field)
    with pytest.raises(ValueError, match=f"^{option}: "):
        KernelConfig(**{field: value})


def test_the_default_config_is_valid_and_memory_limit_may_be_left_to_the_kernel():
    assert KernelConfig().memory_limit is None
    assert KernelConfig(memory_limit=2**30).memory_limit == 2**30


def test_home_is_an_absolute_directory_path_and_an_empty_one_is_refused(tmp_path, monkeypatch):
    import argparse

    from llmos.kernel.config import home_dir

    monkeypatch.chdir(tmp_path)
    assert home_dir("rel/h") == tmp_path / "rel" / "h"
    for bad in ("", "   "):
        with pytest.raises(argparse.ArgumentTypeError, match="empty"):
            home_dir(bad)


def test_user_quotas_override_the_defaults_per_user():
    q = config.quotas_of(KernelConfig(max_procs_per_user=10, max_tokens_per_minute=500,
                                      user_quotas="alice:procs=2;bob:tpm=0,kv_blocks=8"))
    assert (q.of("alice").max_procs, q.of("alice").tokens_per_minute) == (2, 500)
    assert (q.of("bob").max_procs, q.of("bob").tokens_per_minute, q.of("bob").max_kv_blocks) == (10, 0, 8)
    assert (q.of("carol").max_procs, q.of("carol").max_kv_blocks) == (10, None)
