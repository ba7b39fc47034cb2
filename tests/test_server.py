"""NatsServer: the real nats-server binary, started on a free port, stopped cleanly, and
reporting its own fatal line when it cannot start."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path

import nats
import pytest
from conftest import free_port

from runctl.bus.errors import ServerStartError, Unavailable
from runctl.bus.server import NatsServer, server_env


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_starts_on_a_free_port_it_picks_itself(tmp_path: Path) -> None:
    server = NatsServer(store_dir=tmp_path / "s").start()
    try:
        assert server.port > 0 and server.running
        assert server.url == f"nats://127.0.0.1:{server.port}"
        assert _listening(server.port)
        assert "Server is ready" in server.log_path.read_text()
        assert "-js" in server.argv()
    finally:
        server.stop()


def test_a_server_runctl_starts_runs_go_on_one_core_unless_told_otherwise() -> None:
    assert server_env({"PATH": "/bin"}) == {"PATH": "/bin", "GOMAXPROCS": "1"}
    assert server_env({"GOMAXPROCS": "8"})["GOMAXPROCS"] == "8"  # the environment's wins
    assert server_env({"GOMAXPROCS": ""})["GOMAXPROCS"] == ""  # Go reads it as unset


@pytest.mark.parametrize("given", [None, "3"])
def test_the_server_itself_reports_the_cores_go_was_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: str | None
) -> None:
    if given is None:
        monkeypatch.delenv("GOMAXPROCS", raising=False)
    else:
        monkeypatch.setenv("GOMAXPROCS", given)
    monitor = free_port()  # the monitoring port: /varz says what Go runs with
    server = NatsServer(store_dir=tmp_path / "s", extra_args=("-m", str(monitor))).start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/varz", timeout=10) as answer:
            varz = json.load(answer)
        assert varz["gomaxprocs"] == int(given or 1), varz
    finally:
        server.stop()


def test_a_second_server_on_the_same_port_reports_address_in_use(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    with pytest.raises(ServerStartError) as info:
        NatsServer(port=nats_server.port, store_dir=tmp_path / "second").start()
    err = info.value
    assert isinstance(err, Unavailable)
    assert "address already in use" in err.log_line
    assert str(nats_server.port) in err.log_line
    assert "address already in use" in str(err)
    assert nats_server.running  # the first one is untouched


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("this is { not valid\n", "Parse error on line 1"),
        ("max_payload: banana\n", "bad.conf"),
    ],
)
def test_a_bad_config_file_raises_with_the_servers_own_fatal_line(
    tmp_path: Path, config: str, expected: str
) -> None:
    path = tmp_path / "bad.conf"
    path.write_text(config)
    server = NatsServer(config_file=path, store_dir=tmp_path / "s")
    with pytest.raises(ServerStartError) as info:
        server.start()
    assert expected in info.value.log_line
    assert "exited with code" in str(info.value)
    assert not server.running


def test_stop_is_clean_and_removes_a_temporary_store(tmp_path: Path) -> None:
    server = NatsServer().start()
    store, port = server.store_dir, server.port
    assert store.is_dir()
    server.stop()
    assert not server.running
    assert server.process is not None and server.process.returncode is not None
    assert not store.exists()
    assert not _listening(port)
    server.stop()  # idempotent


def test_context_manager_keeps_a_given_store(tmp_path: Path) -> None:
    with NatsServer(store_dir=tmp_path / "keep") as server:
        assert server.running
        log = server.log_path
    assert not server.running
    assert log.exists()  # a store dir the caller chose is not deleted


@pytest.mark.anyio
async def test_kill_and_restart_on_the_same_store_keeps_jetstream_data(
    nats_server: NatsServer,
) -> None:
    nc = await nats.connect(nats_server.url)
    kv = await nc.jetstream().create_key_value(bucket="SURVIVOR")
    await kv.put("k", b"kept")
    await nc.close()

    nats_server.kill()
    assert not nats_server.running
    assert nats_server.store_dir.is_dir()

    restarted = NatsServer(store_dir=nats_server.store_dir).start()
    try:
        nc = await nats.connect(restarted.url)
        entry = await (await nc.jetstream().key_value("SURVIVOR")).get("k")
        assert entry.value == b"kept"
        await nc.close()
    finally:
        restarted.stop()
