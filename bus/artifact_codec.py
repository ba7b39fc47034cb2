"""Step results of any size: how a value becomes bytes, and how a record points at them.

Pure: no I/O. A step's result is kept **inline** in its record when it is small JSON (the
record is one JetStream message), and otherwise stored as an **artifact** in the object store
(:mod:`runctl.bus.artifact_store`), the record holding an :class:`ArtifactRef` (object
name, size, SHA-256 digest, codec).

Codecs are explicit and safe by default:

=========  ==========================================  ======================================
codec      values                                      bytes
=========  ==========================================  ======================================
``json``   JSON and msgspec-encodable values           msgspec JSON (decoded as plain JSON)
``bytes``  ``bytes``, ``bytearray``, ``memoryview``    the bytes themselves
``npy``    ``numpy.ndarray`` (no object dtype)         ``numpy.save(allow_pickle=False)``
``torch``  torch tensors, and dicts/lists of them      ``torch.save``; read back with
           (state dicts)                               ``torch.load(weights_only=True)``
``pickle`` anything, only with ``pickle=True``         :mod:`pickle` — a pickle from the bus
                                                       can run code: use only on a bus you
                                                       trust
=========  ==========================================  ======================================

numpy and torch are imported only when a value of theirs is seen (or read back).
"""

from __future__ import annotations

import base64
import hashlib
import io
import pickle
import sys
from typing import Any, Final, Literal

import msgspec

from runctl.bus.subjects import check_token

__all__ = [
    "INLINE_LIMIT",
    "ArtifactRef",
    "Codec",
    "Encoded",
    "decode_value",
    "digest_of",
    "encode_value",
    "object_name",
    "run_prefix",
    "step_prefix",
]

#: a result whose JSON is at most this long stays inside the step record
INLINE_LIMIT: Final = 256 * 1024

Codec = Literal["json", "bytes", "npy", "torch", "pickle"]


class ArtifactRef(msgspec.Struct, kw_only=True, frozen=True):
    """Where a step's result or attached file lives in the object store."""

    #: object name in the ``RUNCTL_ARTIFACTS`` bucket (see :func:`object_name`)
    name: str
    size: int
    #: ``SHA-256=<urlsafe base64>``, the object store's own digest format
    digest: str
    codec: Codec = "bytes"


class Encoded(msgspec.Struct, kw_only=True, frozen=True):
    """A result ready to store: ``inline`` (JSON value, small) or ``data`` + ``codec``."""

    codec: Codec
    data: bytes | None = None
    inline: Any = None

    @property
    def is_inline(self) -> bool:
        """Whether the result travels inside the step record (else in the object store)."""
        return self.data is None


def digest_of(data: bytes) -> str:
    """The object store's digest string for ``data`` (``SHA-256=`` + urlsafe base64)."""
    return "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()


def _torch_like(value: Any) -> bool:
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict) and value:
        return any(_torch_like(v) for v in value.values())
    if isinstance(value, list | tuple) and value:
        return any(_torch_like(v) for v in value)
    return False


def _is_ndarray(value: Any) -> bool:
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(value, numpy.ndarray)


def encode_value(
    value: Any, *, pickle_ok: bool = False, inline_limit: int = INLINE_LIMIT
) -> Encoded:
    """Choose the codec for ``value`` and encode it.

    Small JSON stays inline (as its JSON round trip, which is what a rerun gets back);
    anything else is bytes for the object store. Raises :class:`TypeError` naming the
    accepted kinds when ``value`` has no safe codec and ``pickle_ok`` is false.

    >>> encode_value({"rows": 3}).inline
    {'rows': 3}
    >>> encode_value(b"abc").codec
    'bytes'
    """
    if isinstance(value, bytes | bytearray | memoryview):
        return Encoded(codec="bytes", data=bytes(value))
    if _is_ndarray(value):
        if value.dtype.hasobject:
            if pickle_ok:
                return Encoded(codec="pickle", data=pickle.dumps(value, protocol=5))
            raise TypeError(
                "a numpy array of Python objects has no safe format: use a numeric dtype, "
                "or pass pickle=True (only on a bus you trust)"
            )
        import numpy

        buffer = io.BytesIO()
        numpy.save(buffer, value, allow_pickle=False)
        return Encoded(codec="npy", data=buffer.getvalue())
    if _torch_like(value):
        import torch

        buffer = io.BytesIO()
        torch.save(value, buffer)
        return Encoded(codec="torch", data=buffer.getvalue())
    try:
        data = msgspec.json.encode(value)
    except (TypeError, msgspec.EncodeError) as exc:
        if pickle_ok:
            return Encoded(codec="pickle", data=pickle.dumps(value, protocol=5))
        raise TypeError(
            f"a step result must be JSON or msgspec-encodable, bytes, a numpy array or torch "
            f"tensors ({exc}); pass pickle=True for anything else (only on a bus you trust)"
        ) from None
    if len(data) <= inline_limit:
        return Encoded(codec="json", inline=msgspec.json.decode(data))
    return Encoded(codec="json", data=data)


def decode_value(codec: Codec, data: bytes, *, pickle_ok: bool = False) -> Any:
    """The value that :func:`encode_value` stored as ``data``.

    Refuses a ``pickle`` artifact unless ``pickle_ok``: a pickle read from the bus can run
    code, so loading one is the reader's explicit choice too.
    """
    if codec == "bytes":
        return data
    if codec == "json":
        return msgspec.json.decode(data)
    if codec == "npy":
        import numpy

        return numpy.load(io.BytesIO(data), allow_pickle=False)
    if codec == "torch":
        import torch

        return torch.load(io.BytesIO(data), weights_only=True)
    if codec == "pickle":
        if not pickle_ok:
            raise TypeError(
                "this step result was stored with pickle: pass pickle=True to load it "
                "(a pickle from the bus can run code: only on a bus you trust)"
            )
        return pickle.loads(data)  # noqa: S301 - the caller opted in, see the docstring
    raise ValueError(f"unknown artifact codec {codec!r}")


def run_prefix(run: str) -> str:
    """The object-name prefix of everything a run stored."""
    check_token(run, "run")
    return f"{run}/"


def step_prefix(run: str, scope: str, name: str, record_id: str | None = None) -> str:
    """The object-name prefix of one step (``record_id`` given) or of every key of a step name."""
    check_token(scope, "scope")
    check_token(name, "step name")
    prefix = f"{run_prefix(run)}{scope}/{name}/"
    return prefix if record_id is None else f"{prefix}{record_id}/"


def object_name(run: str, scope: str, name: str, record_id: str, attempt: int, part: str) -> str:
    """``<run>/<scope>/<name>/<record id>/<attempt>/<part>``: ``part`` is ``result`` or
    ``files/<file>``. Every attempt has names of its own, so a rerun never overwrites what
    an earlier attempt stored (and the agent needs no right to purge).

    A file name may hold any character but ``/`` and NUL (it names one file, not a path).
    """
    if part != "result":
        file = part.removeprefix("files/")
        if not part.startswith("files/") or not file or "/" in file or "\0" in file:
            raise ValueError(f"not an artifact part: {part!r}")
        if file in (".", ".."):
            raise ValueError(f"not a file name: {file!r}")
    return f"{step_prefix(run, scope, name, record_id)}{int(attempt)}/{part}"
