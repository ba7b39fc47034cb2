"""The pure step-log logic: record wire form, selectors, forget planning, explain."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from runctl.bus.canonical import hashed, key_digest
from runctl.bus.errors import BadRequest
from runctl.bus.steps.explain import config_diff, explain, record_row
from runctl.bus.steps.forget import Selector, covered, parse_selector, plan_forget
from runctl.bus.steps.records import (
    ForgetMarker,
    RunLog,
    StepRecord,
    decode_entry,
    encode_entry,
)

CFG = hashed({"lr": 0.1})


def rec(
    name: str,
    key: Any,
    started: float,
    *,
    scope: str = "0",
    status: str = "done",
    cfg: Any = None,
    pid: int = 1,
    **kw: Any,
) -> StepRecord:
    h = hashed(cfg) if cfg is not None else CFG
    return StepRecord(
        run="r",
        scope=scope,
        name=name,
        key=key,
        key_hash=key_digest(key)[1],
        config=h.value,
        config_hash=h.hash,
        status=status,  # type: ignore[arg-type]
        started=started,
        ended=started + 1 if status != "started" else None,
        duration=1.0 if status != "started" else None,
        rank="0",
        host="h",
        pid=pid,
        **kw,
    )


def runlog(*records: StepRecord) -> RunLog:
    log = RunLog("r")
    for seq, r in enumerate(records, 1):
        log.add(seq, r)
    return log


def test_record_wire_form_is_tagged_json_and_round_trips() -> None:
    r = rec("epoch", 3, 100.0, result={"loss": 0.5})
    data = encode_entry(r)
    assert msgspec.json.decode(data)["t"] == "step/1"
    assert decode_entry(data) == r
    assert r.sid == f"epoch.{r.key_hash}-{r.config_hash}"
    marker = ForgetMarker(run="r", scope="0", name="epoch", ts=1.0, all=True)
    assert msgspec.json.decode(encode_entry(marker))["t"] == "forget/1"
    assert decode_entry(encode_entry(marker)) == marker
    # an older reader's record (no optional fields) still decodes: new fields have defaults
    minimal = (
        b'{"t":"step/1","run":"r","scope":"0","name":"e","key_hash":"k",'
        b'"config_hash":"c","status":"done","started":1.0}'
    )
    assert decode_entry(minimal).attempt == 1  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("epoch", Selector("epoch")),
        ("epoch+", Selector("epoch", None, True)),
        ("epoch:5", Selector("epoch", "5")),
        ("tokenize:shard-3+", Selector("tokenize", "shard-3", True)),
        ('sq:{"x":3}', Selector("sq", '{"x":3}')),
    ],
)
def test_selectors(text: str, expected: Selector) -> None:
    assert parse_selector(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize("text", ["", "+", "a.b", "epoch:", "ep och"])
def test_bad_selectors_are_refused(text: str) -> None:
    with pytest.raises(BadRequest, match="invalid step selector"):
        parse_selector(text)


def test_forget_one_name_covers_all_its_items_and_only_them() -> None:
    log = runlog(
        rec("prep", None, 1), *(rec("epoch", i, 10 + i) for i in range(3)), rec("eval", None, 20)
    )
    (marker,) = plan_forget(log, parse_selector("epoch"), now=50)
    assert (marker.name, marker.all, marker.count) == ("epoch", True, 3)
    assert [covered(marker, r) for _, r in log.ordered()] == [False, True, True, True, False]


def test_forget_plus_covers_the_step_and_everything_started_after_it() -> None:
    log = runlog(
        rec("prep", None, 1, scope="run"),
        *(rec("epoch", i, 10 + i) for i in range(5)),
        rec("eval", None, 20),
        rec("epoch", 0, 11, scope="1"),
    )
    markers = plan_forget(log, parse_selector("epoch:2+"))
    by_name = {(m.scope, m.name): m for m in markers}
    assert set(by_name) == {("0", "epoch"), ("0", "eval")}  # rank 1's epoch 0 started before
    epoch = by_name[("0", "epoch")]
    assert not epoch.all and epoch.since == 12 and epoch.count == 3
    assert by_name[("0", "eval")].all
    forgotten = {
        (r.scope, r.name, r.key) for _, r in log.ordered() if any(covered(m, r) for m in markers)
    }
    assert forgotten == {
        ("0", "epoch", 2),
        ("0", "epoch", 3),
        ("0", "epoch", 4),
        ("0", "eval", None),
    }


def test_forget_plus_counts_from_the_current_config_not_from_old_ones() -> None:
    old = [rec("epoch", i, i, cfg={"lr": 0.1}) for i in range(4)]
    new = [rec("epoch", i, 10 + i, cfg={"lr": 0.2}) for i in range(4)]
    log = runlog(*old, rec("export", None, 4), *new)
    markers = plan_forget(log, parse_selector("epoch:2+"))
    forgotten = sorted(
        (r.started, r.name) for _, r in log.ordered() if any(covered(m, r) for m in markers)
    )
    # epoch 2 under both configs, and what started after the current epoch 2 (t=12)
    assert forgotten == [(2, "epoch"), (12, "epoch"), (13, "epoch")]


def test_forget_plus_of_a_run_wide_step_reaches_every_rank() -> None:
    log = runlog(
        rec("prep", None, 1, scope="run"),
        rec("epoch", 0, 5, scope="0"),
        rec("epoch", 0, 6, scope="1"),
    )
    markers = plan_forget(log, parse_selector("prep+"))
    assert {(m.scope, m.name) for m in markers} == {("run", "prep"), ("0", "epoch"), ("1", "epoch")}
    only_rank1 = plan_forget(log, parse_selector("prep+"), scopes={"1", "run"})
    assert {(m.scope, m.name) for m in only_rank1} == {("run", "prep"), ("1", "epoch")}


def test_forget_one_item_lists_its_ids_and_unknown_steps_plan_nothing() -> None:
    log = runlog(*(rec("epoch", i, i) for i in range(3)))
    (marker,) = plan_forget(log, parse_selector("epoch:1"))
    assert not marker.all and marker.since is None and len(marker.ids) == 1
    assert [covered(marker, r) for _, r in log.ordered()] == [False, True, False]
    assert plan_forget(log, parse_selector("nope")) == []
    assert plan_forget(log, parse_selector("epoch:9")) == []
    whole = plan_forget(log, None)
    assert [(m.name, m.all, m.selector) for m in whole] == [("epoch", True, "*")]


def test_explain_says_why_for_each_step() -> None:
    log = runlog(
        rec("prep", None, 1, scope="run"),
        rec("epoch", 0, 10),
        rec("epoch", 1, 11, status="failed", error="ValueError: boom"),
        rec("epoch", 2, 12, status="started", pid=7),
        rec("epoch", 3, 13, status="started", pid=8),
        rec("sweep", "a", 2, cfg={"lr": 0.1}),
        rec("sweep", "a", 14, cfg={"lr": 0.2}, status="started", pid=7),
    )
    log.add(
        99,
        ForgetMarker(
            run="r", scope="0", name="eval", ts=30, all=True, selector="eval", count=1, forgotten=[]
        ),
    )
    rows = {(e.name, str(e.key)): e for e in explain(log, rank="0", alive={("h", 8)}, now=40)}
    assert (rows[("prep", "None")].action, rows[("prep", "None")].reason) == ("skip", "done")
    assert rows[("epoch", "0")].reason == "done"
    assert rows[("epoch", "1")].reason == "failed" and "boom" in rows[("epoch", "1")].detail
    assert rows[("epoch", "2")].reason == "interrupted"
    assert rows[("epoch", "3")].reason == "running"
    sweep = rows[("sweep", "a")]
    assert sweep.reason == "interrupted" and "lr: 0.1 -> 0.2" in sweep.detail


def test_explain_with_the_config_a_restart_will_use() -> None:
    log = runlog(*(rec("epoch", i, i, cfg={"lr": 0.1, "_w": 1}) for i in range(2)))
    new = hashed({"lr": 0.2})
    rows = explain(log, configs={"epoch": (new.value, new.hash)}, now=10)
    assert [(e.action, e.reason) for e in rows] == [("run", "config changed")] * 2
    assert "lr: 0.1 -> 0.2" in rows[0].detail
    same = hashed({"lr": 0.1, "_w": 99})  # an ignored key changed: same step
    rows = explain(log, configs={"epoch": (same.value, same.hash)}, now=10)
    assert [e.reason for e in rows] == ["done", "done"]


def test_explain_reports_forgotten_steps_as_forced_until_they_are_logged_again() -> None:
    log = runlog(rec("epoch", 0, 1))
    markers = plan_forget(
        runlog(rec("epoch", 0, 1), rec("epoch", 1, 2)), parse_selector("epoch:1+"), now=5, by="cli"
    )
    log.add(10, markers[0])
    rows = explain(log, now=6)
    assert [(e.key, e.reason) for e in rows] == [(0, "done"), (1, "forced")]
    assert "epoch:1+" in rows[1].detail and "cli" in rows[1].detail
    log.add(11, rec("epoch", 1, 7))
    assert [e.reason for e in explain(log, now=8)] == ["done", "done"]


def test_rows_tell_running_from_interrupted() -> None:
    r = rec("epoch", 0, 1, status="started", pid=5)
    assert record_row(1, r, alive={("h", 5)})["status"] == "running"
    assert record_row(1, r)["status"] == "interrupted"
    assert record_row(1, rec("epoch", 0, 1))["step"] == "epoch[0]"


def test_config_diff_is_short_and_dotted() -> None:
    assert config_diff({"a": 1, "o": {"b": 2}, "c": 1}, {"a": 1, "o": {"b": 3}, "d": 4}) == [
        "-c",
        "+d=4",
        "o.b: 2 -> 3",
    ]
    assert len(config_diff({str(i): i for i in range(20)}, {})) == 6
