"""gpt2cli.torchrun's loopback stores: a server for a loopback host listens on loopback only, on
every torch this project supports (the 2-process runs in tests/test_reliability.py check the
whole launch on the installed torch)."""

from __future__ import annotations

import socket

import pytest
import torch.distributed as dist

from gpt2cli.torchrun import tcp_store


def test_a_loopback_server_listens_on_loopback_only_and_serves_clients():
    server = tcp_store("127.0.0.1", 0, is_master=True, world_size=1)
    server.set("key", "value")
    client = dist.TCPStore("127.0.0.1", server.port, is_master=False)
    assert client.get("key") == b"value"


def test_a_torch_whose_libuv_store_takes_no_listening_socket_gets_the_legacy_store(monkeypatch):
    """torch before about 2.8: its default (libuv) store refused master_listen_fd with a
    NotImplementedError; the legacy store took it."""
    made = []

    def store(host, port, *, is_master, master_listen_fd=None, use_libuv=True, **kwargs):
        if master_listen_fd is not None and use_libuv:
            raise NotImplementedError("The libuv TCPStore backend does not support initialization with an listen fd.")
        listening = socket.socket(fileno=master_listen_fd)
        made.append((host, port, listening.getsockname(), use_libuv))
        listening.close()
        return "store"

    monkeypatch.setattr(dist, "TCPStore", store)
    assert tcp_store("localhost", 0, is_master=True, multi_tenant=True) == "store"
    (host, port, bound, use_libuv), = made
    assert host == "localhost" and bound == ("127.0.0.1", port) and port > 0 and use_libuv is False


def test_other_stores_are_torch_own(monkeypatch):
    calls = []
    monkeypatch.setattr(dist, "TCPStore", lambda *args, **kwargs: calls.append((args, kwargs)) or "store")
    tcp_store("10.0.0.1", 29500, is_master=True)  # another machine may need to reach it
    tcp_store("127.0.0.1", 29500, is_master=False)  # a client
    assert [kwargs.get("master_listen_fd") for _, kwargs in calls] == [None, None]


def test_a_port_in_use_is_the_runtime_error_torch_raises():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        with pytest.raises(RuntimeError, match="could not listen on 127.0.0.1"):
            tcp_store("127.0.0.1", taken.getsockname()[1], is_master=True)
    finally:
        taken.close()


def test_a_failed_job_is_described_by_the_workers_that_ended_first():
    import signal as signals

    from gpt2cli.torchrun import describe_failure

    class Failure:
        def __init__(self, exitcode: int) -> None:
            self.exitcode = exitcode

        def signal_name(self) -> str:
            return signals.Signals(-self.exitcode).name

    # torchrun stops the other workers with SIGTERM once one fails: those are not the cause
    assert describe_failure({0: Failure(-15), 1: Failure(-9)}) == "worker rank 1 was killed by SIGKILL"
    assert describe_failure({0: Failure(1), 1: Failure(1)}) == "worker ranks 0, 1 exited with code 1"
    assert describe_failure({0: Failure(-15), 1: Failure(-15)}) == "worker ranks 0, 1 were killed by SIGTERM"
