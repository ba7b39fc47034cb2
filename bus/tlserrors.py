"""What a failed TLS handshake means, in one sentence, and the variables that name the TLS
files. Pure (the standard ``ssl`` module's classes only): the error tree uses it, and so does
:mod:`runctl.bus.tls`, which makes and loads the files.
"""

from __future__ import annotations

import ssl
from typing import Final

__all__ = [
    "CA_ENV",
    "CERTIFICATE_REQUIRED",
    "CERT_ENV",
    "CLIENT_CERT_HINT",
    "KEY_ENV",
    "describe_ssl_error",
]

#: the CA file clients verify the server with
CA_ENV: Final = "RUNCTL_NATS_CA"
#: a client certificate and its key, for servers that verify clients
CERT_ENV: Final = "RUNCTL_NATS_CERT"
KEY_ENV: Final = "RUNCTL_NATS_KEY"

#: OpenSSL verify codes worth their own explanation
_EXPIRED, _NOT_YET_VALID = 10, 9
_UNKNOWN_ISSUER = frozenset({2, 18, 19, 20, 21})
_HOSTNAME_MISMATCH = 62


_CLIENT_FILES: Final = "runctl up --tls writes client.pem and client-key.pem"
CERTIFICATE_REQUIRED: Final = (
    f"TLS: the server requires a client certificate: set {CERT_ENV} and {KEY_ENV} ({_CLIENT_FILES})"
)
#: a TLS 1.3 server that verifies clients may hang up before the client reads its alert
CLIENT_CERT_HINT: Final = (
    f"if the server verifies clients, set {CERT_ENV} and {KEY_ENV}: {_CLIENT_FILES}"
)


def describe_ssl_error(exc: BaseException, ca: str | None = None) -> str:
    """A clear sentence for a failed TLS handshake (never a secret: there is none in it)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code, message = exc.verify_code, (exc.verify_message or str(exc)).rstrip(".")
        if code == _EXPIRED:
            return (
                "TLS: the server's certificate has expired "
                "(runctl up --tls renews it, signed by the same CA)"
            )
        if code == _NOT_YET_VALID:
            return "TLS: the server's certificate is not valid yet (check the clocks)"
        if code in _UNKNOWN_ISSUER:
            trusted = (
                f"the CA in {CA_ENV}={ca}"
                if ca
                else f"a CA this machine trusts (set {CA_ENV} to the server's ca.pem)"
            )
            return f"TLS: the server's certificate is not signed by {trusted} ({message})"
        if code == _HOSTNAME_MISMATCH:
            return (
                f"TLS: {message}; connect with a name the certificate holds, or add the name "
                "(runctl up --tls --tls-host NAME)"
            )
        return f"TLS: certificate verification failed: {message}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        if "CERTIFICATE_REQUIRED" in reason:
            return CERTIFICATE_REQUIRED
        return f"TLS: handshake failed ({reason})"
    return f"TLS: {exc}"
