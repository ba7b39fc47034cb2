"""NATS credentials for the secured server that ``runctl up`` runs (nats.conf).

nats.conf names three users and reads their passwords from environment variables; there is
no default. On first start ``runctl up`` generates random passwords into a private
directory (``.runctl/credentials/``, mode 0700, files 0600)::

    server.env     RUNCTL_AGENT_PASSWORD=...  (what nats-server reads, all three roles)
    agent.env      RUNCTL_NATS_USER=runctl-agent, RUNCTL_NATS_PASSWORD=...
    operator.env   the gateway and the CLI
    observer.env   subscribe-only readers

A role file is a plain ``KEY=VALUE`` file: ``set -a; . .runctl/credentials/agent.env``
exports it, ``docker --env-file`` and systemd's ``EnvironmentFile=`` read it. A process
with no NATS credentials in its environment uses its role's file from the default
directory if there is one (:func:`role_auth`), so ``runctl up`` followed by a program or
``runctl`` in the same directory just works.

Passwords set in the environment (``RUNCTL_AGENT_PASSWORD`` ...) win over files: that is how
a deployment brings its own secrets and no file is written.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import string
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit, urlunsplit

# the class lives in the one error tree; importable from here too, where it is raised
from runctl.bus.errors import CredentialsError

__all__ = [
    "CREDENTIALS_DIR_ENV",
    "DEFAULT_DIR",
    "PASSWORD_VARS",
    "ROLES",
    "USERS",
    "Credentials",
    "CredentialsError",
    "NatsRole",
    "ensure_credentials",
    "load_credentials",
    "login_hint",
    "new_password",
    "read_env_file",
    "redact_url",
    "role_auth",
]

NatsRole = Literal["agent", "operator", "observer"]
ROLES: Final[tuple[NatsRole, ...]] = ("agent", "operator", "observer")
USERS: Final[Mapping[NatsRole, str]] = {role: f"runctl-{role}" for role in ROLES}
#: the variables nats.conf reads the passwords from
PASSWORD_VARS: Final[Mapping[NatsRole, str]] = {
    role: f"RUNCTL_{role.upper()}_PASSWORD" for role in ROLES
}
DEFAULT_DIR: Final = Path(".runctl") / "credentials"
#: where processes look for their role's file (default: DEFAULT_DIR, relative to the cwd)
CREDENTIALS_DIR_ENV: Final = "RUNCTL_NATS_CREDENTIALS_DIR"
SERVER_FILE: Final = "server.env"
_ALPHABET: Final = string.ascii_letters + string.digits
#: what nats.conf can take through an environment variable and read back unchanged
_SAFE_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9]{15,}")
_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")
#: nats-py's client environment: any of these means "credentials were given"
_CLIENT_VARS: Final = (
    "RUNCTL_NATS_CREDS",
    "RUNCTL_NATS_NKEY",
    "RUNCTL_NATS_TOKEN",
    "RUNCTL_NATS_USER",
)


@dataclass(frozen=True)
class Credentials:
    """One password per role; ``dir`` is where the files are (None: from the environment)."""

    passwords: Mapping[NatsRole, str] = field(repr=False)
    dir: Path | None = None
    #: True when this call generated them (first start)
    created: bool = False

    def server_env(self) -> dict[str, str]:
        """What nats-server needs in its environment to load nats.conf."""
        return {PASSWORD_VARS[role]: self.passwords[role] for role in ROLES}

    def client_env(self, role: NatsRole) -> dict[str, str]:
        """What a client of ``role`` needs (bus.connection reads these)."""
        return {"RUNCTL_NATS_USER": USERS[role], "RUNCTL_NATS_PASSWORD": self.passwords[role]}

    def auth(self, role: NatsRole) -> dict[str, Any]:
        """nats-py ``connect()`` keyword arguments for ``role`` (``user``, ``password``)."""
        return {"user": USERS[role], "password": self.passwords[role]}

    def role_file(self, role: NatsRole) -> Path | None:
        """The file holding ``role``'s user name and password."""
        return None if self.dir is None else self.dir / f"{role}.env"


def new_password() -> str:
    """40 random letters and digits (~238 bits), starting with a letter.

    nats-server parses an environment variable's value as a config value, not as a string:
    ``-x...`` or ``a b`` fail to parse, ``true`` becomes a bool, ``12k`` a number and ``#``
    starts a comment (measured). Letters and digits after a letter are always a string.
    """
    first = secrets.choice(string.ascii_letters)
    return first + "".join(secrets.choice(_ALPHABET) for _ in range(39))


def _generate() -> dict[NatsRole, str]:
    return {role: new_password() for role in ROLES}


def read_env_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """``KEY=VALUE`` lines (``#`` comments, optional ``export`` and quotes) as a dict."""
    values: dict[str, str] = {}
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise CredentialsError(f"cannot read {path}: {exc.strerror or exc}") from None
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        match = _LINE.match(raw)
        if match is None:
            raise CredentialsError(f"{path}: line {n}: expected KEY=VALUE")
        key, value = match.groups()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def _write_private(path: Path, lines: list[str]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")


def _write_dir(target: Path, passwords: Mapping[NatsRole, str]) -> None:
    """Write every file into a fresh private directory, then move it into place at once,
    so a crash or a second ``runctl up`` never sees half a set."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".credentials-", dir=target.parent))  # mode 0700
    try:
        _write_private(
            tmp / SERVER_FILE,
            [
                "# nats-server's side of runctl's credentials (generated by `runctl up`).",
                "# nats.conf reads these variables; keep this file private (mode 0600).",
                *(f"{PASSWORD_VARS[role]}={passwords[role]}" for role in ROLES),
            ],
        )
        for role in ROLES:
            _write_private(
                tmp / f"{role}.env",
                [
                    f"# NATS login of the runctl {role} role (see docs/security.md).",
                    f"# Export it: set -a; . {target / (role + '.env')}; set +a",
                    f"RUNCTL_NATS_USER={USERS[role]}",
                    f"RUNCTL_NATS_PASSWORD={passwords[role]}",
                ],
            )
        try:
            tmp.rename(target)  # atomic; fails if another process got there first
        except OSError:
            if not (target / SERVER_FILE).exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _from_env(env: Mapping[str, str]) -> dict[NatsRole, str] | None:
    given = {role: env[var] for role, var in PASSWORD_VARS.items() if env.get(var)}
    if not given:
        return None
    missing = [PASSWORD_VARS[r] for r in ROLES if r not in given]
    if missing:
        raise CredentialsError(
            f"{', '.join(missing)} not set: give every role's password, or none "
            "(then `runctl up` generates them)"
        )
    _check_safe(given, "the environment")
    return given


def _check_safe(passwords: Mapping[NatsRole, str], where: str) -> None:
    for role, password in passwords.items():
        if not _SAFE_PASSWORD.fullmatch(password):
            raise CredentialsError(
                f"{PASSWORD_VARS[role]} in {where}: nats.conf needs at least 16 letters and "
                "digits, starting with a letter (nats-server parses the value as config: "
                "other characters can change it). python -c 'from runctl.bus.credentials import "
                "new_password; print(new_password())' makes one."
            )


def load_credentials(
    dir: str | os.PathLike[str] = DEFAULT_DIR, env: Mapping[str, str] | None = None
) -> Credentials:
    """The passwords from the environment if set there, else from ``dir/server.env``."""
    env = os.environ if env is None else env
    if (given := _from_env(env)) is not None:
        return Credentials(given)
    path = Path(dir)
    values = read_env_file(path / SERVER_FILE)
    missing = [PASSWORD_VARS[r] for r in ROLES if not values.get(PASSWORD_VARS[r])]
    if missing:
        raise CredentialsError(f"{path / SERVER_FILE}: {', '.join(missing)} missing")
    passwords: dict[NatsRole, str] = {r: values[PASSWORD_VARS[r]] for r in ROLES}
    _check_safe(passwords, str(path / SERVER_FILE))
    return Credentials(passwords, dir=path)


def ensure_credentials(
    dir: str | os.PathLike[str] = DEFAULT_DIR, env: Mapping[str, str] | None = None
) -> Credentials:
    """Load the credentials, generating them on first start (``created`` tells)."""
    env = os.environ if env is None else env
    path = Path(dir)
    if _from_env(env) is None and not (path / SERVER_FILE).exists():
        if path.exists() and any(path.iterdir()):
            raise CredentialsError(f"{path} exists but has no {SERVER_FILE}: move it away")
        if path.exists():
            path.rmdir()
        _write_dir(path, _generate())
        creds = load_credentials(path, env)
        return Credentials(creds.passwords, dir=creds.dir, created=True)
    return load_credentials(path, env)


def role_auth(role: NatsRole, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """nats-py login options from ``role``'s file in the credentials directory, when the
    environment gives no NATS credentials at all; else ``{}``."""
    env = os.environ if env is None else env
    if any(env.get(var) for var in _CLIENT_VARS):
        return {}
    path = Path(env.get(CREDENTIALS_DIR_ENV) or DEFAULT_DIR) / f"{role}.env"
    if not path.is_file():
        return {}
    values = read_env_file(path)
    user, password = values.get("RUNCTL_NATS_USER"), values.get("RUNCTL_NATS_PASSWORD")
    if not user or password is None:
        raise CredentialsError(f"{path}: RUNCTL_NATS_USER or RUNCTL_NATS_PASSWORD missing")
    return {"user": user, "password": password}


def login_hint(role: NatsRole | None) -> str:
    """Where a process's NATS login comes from: for a server that refused it."""
    where = CREDENTIALS_DIR_ENV
    file = f"{DEFAULT_DIR / role}.env" if role else f"{DEFAULT_DIR}/<role>.env"
    return (
        "the server requires a login and refused this one (or none was given). A runctl "
        "process logs in with RUNCTL_NATS_USER and RUNCTL_NATS_PASSWORD (or "
        "RUNCTL_NATS_CREDS, RUNCTL_NATS_NKEY, RUNCTL_NATS_TOKEN, or user:password@ in the "
        f"URL), else with {file}, which `runctl up` writes: run it in the directory where "
        f"`runctl up` ran, set {where} to that credentials folder, or `set -a; . {file}`"
    )


def redact_url(url: str) -> str:
    """``nats://user:secret@host`` -> ``nats://user:***@host`` (a token alone -> ``***``),
    for every comma-separated server; for logs and error messages."""
    out = []
    for part in url.split(","):
        try:
            split = urlsplit(part.strip())
        except ValueError:
            out.append("***")
            continue
        if "@" not in split.netloc:
            out.append(part.strip())
            continue
        userinfo, host = split.netloc.rsplit("@", 1)
        user, sep, _ = userinfo.partition(":")
        shown = f"{user}:***" if sep else "***"
        out.append(urlunsplit(split._replace(netloc=f"{shown}@{host}")))
    return ",".join(out)
