"""Rank and run detection for the launchers of distributed runs (torchrun, Lightning's DDP
launcher, SLURM), and the optional integrations staying optional."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT

from runctl.agent.env import detect_rank, detect_run, detect_world_size
from runctl.bus.subjects import check_token


@pytest.mark.parametrize(
    ("env", "rank"),
    [
        # torchrun sets RANK (and LOCAL_RANK): the global rank wins
        ({"RANK": "3", "LOCAL_RANK": "1", "GROUP_RANK": "1"}, "3"),
        # Lightning's DDP launcher: only LOCAL_RANK and NODE_RANK in the ranks it starts,
        # SLURM_PROCID inherited from the one task that launched them all
        ({"LOCAL_RANK": "1", "NODE_RANK": "0", "SLURM_PROCID": "0"}, "1"),
        ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, "0"),
        ({"LOCAL_RANK": "1", "NODE_RANK": "2"}, "2-1"),
        # srun: one task per rank
        ({"SLURM_PROCID": "5", "SLURM_LOCALID": "1"}, "5"),
        # LOCAL_RANK alone (no launcher we know) is not a global rank
        ({"LOCAL_RANK": "1"}, "0"),
    ],
)
def test_rank_from_distributed_launchers(env: dict[str, str], rank: str) -> None:
    assert detect_rank(env) == rank
    assert check_token(rank) == rank


def test_torchrun_without_a_rendezvous_id_shares_its_master_address() -> None:
    worker = {
        "TORCHELASTIC_RUN_ID": "none",
        "MASTER_ADDR": "node-1.cluster",
        "MASTER_PORT": "29500",
        "RANK": "0",
    }
    run = detect_run(worker)
    assert run == "torchrun-node-1-cluster-29500"
    assert detect_run({**worker, "RANK": "7"}) == run  # every worker, every node: one run
    # an explicit id, or the job's, still wins
    assert detect_run({**worker, "TORCHELASTIC_RUN_ID": "job-9"}) == "job-9"
    assert detect_run({**worker, "SLURM_JOB_ID": "12"}) == "slurm-12"


def test_world_size_from_the_launchers() -> None:
    assert detect_world_size({"WORLD_SIZE": "2", "LOCAL_RANK": "1", "NODE_RANK": "0"}) == 2
    assert detect_world_size({"SLURM_NTASKS": "8"}) == 8


def test_importing_agent_never_imports_torch_or_lightning() -> None:
    code = (
        "import sys, runctl, runctl.agent.integrations\n"
        "heavy = sorted(m for m in ('torch', 'lightning', 'pytorch_lightning')"
        " if m in sys.modules)\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
