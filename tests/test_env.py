"""Run id, rank and world size from the launcher's environment (explicit env dicts), and the
defaults ``control()`` takes from them."""

from __future__ import annotations

import os
import re

import pytest
from pydantic import BaseModel

from runctl.agent import Agent, control
from runctl.agent.env import detect_rank, detect_run, detect_world_size, generate_run_id
from runctl.bus import BadToken, Client, Result
from runctl.bus.subjects import check_token


class S(BaseModel):
    x: int = 0


# --- detect_run ---------------------------------------------------------------------------


def test_run_explicit_wins_and_is_not_rewritten() -> None:
    env = {"RUNCTL_RUN": "exp1", "TORCHELASTIC_RUN_ID": "tr", "SLURM_JOB_ID": "12"}
    assert detect_run(env) == "exp1"
    # explicit ids are validated as given (by the agent), never silently rewritten
    assert detect_run({"RUNCTL_RUN": "my.run"}) == "my.run"


def test_run_from_torchrun_then_slurm() -> None:
    assert detect_run({"TORCHELASTIC_RUN_ID": "job-7", "SLURM_JOB_ID": "12"}) == "job-7"
    # torchrun's default id "none" is not a run id
    assert detect_run({"TORCHELASTIC_RUN_ID": "none", "SLURM_JOB_ID": "12"}) == "slurm-12"
    assert detect_run({"SLURM_JOB_ID": "12", "SLURM_STEP_ID": "3"}) == "slurm-12-3"


def test_launcher_ids_are_made_subject_safe() -> None:
    run = detect_run({"TORCHELASTIC_RUN_ID": "host.example:29500/x"})
    assert run == "host-example-29500-x"
    assert check_token(run) == run
    assert detect_run({"TORCHELASTIC_RUN_ID": "..."}) == "run"


def test_generated_run_id_is_a_token_and_a_dict_env_is_not_written_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RUNCTL_RUN", raising=False)
    env: dict[str, str] = {}
    run = detect_run(env)
    assert check_token(run) == run
    assert re.fullmatch(r"run-\d{8}-\d{6}-[0-9a-f]{4}", run)
    assert env == {} and "RUNCTL_RUN" not in os.environ
    assert generate_run_id() != generate_run_id()


def test_generated_run_id_is_shared_with_children_through_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key in ("RUNCTL_RUN", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        monkeypatch.setenv(key, "")  # recorded, so the teardown removes what detect_run sets
        monkeypatch.delenv(key)
    run = detect_run()
    assert os.environ["RUNCTL_RUN"] == run
    assert detect_run() == run  # a second call (a child process) joins the same run


# --- detect_rank / detect_world_size -----------------------------------------------------


@pytest.mark.parametrize(
    ("env", "rank"),
    [
        ({}, "0"),
        ({"RUNCTL_RANK": "5", "RANK": "1", "SLURM_PROCID": "2"}, "5"),
        ({"RANK": "1", "SLURM_PROCID": "2"}, "1"),
        ({"SLURM_PROCID": "2", "PMI_RANK": "3"}, "2"),
        ({"PMI_RANK": "3", "OMPI_COMM_WORLD_RANK": "4"}, "3"),
        ({"OMPI_COMM_WORLD_RANK": "4"}, "4"),
        ({"RUNCTL_RANK": "", "RANK": "6"}, "6"),  # an empty variable is not set
        ({"RUNCTL_RANK": "worker-a"}, "worker-a"),
    ],
)
def test_detect_rank(env: dict[str, str], rank: str) -> None:
    assert detect_rank(env) == rank


@pytest.mark.parametrize(
    ("env", "size"),
    [
        ({}, None),
        ({"RUNCTL_WORLD_SIZE": "8", "WORLD_SIZE": "4"}, 8),
        ({"WORLD_SIZE": "4", "SLURM_NTASKS": "2"}, 4),
        ({"SLURM_NTASKS": "2"}, 2),
        ({"PMI_SIZE": "3"}, 3),
        ({"OMPI_COMM_WORLD_SIZE": "16"}, 16),
        ({"WORLD_SIZE": "many", "SLURM_NTASKS": "2"}, 2),  # not a number: skipped
    ],
)
def test_detect_world_size(env: dict[str, str], size: int | None) -> None:
    assert detect_world_size(env) == size


# --- what control() / Agent take from the environment ------------------------------------


@pytest.mark.parametrize(
    ("env", "rank"),
    [
        ({"RUNCTL_RANK": "3", "RANK": "1"}, "3"),
        ({"RANK": "1", "SLURM_PROCID": "2"}, "1"),
        ({"SLURM_PROCID": "2"}, "2"),
    ],
)
def test_agent_defaults_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], rank: str
) -> None:
    for key in (
        "RUNCTL_RANK",
        "RANK",
        "SLURM_PROCID",
        "PMI_RANK",
        "OMPI_COMM_WORLD_RANK",
        "RUNCTL_WORLD_SIZE",
        "WORLD_SIZE",
    ):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RUNCTL_RUN", "from-env")
    monkeypatch.setenv("WORLD_SIZE", "4")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    agent = Agent(S(), url="nats://127.0.0.1:1")  # no connection is made before serve()
    assert (agent.run, agent.rank, agent.world_size) == ("from-env", rank, 4)


def test_explicit_arguments_beat_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNCTL_RUN", "from-env")
    monkeypatch.setenv("RUNCTL_RANK", "9")
    agent = Agent(S(), run="given", rank=2, url="nats://127.0.0.1:1")
    assert (agent.run, agent.rank) == ("given", "2")


def test_a_bad_run_from_the_environment_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNCTL_RUN", "my.run")
    with pytest.raises(BadToken) as info:
        control(S(), url="nats://127.0.0.1:1")
    assert info.value.value == "my.run" and info.value.what == "run"


@pytest.mark.anyio
async def test_control_serves_the_run_and_rank_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, nats_url: str, run_id: str
) -> None:
    monkeypatch.setenv("RUNCTL_RUN", run_id)
    monkeypatch.delenv("RUNCTL_RANK", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("RUNCTL_NATS_URL", nats_url)
    with control(S()) as ctl:
        ctl.wait_ready()
        assert (ctl.run, ctl.rank, ctl.url) == (run_id, "3", nats_url)
        async with await Client.connect(nats_url) as client:
            result = await client.set(run_id, 3, "x", 7)
            assert isinstance(result, Result) and result.rank == "3"
        assert ctl.state.x == 7
