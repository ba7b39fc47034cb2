"""NATS credentials (bus/credentials.py) and `runctl up` generating them on first start."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from runctl.bus import Client
from runctl.bus.credentials import (
    PASSWORD_VARS,
    CredentialsError,
    ensure_credentials,
    load_credentials,
    new_password,
    read_env_file,
    redact_url,
    role_auth,
)
from runctl.bus.errors import Unavailable

ROOT = Path(__file__).resolve().parent.parent


def test_first_start_generates_private_files_and_later_starts_reuse_them(tmp_path: Path) -> None:
    where = tmp_path / ".runctl" / "credentials"
    first = ensure_credentials(where, env={})
    assert first.created and first.dir == where
    assert where.stat().st_mode & 0o777 == 0o700
    files = sorted(p.name for p in where.iterdir())
    assert files == ["agent.env", "observer.env", "operator.env", "server.env"]
    for path in where.iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path
    again = ensure_credentials(where, env={})
    assert not again.created and again.passwords == first.passwords
    assert len(set(first.passwords.values())) == 3  # one password per role
    agent = read_env_file(where / "agent.env")
    assert agent == {
        "RUNCTL_NATS_USER": "runctl-agent",
        "RUNCTL_NATS_PASSWORD": first.passwords["agent"],
    }
    assert read_env_file(where / "server.env") == first.server_env()
    assert not list(tmp_path.glob(".runctl/.credentials-*"))  # no temporary left behind
    assert first.passwords["agent"] not in repr(first)


def test_passwords_given_in_the_environment_win_and_nothing_is_written(tmp_path: Path) -> None:
    env = {var: new_password() for var in PASSWORD_VARS.values()}
    creds = ensure_credentials(tmp_path / "credentials", env=env)
    assert creds.server_env() == env and creds.dir is None
    assert not (tmp_path / "credentials").exists()
    partial = {PASSWORD_VARS["agent"]: new_password()}
    with pytest.raises(CredentialsError, match="RUNCTL_OPERATOR_PASSWORD"):
        ensure_credentials(tmp_path / "credentials", env=partial)


@pytest.mark.parametrize(
    "bad",
    [
        "-starts-with-dash-xxxxxxxx",
        "1starts-with-digit-xxxx",
        "has space in it xxxxxxx",
        "true",
        "short1",
        "has#hash12345678",
    ],
)
def test_a_password_nats_conf_would_misread_is_refused(bad: str) -> None:
    env = {var: new_password() for var in PASSWORD_VARS.values()}
    env[PASSWORD_VARS["observer"]] = bad
    with pytest.raises(CredentialsError, match="RUNCTL_OBSERVER_PASSWORD") as info:
        load_credentials(env=env)
    assert bad not in str(info.value)


def test_generated_passwords_are_safe_for_nats_conf() -> None:
    safe = re.compile(r"[A-Za-z][A-Za-z0-9]{39}")
    passwords = {new_password() for _ in range(200)}
    assert len(passwords) == 200 and all(safe.fullmatch(p) for p in passwords)


def test_a_directory_without_the_server_file_is_not_overwritten(tmp_path: Path) -> None:
    where = tmp_path / "credentials"
    where.mkdir()
    (where / "mine.txt").write_text("keep")
    with pytest.raises(CredentialsError, match=r"has no server\.env"):
        ensure_credentials(where, env={})
    assert (where / "mine.txt").read_text() == "keep"


def test_role_auth_uses_the_role_file_only_without_other_credentials(tmp_path: Path) -> None:
    creds = ensure_credentials(tmp_path / "c", env={})
    env = {"RUNCTL_NATS_CREDENTIALS_DIR": str(tmp_path / "c")}
    assert role_auth("operator", env) == creds.auth("operator")
    assert role_auth("agent", env) == {"user": "runctl-agent", "password": creds.passwords["agent"]}
    assert role_auth("agent", {**env, "RUNCTL_NATS_USER": "someone"}) == {}
    assert role_auth("agent", {**env, "RUNCTL_NATS_CREDS": "/x.creds"}) == {}
    assert role_auth("agent", {"RUNCTL_NATS_CREDENTIALS_DIR": str(tmp_path / "none")}) == {}


def test_urls_are_redacted_for_logs() -> None:
    assert redact_url("nats://runctl-agent:s3cret@h:4222") == "nats://runctl-agent:***@h:4222"
    assert redact_url("nats://tok3n@h:4222,nats://h2:4222") == "nats://***@h:4222,nats://h2:4222"
    assert redact_url("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"
    assert redact_url("") == ""


# --- runctl up ---------------------------------------------------------------------------


@pytest.fixture
def up_dir(tmp_path: Path) -> Path:
    """A working directory with the repo's nats.conf minus the fixed monitoring port."""
    text = (ROOT / "nats.conf").read_text()
    (tmp_path / "nats.conf").write_text(re.sub(r"(?m)^http:.*$", "", text))
    return tmp_path


def start_up(cwd: Path) -> tuple[subprocess.Popen[str], int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNCTL_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "runctl", "up", "--port", "-1"],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    for line in proc.stderr:
        lines.append(line)
        if match := re.search(r"Listening for client connections on [\d.]+:(\d+)", line):
            port = int(match.group(1))
            break
    else:
        raise AssertionError("".join(lines))
    for line in proc.stderr:  # until ready, so a connect cannot race the start
        lines.append(line)
        if "Server is ready" in line:
            break
    return proc, port, "".join(lines)


@pytest.fixture
def stopper() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        proc.terminate()
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.mark.anyio
async def test_runctl_up_generates_credentials_and_requires_them(
    up_dir: Path, stopper: list[subprocess.Popen[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("RUNCTL_NATS_USER", "RUNCTL_NATS_PASSWORD", "RUNCTL_NATS_URL"):
        monkeypatch.delenv(var, raising=False)
    proc, port, said = start_up(up_dir)
    stopper.append(proc)
    where = up_dir / ".runctl" / "credentials"
    assert f"generated NATS passwords in {Path('.runctl') / 'credentials'}" in said
    assert (where / "operator.env").stat().st_mode & 0o777 == 0o600
    creds = load_credentials(where, env={})
    for password in creds.passwords.values():
        assert password not in said
    url = f"nats://127.0.0.1:{port}"
    monkeypatch.setenv("RUNCTL_NATS_CREDENTIALS_DIR", str(tmp_none := up_dir / "none"))
    assert not tmp_none.exists()
    with pytest.raises(Unavailable, match="Authorization Violation"):
        await Client.connect(url)  # no credentials: refused
    monkeypatch.setenv("RUNCTL_NATS_CREDENTIALS_DIR", str(where))
    async with await Client.connect(url) as client:  # the operator's file, found by itself
        assert await client.runs() == []


@pytest.mark.anyio
async def test_runctl_up_reuses_credentials_and_says_where(
    up_dir: Path, stopper: list[subprocess.Popen[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("RUNCTL_NATS_USER", "RUNCTL_NATS_PASSWORD", "RUNCTL_NATS_URL"):
        monkeypatch.delenv(var, raising=False)
    where = up_dir / ".runctl" / "credentials"
    creds = ensure_credentials(where, env={})  # as a first start left them
    proc, port, said = start_up(up_dir)
    stopper.append(proc)
    assert "NATS passwords from .runctl/credentials" in said and "generated" not in said
    assert load_credentials(where, env={}).passwords == creds.passwords
    async with await Client.connect(
        f"nats://127.0.0.1:{port}", user="runctl-operator", password=creds.passwords["operator"]
    ) as client:
        assert await client.runs() == []
