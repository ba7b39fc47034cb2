"""The error tree: stable codes, what each error carries, and the one nats-error mapping."""

from __future__ import annotations

import pytest
from nats import errors as nats_errors

from runctl.bus import errors as e


def test_every_error_derives_from_runctl_error_and_has_a_distinct_code() -> None:
    classes: list[type[e.RunctlError]] = [
        e.BadToken,
        e.BadPath,
        e.BadRequest,
        e.ValidationRejected,
        e.PayloadTooLarge,
        e.NotFound,
        e.Unavailable,
        e.Timeout,
        e.RemoteError,
    ]
    for cls in classes:
        assert issubclass(cls, e.RunctlError)
    codes = [cls.code for cls in classes]
    assert len(set(codes)) == len(codes), codes
    assert issubclass(e.ServerStartError, e.Unavailable)


def test_errors_also_are_the_builtin_a_caller_would_catch() -> None:
    assert issubclass(e.BadToken, ValueError)
    assert issubclass(e.BadPath, KeyError)
    assert issubclass(e.ValidationRejected, ValueError)
    assert issubclass(e.NotFound, LookupError)
    assert issubclass(e.Unavailable, ConnectionError)
    assert issubclass(e.Timeout, TimeoutError)


def test_bad_path_str_is_not_quoted_twice() -> None:
    err = e.BadPath("a.__dict__", "segment '__dict__' is private")
    assert str(err) == "invalid path 'a.__dict__': segment '__dict__' is private"
    long = e.BadPath("x" * 5000, "too long")
    assert len(str(long)) < 300 and long.path == "x" * 5000


def test_error_payloads() -> None:
    assert e.ValidationRejected("m", [{"loc": ["a"]}]).errors == [{"loc": ["a"]}]
    too_large = e.PayloadTooLarge(2_000_000, 1 << 20)
    assert (too_large.size, too_large.limit) == (2_000_000, 1 << 20)
    assert "2000000" in str(too_large) and str(1 << 20) in str(too_large)
    timeout = e.Timeout("late", ["3", "5"])
    assert timeout.missing == ["3", "5"]
    nf = e.NotFound("exp1", "7")
    assert (nf.run, nf.rank) == ("exp1", "7")
    assert "'7'" in str(nf) and "'exp1'" in str(nf)
    assert "'exp1'" in str(e.NotFound("exp1"))
    sse = e.ServerStartError("nats-server exited with code 1", "address already in use")
    assert sse.log_line == "address already in use"
    assert "address already in use" in str(sse)


@pytest.mark.parametrize(
    "original",
    [
        e.ValidationRejected("1 validation error", [{"type": "x", "loc": ["a"]}]),
        e.BadPath("a.b", "no field 'b'"),
        e.BadRequest("malformed"),
        e.RemoteError("ZeroDivisionError: division by zero"),
        e.PayloadTooLarge(2_000_000, 1 << 20),
    ],
    ids=lambda err: type(err).__name__,
)
def test_from_code_rebuilds_what_an_agent_sent(original: e.RunctlError) -> None:
    """An agent sends (code, message, detail); the client raises the same kind of error."""
    rebuilt = e.from_code(original.code, str(original), getattr(original, "errors", []))
    assert type(rebuilt) is type(original)
    assert rebuilt.code == original.code
    assert str(original) in str(rebuilt)
    if isinstance(original, e.ValidationRejected):
        assert isinstance(rebuilt, e.ValidationRejected)
        assert rebuilt.errors == original.errors


def test_from_code_of_a_bad_token_is_a_bad_request_and_unknown_codes_are_remote() -> None:
    # A BadToken is only ever raised locally (before sending); if an agent reports one it
    # is a bad request from the agent's point of view.
    assert type(e.from_code("bad_token", "x")) is e.BadRequest
    assert type(e.from_code("something_new", "x")) is e.RemoteError


def test_map_nats_error() -> None:
    nf = e.map_nats_error(nats_errors.NoRespondersError(), run="exp1", rank="3")
    assert isinstance(nf, e.NotFound) and (nf.run, nf.rank) == ("exp1", "3")
    to = e.map_nats_error(nats_errors.TimeoutError(), run="exp1", rank="3")
    assert isinstance(to, e.Timeout) and to.missing == ["3"] and "'3'" in str(to)
    assert isinstance(e.map_nats_error(TimeoutError(), run="exp1"), e.Timeout)
    for exc in (
        nats_errors.ConnectionClosedError(),
        nats_errors.NoServersError(),
        ConnectionRefusedError("refused"),
    ):
        assert isinstance(e.map_nats_error(exc), e.Unavailable), exc
    mine = e.BadRequest("mine")
    assert e.map_nats_error(mine) is mine
    other = e.map_nats_error(RuntimeError("boom"))
    assert type(other) is e.RunctlError and "RuntimeError" in str(other)


#: (class, code, HTTP status, CLI exit code): what each surface answers for each error
SURFACES: list[tuple[type[e.RunctlError], str, int, int]] = [
    (e.RunctlError, "error", 500, 1),
    (e.BadToken, "bad_token", 400, 2),
    (e.BadPath, "bad_path", 400, 2),
    (e.UnknownPath, "unknown_path", 404, 3),
    (e.NotAnObject, "not_an_object", 405, 2),
    (e.BadRequest, "bad_request", 400, 2),
    (e.InvalidRequest, "bad_request", 422, 2),
    (e.ValidationRejected, "validation", 422, 4),
    (e.PayloadTooLarge, "too_large", 413, 2),
    (e.NotFound, "not_found", 404, 3),
    (e.Unauthorized, "unauthorized", 401, 2),
    (e.Forbidden, "forbidden", 403, 2),
    (e.MethodNotAllowed, "method_not_allowed", 405, 2),
    (e.TooLate, "too_late", 409, 1),
    (e.Conflict, "conflict", 409, 1),
    (e.AmbiguousRun, "ambiguous_run", 409, 2),
    (e.Unavailable, "unavailable", 503, 5),
    (e.ServerStartError, "unavailable", 503, 5),
    (e.TlsError, "tls", 503, 5),
    (e.Timeout, "timeout", 504, 5),
    (e.RemoteError, "internal", 502, 1),
    (e.BadHost, "bad_host", 400, 2),
    (e.UnsupportedMediaType, "unsupported_media_type", 415, 2),
    (e.CrossSite, "cross_site", 403, 2),
    (e.UnreadableRecord, "unreadable_record", 502, 1),
    (e.CorruptArtifact, "corrupt_artifact", 500, 1),
    (e.SetupError, "setup", 500, 2),
    (e.CredentialsError, "credentials", 500, 2),
    (e.TokenError, "bad_tokens", 500, 2),
    (e.InsecureBind, "insecure_bind", 500, 2),
]


@pytest.mark.parametrize(("cls", "code", "status", "exit_code"), SURFACES, ids=lambda v: str(v))
def test_each_error_class_knows_its_code_http_status_and_exit_code(
    cls: type[e.RunctlError], code: str, status: int, exit_code: int
) -> None:
    assert (cls.code, cls.http_status, cls.exit_code) == (code, status, exit_code)


def test_the_tree_is_whole_and_documented() -> None:
    """Every error class exported is in the table above and drawn in the module's tree."""
    exported = {
        obj
        for name in e.__all__
        if isinstance(obj := getattr(e, name), type) and issubclass(obj, e.RunctlError)
    }
    assert exported == {cls for cls, *_ in SURFACES}
    doc = e.__doc__ or ""
    for cls in exported:
        assert f"── {cls.__name__} " in doc or cls is e.RunctlError, cls.__name__
    # the setup errors that used to live apart are caught where their builtin was
    assert issubclass(e.CredentialsError, RuntimeError)
    assert issubclass(e.TokenError, ValueError)
    assert issubclass(e.InsecureBind, RuntimeError)


def test_describe_and_detail() -> None:
    rejected = e.ValidationRejected("1 error", [{"loc": ["opt", "kind"], "msg": "bad"}])
    assert rejected.describe() == "invalid value for opt.kind: bad"
    assert rejected.detail == [{"loc": ["opt", "kind"], "msg": "bad"}]
    assert e.ValidationRejected("plain").detail == "plain"
    assert e.NotFound("exp1").describe() == e.NotFound("exp1").detail == "no live run 'exp1'"
    invalid = e.InvalidRequest("invalid request", [{"loc": ["query", "limit"]}])
    assert invalid.detail == [{"loc": ["query", "limit"]}] and isinstance(invalid, e.BadRequest)
