"""Clients connected while the kernel is killed (-9) and restarted on the same address: they notice the new
kernel, say hello again (same user), and wait/stream/`llmos run`/`llmos wait` go on to the same result."""

import subprocess
import sys
import threading

import pytest

from llmos.client import Client
from tests.conftest import KernelProc, wait_for

BIN = [sys.executable, "-m", "llmos"]
N = 120


@pytest.mark.slow
def test_clients_waiting_and_streaming_across_a_kernel_restart_get_the_result_and_keep_their_user(tiny_model):
    g = dict(model=tiny_model, temperature=0.0, ignore_eos=True, max_new_tokens=N)
    k = KernelProc(tcp=True)
    home, runs, clients = k.home, [], []
    try:
        with k.client() as c:
            cli_waited = c.spawn(prompt="cli wait", **g)
        # alice: another user than the kernel's owner (her CURVE key over tcp): the new kernel knows her again
        waiter, streamer = k.client_as("alice"), k.client_as("alice")
        clients += [waiter, streamer]
        waited, streamed = waiter.spawn(prompt="waited on", **g), streamer.spawn(prompt="streamed", **g)
        got: dict[str, object] = {}
        threads = [threading.Thread(target=lambda: got.__setitem__("wait", waiter.wait(waited)), daemon=True),
                   threading.Thread(target=lambda: got.__setitem__("stream", "".join(streamer.stream(streamed))),
                                    daemon=True)]
        for t in threads:
            t.start()
        cli = [str(a) for a in ("--model", tiny_model, "--temperature", "0", "--max-new-tokens", N, "--ignore-eos")]
        runs = [subprocess.Popen([*BIN, "run", *cli, "cli run"], env=k.env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE),
                subprocess.Popen([*BIN, "wait", str(cli_waited)], env=k.env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)]
        with k.client() as c:
            wait_for(lambda: len(c.ps()) == 4 and all(p.output_tokens > 3 for p in c.ps()), what="every process")
        k.crash()
        k = KernelProc(home=home, tcp=k.tcp)
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a client hung across the restart"
        outs = [p.communicate(timeout=120) for p in runs]
        assert [p.returncode for p in runs] == [0, 0], outs

        with k.client() as c:  # a fresh client: the same results as the ones that lived through the restart
            ref = {p: c.wait(c.spawn(prompt=p, **g)) for p in ("waited on", "streamed", "cli run", "cli wait")}
            assert got["wait"].token_ids == ref["waited on"].token_ids and got["wait"].text == ref["waited on"].text
            assert got["stream"] == ref["streamed"].text == streamer.wait(streamed).text
            # bytes: text mode would turn a generated "\r" into "\n"
            assert outs[0][0] == (ref["cli run"].text + "\n").encode()  # printed once: nothing repeated
            assert outs[1][0] == (ref["cli wait"].text + "\n").encode()
            # identity kept: what the old connections spawn now is alice's
            assert c.stat(pid := waiter.spawn(prompt="after", **g)).owner == "alice"
            assert waiter.wait(pid).finish_reason == "length"
            assert waiter.kernel["pid"] == k.proc.pid
    finally:
        for cl in clients:
            cl.close()
        for p in runs:
            if p.poll() is None:
                p.kill()
                p.communicate()
        k.stop()
