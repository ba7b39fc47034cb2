"""TLS for the bus: a private CA and certificates, nats-server's TLS settings, and the client
side (an SSL context from the environment; a plain connection refused when TLS is set up).

``runctl up --tls`` calls :func:`ensure_tls`: on first start it writes, into a private
directory beside the credentials (``.runctl/tls/``, mode 0700, files 0600)::

    ca.pem            the CA certificate: give it to every client (RUNCTL_NATS_CA)
    ca-key.pem        the CA's key: never leaves this machine; it signs new certificates
    server.pem        nats-server's certificate (and the gateway's, if you like), for the
    server-key.pem    host names and addresses given (plus localhost and this host's name)
    client.pem        a client certificate, for servers that also verify clients
    client-key.pem

Later starts reuse them; a host name that the server certificate does not cover yet (or a
certificate less than 30 days from its end) gets a new server and client certificate
signed by the same CA, so clients keep their ``ca.pem``.

Clients (agents, the gateway, the CLI) read ``RUNCTL_NATS_CA`` (the CA file),
optionally ``RUNCTL_NATS_CERT`` + ``RUNCTL_NATS_KEY`` (a client certificate). TLS is on for
a connection when any URL is ``tls://`` or ``RUNCTL_NATS_CA`` is set; then the server's
certificate is verified (CA and host name) and a server that does not switch to TLS is
refused before a password is sent (:func:`check_encrypted`).

Why one module of this size: the CA, the server's certificate, the server's TLS block and
the client's SSL context are one contract (the file names in :class:`TlsFiles`, the
environment names in :mod:`runctl.bus.tlserrors`); each half is short, and reading them side
by side is how a mismatch between what ``runctl up --tls`` writes and what clients read is
seen. Error wording lives apart, in :mod:`runctl.bus.tlserrors`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import shutil
import socket
import ssl
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from runctl.bus.errors import BadRequest, SetupError, TlsError
from runctl.bus.tlserrors import (
    CA_ENV,
    CERT_ENV,
    CERTIFICATE_REQUIRED,
    CLIENT_CERT_HINT,
    KEY_ENV,
    describe_ssl_error,
)

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

__all__ = [
    "CA_ENV",
    "CERTIFICATE_REQUIRED",
    "CERT_ENV",
    "CLIENT_CERT_HINT",
    "DEFAULT_TLS_DIR",
    "KEY_ENV",
    "ClientTls",
    "TlsFiles",
    "check_encrypted",
    "client_tls",
    "default_names",
    "describe_ssl_error",
    "ensure_tls",
    "is_loopback",
    "issue_certificate",
    "load_tls",
    "new_ca",
    "server_config",
    "server_tls_block",
    "write_server_config",
]

DEFAULT_TLS_DIR: Final = Path(".runctl") / "tls"

CA_DAYS: Final = 3650
CERT_DAYS: Final = 825
#: a certificate closer than this to its end is renewed by the next `runctl up --tls`
RENEW_BEFORE: Final = dt.timedelta(days=30)
_DNS_NAME = re.compile(
    r"(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)
_FILES: Final = (
    "ca.pem",
    "ca-key.pem",
    "server.pem",
    "server-key.pem",
    "client.pem",
    "client-key.pem",
)


# --- files ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """Where ``runctl up --tls`` keeps its CA and certificates."""

    dir: Path
    #: True when this call wrote new certificates (first start, new names, renewal)
    created: bool = False

    @property
    def ca(self) -> Path:
        """The CA certificate: what every client verifies the server with."""
        return self.dir / "ca.pem"

    @property
    def ca_key(self) -> Path:
        """The CA's private key: signs new certificates; never leaves this machine."""
        return self.dir / "ca-key.pem"

    @property
    def server_cert(self) -> Path:
        """The server's certificate (nats-server's, and the gateway's if you like)."""
        return self.dir / "server.pem"

    @property
    def server_key(self) -> Path:
        """The server certificate's private key."""
        return self.dir / "server-key.pem"

    @property
    def client_cert(self) -> Path:
        """A client certificate, for servers that verify clients."""
        return self.dir / "client.pem"

    @property
    def client_key(self) -> Path:
        """The client certificate's private key."""
        return self.dir / "client-key.pem"

    def names(self) -> list[str]:
        """The host names and addresses the server certificate is valid for."""
        return certificate_names(_load_cert(self.server_cert))

    def client_env(self) -> dict[str, str]:
        """What a client needs to verify this server (absolute, so it works from anywhere)."""
        return {CA_ENV: str(self.ca.resolve())}


def default_names() -> list[str]:
    """Always in a server certificate: the loopback names and this machine's host name."""
    names = ["localhost", "127.0.0.1", "::1"]
    host = socket.gethostname()
    if host and _DNS_NAME.fullmatch(host):
        names.append(host)
    return names


def _check_names(names: Iterable[str]) -> list[str]:
    """Host names and IP addresses, deduplicated in order; anything else is refused."""
    out: list[str] = []
    for raw in names:
        name = raw.strip()
        try:
            name = str(ipaddress.ip_address(name))
        except ValueError:
            if len(name) > 253 or not _DNS_NAME.fullmatch(name):
                raise BadRequest(
                    f"{raw[:80]!r} is neither a host name nor an IP address "
                    "(a TLS certificate can only name those)"
                ) from None
            name = name.lower()
        if name not in out:
            out.append(name)
    if not out:
        raise BadRequest("a server certificate needs at least one host name or address")
    return out


def new_ca(
    common_name: str = "runctl private CA", *, days: int = CA_DAYS
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA certificate and its key (ECDSA P-256)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue_certificate(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    names: Sequence[str],
    *,
    server: bool = True,
    client: bool = True,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    common_name: str | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate signed by ``ca`` for ``names`` (host names and IP addresses).

    A server certificate also allows client authentication: cluster nodes present it to
    each other on their route connections. ``not_before``/``not_after`` default to now and
    :data:`CERT_DAYS` from now (tests make expired ones)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert, ca_key = ca
    checked = _check_names(names) if names else []
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
    usages += [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    alt: list[Any] = []
    for name in checked:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name))
    subject = x509.Name(
        [
            x509.NameAttribute(
                NameOID.COMMON_NAME, common_name or (checked[0] if checked else "runctl")
            )
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - dt.timedelta(minutes=5))
        .not_valid_after(not_after or now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if alt:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def certificate_names(cert: x509.Certificate) -> list[str]:
    """The DNS names and IP addresses in a certificate's subjectAltName."""
    from cryptography import x509

    try:
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in alt.get_values_for_type(x509.DNSName)] + [
        str(v) for v in alt.get_values_for_type(x509.IPAddress)
    ]


def _pem_cert(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(cert.public_bytes(serialization.Encoding.PEM))


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _load_cert(path: Path) -> x509.Certificate:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise SetupError(f"cannot read the certificate {path}: {_reason(exc)}") from None


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SetupError(f"cannot read the key {path}: {_reason(exc)}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SetupError(f"{path}: not an ECDSA key (runctl writes P-256 keys)")
    return key


def _reason(exc: BaseException) -> str:
    return (
        exc.strerror
        if isinstance(exc, OSError) and exc.strerror
        else str(exc) or type(exc).__name__
    )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _replace_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (mode 0600) through a temporary file: never half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    _write_private(tmp, data)
    tmp.replace(path)


def _needs_new_leaf(files: TlsFiles, names: Sequence[str]) -> bool:
    cert = _load_cert(files.server_cert)
    missing = set(names) - set(certificate_names(cert))
    ends = cert.not_valid_after_utc
    return (
        bool(missing)
        or ends - dt.datetime.now(dt.UTC) < RENEW_BEFORE
        or not files.client_cert.exists()
    )


def ensure_tls(
    dir: str | os.PathLike[str] = DEFAULT_TLS_DIR, names: Iterable[str] = ()
) -> TlsFiles:
    """The CA and certificates in ``dir``, made on first use.

    ``names``: host names and IP addresses the server certificate must hold (besides
    :func:`default_names`). When the existing one lacks a name or is close to its end, new
    server and client certificates are signed by the same CA (``created`` is True then)."""
    path = Path(dir)
    wanted = _check_names([*default_names(), *names])
    files = TlsFiles(path)
    if not files.ca.exists():
        if path.exists() and any(path.iterdir()):
            raise SetupError(f"{path} exists but has no ca.pem: move it away")
        _write_new_dir(path, wanted)
        return TlsFiles(path, created=True)
    if not files.server_cert.exists() or _needs_new_leaf(files, wanted):
        keep = (
            certificate_names(_load_cert(files.server_cert)) if files.server_cert.exists() else []
        )
        ca = (_load_cert(files.ca), _load_key(files.ca_key))
        all_names = _check_names([*wanted, *keep])
        server = issue_certificate(ca, all_names)
        client = issue_certificate(ca, [], server=False, common_name="runctl client")
        # the key first: a server that restarts between the two sees a pair that fits less
        # often than the other way round; both are replaced whole
        _replace_private(files.server_key, _pem_key(server[1]))
        _replace_private(files.server_cert, _pem_cert(server[0]))
        _replace_private(files.client_key, _pem_key(client[1]))
        _replace_private(files.client_cert, _pem_cert(client[0]))
        return TlsFiles(path, created=True)
    return files


def _write_new_dir(target: Path, names: Sequence[str]) -> None:
    """Every file into a fresh private directory, then renamed into place at once."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tls-", dir=target.parent))  # mode 0700
    try:
        ca = new_ca()
        server = issue_certificate(ca, names)
        client = issue_certificate(ca, [], server=False, common_name="runctl client")
        for name, data in zip(
            _FILES,
            (
                _pem_cert(ca[0]),
                _pem_key(ca[1]),
                _pem_cert(server[0]),
                _pem_key(server[1]),
                _pem_cert(client[0]),
                _pem_key(client[1]),
            ),
            strict=True,
        ):
            _write_private(tmp / name, data)
        if target.exists():
            target.rmdir()  # empty (checked by the caller)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_tls(dir: str | os.PathLike[str] = DEFAULT_TLS_DIR) -> TlsFiles:
    """Files written earlier by :func:`ensure_tls` (checked to exist)."""
    files = TlsFiles(Path(dir))
    for path in (files.ca, files.server_cert, files.server_key):
        if not path.is_file():
            raise SetupError(f"{path} not found (runctl up --tls writes it)")
    return files


def is_loopback(host: str) -> bool:
    """True only for addresses nobody else can reach: 127.0.0.0/8, ::1, ``localhost``."""
    name = host.strip().strip("[]")
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # any other name may resolve to a public address


# --- nats-server ---------------------------------------------------------------------------


def _quoted(path: Path) -> str:
    text = str(path.resolve())
    if any(c in text for c in '"\\\n'):
        raise SetupError(f"nats-server cannot take the path {text!r} in a config file")
    return f'"{text}"'


def server_tls_block(
    files: TlsFiles,
    *,
    cert: Path | None = None,
    key: Path | None = None,
    verify: bool = False,
    timeout: float = 5.0,
) -> str:
    """One ``tls { ... }`` block of nats-server's config."""
    lines = [
        f"cert_file: {_quoted(cert or files.server_cert)}",
        f"key_file: {_quoted(key or files.server_key)}",
        f"ca_file: {_quoted(files.ca)}",
        f"timeout: {timeout:g}",
    ]
    if verify:
        lines.append("verify: true")
    return "tls {\n" + "".join(f"  {line}\n" for line in lines) + "}\n"


def server_config(
    files: TlsFiles,
    *,
    include: str | os.PathLike[str] | None = None,
    relative_to: Path | None = None,
    verify_clients: bool = False,
    routes: bool = True,
    cert: Path | None = None,
    key: Path | None = None,
) -> str:
    """nats-server config text: ``include`` (the base config, e.g. nats.conf) and TLS on
    the client port, and with ``routes`` on the cluster (route) port too, where nodes
    verify each other's certificate (mutual TLS: only a holder of a certificate from this
    CA can join the cluster)."""
    parts = ["# written by runctl (TLS); the base config is included, then TLS is added\n"]
    if include is not None:
        base = Path(include).resolve()
        where = (relative_to or Path.cwd()).resolve()
        # nats-server resolves an include relative to the including file, never absolute
        parts.append(f'include "{os.path.relpath(base, where)}"\n')
    parts.append(server_tls_block(files, cert=cert, key=key, verify=verify_clients))
    if routes:
        block = server_tls_block(files, cert=cert, key=key, verify=True)
        parts.append("cluster {\n" + "".join(f"  {ln}\n" for ln in block.splitlines()) + "}\n")
    return "".join(parts)


def write_server_config(
    files: TlsFiles,
    path: str | os.PathLike[str],
    *,
    include: str | os.PathLike[str] | None = None,
    verify_clients: bool = False,
    routes: bool = True,
) -> Path:
    """Write :func:`server_config` to ``path`` (mode 0600) and return it."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = server_config(
        files,
        include=include,
        relative_to=out.parent,
        verify_clients=verify_clients,
        routes=routes,
    )
    _replace_private(out, text.encode())
    return out


# --- clients -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientTls:
    """How a client connects: the SSL context and where its CA came from (for messages)."""

    context: ssl.SSLContext
    ca: str | None
    #: a client certificate is configured (RUNCTL_NATS_CERT)
    cert: str | None = None

    def options(self) -> dict[str, Any]:
        """nats-py ``connect()`` keyword arguments."""
        return {"tls": self.context}


def _context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    for var, value in ((CA_ENV, ca), (CERT_ENV, cert), (KEY_ENV, key)):
        if value is not None and not Path(value).is_file():
            raise SetupError(f"{var}={value}: no such file")
    if (cert is None) != (key is None):
        raise SetupError(f"{CERT_ENV} and {KEY_ENV} go together: set both or neither")
    try:
        context = ssl.create_default_context(cafile=ca)
        if cert is not None:
            context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise SetupError(
            f"cannot load the TLS files ({CA_ENV}, {CERT_ENV}): {_reason(exc)}"
        ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def client_tls(servers: Sequence[str], env: Mapping[str, str] | None = None) -> ClientTls | None:
    """The client's TLS, or None when it is not asked for (no ``tls://`` URL, no
    ``RUNCTL_NATS_CA``). With TLS, every connection must be encrypted."""
    env = os.environ if env is None else env
    ca = env.get(CA_ENV) or None
    cert, key = env.get(CERT_ENV) or None, env.get(KEY_ENV) or None
    wants = any(_scheme(s) == "tls" for s in servers)
    if not (wants or ca or cert):
        return None
    return ClientTls(_context(ca, cert, key), ca, cert)


def _scheme(url: str) -> str:
    try:
        return urlsplit(url if "://" in url else f"nats://{url}").scheme.lower()
    except ValueError:
        return ""


def check_encrypted(nc: Any, tls: ClientTls | None) -> None:
    """Raise :class:`TlsError` when TLS is configured but ``nc``'s connection is plain.

    Called by the connection right before it sends CONNECT (which carries the password):
    nats-py switches to TLS only when the server asks for it, so a server (or anything in
    between) that does not ask would otherwise get the login in the clear."""
    if tls is None:
        return
    transport = getattr(nc, "_transport", None)
    writer = getattr(transport, "_io_writer", None)
    if writer is not None and writer.get_extra_info("ssl_object") is not None:
        return
    server = getattr(getattr(nc, "_current_server", None), "uri", None)
    where = f"{server.hostname}:{server.port}" if server is not None else "the server"
    raise TlsError(
        f"{where} does not offer TLS, and TLS is configured ({CA_ENV} or a tls:// URL): "
        "refusing to log in over a plain connection (start the server with TLS: "
        "runctl up --tls)"
    )
