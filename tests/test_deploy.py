"""The deployment recipes of docs/deploy.md, checked as far as this machine allows: no
container runtime that can pull an image, no Kubernetes, no SLURM. So the files are
validated by parsing (YAML structure, every ``runctl`` command through runctl's own
argument parser, paths and names that must line up across services), and the part that is
runctl's own, the accounts file the Kubernetes recipe cuts out of nats.conf, runs in a real
nats-server with TLS. docs/deploy.md says which recipe was run and which was not."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import anyio
import pytest
import yaml
from conftest import ROOT

from runctl.bus.connection import connect
from runctl.bus.credentials import ensure_credentials
from runctl.bus.errors import Unavailable
from runctl.bus.server import NatsServer, packaged_config
from runctl.bus.tls import CA_ENV, ensure_tls
from runctl.cli import server as cli_server
from runctl.cli.app import PROGRAMS, build_parser
from runctl.gateway.main import serve_parser, tokens_parser

DEPLOY = ROOT / "docs" / "deploy"
COMPOSE_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


def parse(argv: list[str]) -> argparse.Namespace:
    """``runctl ARGV`` as runctl parses it (exits the test on a bad option): ``gateway``
    and ``tokens`` are the gateway's own program, with the options given before them."""
    for i, word in enumerate(argv):
        if word in PROGRAMS:
            parser = serve_parser() if word == "gateway" else tokens_parser()
            before = argv[:i] if word == "gateway" else []
            args = parser.parse_args([*before, *argv[i + 1 :]])
            args.command = word
            return args
        if not word.startswith("-"):
            break
    return build_parser().parse_args(argv)


def expand(value: str, env: dict[str, str]) -> str:
    """Compose's and the shell's ``${VAR:-default}`` and ``$VAR`` (what these files use)."""
    value = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m[1], m[2]), value)
    return re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m[1], m[0]), value)


# --- docker compose ------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def service_args(service: dict[str, Any], env: dict[str, str]) -> argparse.Namespace:
    return parse([expand(str(a), env) for a in service["command"]])


def test_compose_file_structure() -> None:
    data = compose()
    assert set(data) <= {"name", "services", "volumes", "networks", "x-runctl"}
    services = data["services"]
    assert set(services) == {"init", "nats", "gateway"}
    for name, service in services.items():
        # the YAML merge key brought the shared settings into each service
        assert service["image"] == "runctl:0.1.0", name
        assert service["build"]["dockerfile"] == "docs/deploy/Dockerfile"
        assert (ROOT / "docs" / "deploy" / ".." / ".." / service["build"]["dockerfile"]).is_file()
        assert service["working_dir"] == "/data"
        assert service["volumes"] == ["runctl-data:/data"]
        for volume in service["volumes"]:
            assert volume.split(":")[0] in data["volumes"]
        for dep, how in service.get("depends_on", {}).items():
            assert dep in services and how["condition"] in COMPOSE_CONDITIONS
        for mapping in service.get("ports", []):
            host, container = mapping.split(":")
            assert host.isdigit() and container.isdigit()
    assert services["init"]["restart"] == "no"
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["runctl"]' in dockerfile and "WORKDIR /data" in dockerfile


def test_compose_commands_are_runctl_commands_that_fit_together() -> None:
    services = compose()["services"]
    env = {"RUNCTL_PUBLIC_NAME": "runctl.example.org"}
    init = service_args(services["init"], env)
    nats = service_args(services["nats"], env)
    gateway = service_args(services["gateway"], env)
    assert init.command == "tokens" and gateway.command == "gateway"
    assert nats.func is cli_server.up_command
    # nats: TLS, every interface, a certificate for the gateway's name and the public one
    assert (
        nats.tls and nats.host == "0.0.0.0" and nats.tls_host == ["nats", env["RUNCTL_PUBLIC_NAME"]]
    )
    assert services["nats"]["ports"] == [f"{nats.port or 4222}:{nats.port or 4222}"]
    # what `runctl up` writes in its working directory is what the gateway reads
    workdir = PurePosixPath(services["nats"]["working_dir"])
    tls_dir = workdir / nats.tls_dir
    assert gateway.tls_cert == str(tls_dir / "server.pem")
    assert gateway.tls_key == str(tls_dir / "server-key.pem")
    assert services["gateway"]["environment"][CA_ENV] == str(tls_dir / "ca.pem")
    assert services["nats"]["environment"][CA_ENV] == str(tls_dir / "ca.pem")
    assert gateway.tokens_file == init.file
    assert gateway.url == "tls://nats:4222" and gateway.host == "0.0.0.0"
    assert services["gateway"]["ports"] == [f"{gateway.port}:{gateway.port}"]
    assert services["gateway"]["working_dir"] == str(workdir)  # finds operator.env there
    assert services["gateway"]["depends_on"] == {
        "init": {"condition": "service_completed_successfully"},
        "nats": {"condition": "service_healthy"},
    }
    check = services["nats"]["healthcheck"]["test"]
    assert check[:2] == ["CMD", "runctl"]
    health = parse(check[2:])
    assert health.url == f"tls://localhost:{nats.port or 4222}" and health.command == "ls"


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker CLI")
def test_compose_config_when_docker_compose_is_there() -> None:
    found = subprocess.run(
        ["docker", "compose", "version"], capture_output=True, text=True, check=False
    )
    if found.returncode != 0:
        pytest.skip("the docker CLI has no compose plugin here: validated by parsing only")
    done = subprocess.run(
        ["docker", "compose", "-f", str(DEPLOY / "compose.yaml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


# --- Kubernetes ----------------------------------------------------------------------------


def test_k8s_gateway_manifest_lines_up() -> None:
    deployment, service = yaml.safe_load_all((DEPLOY / "k8s" / "gateway.yaml").read_text())
    assert deployment["kind"] == "Deployment" and service["kind"] == "Service"
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = parse(container["args"])
    assert args.command == "gateway" and args.host == "0.0.0.0"
    assert args.url == "tls://nats.runctl.svc.cluster.local:4222"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v["secret"] for v in pod["volumes"]}

    def secret_of(path: str) -> tuple[str, str]:
        folder, name = str(PurePosixPath(path).parent), PurePosixPath(path).name
        secret = volumes[mounts[folder]]
        keys = [i["key"] for i in secret.get("items", [])] or [name]
        assert name in keys, (path, secret)
        return secret["secretName"], name

    assert secret_of(args.tls_cert) == ("runctl-gateway-tls", "tls.crt")
    assert secret_of(args.tls_key) == ("runctl-gateway-tls", "tls.key")
    assert secret_of(args.tokens_file) == ("runctl-gateway-tokens", "gateway-tokens")
    env = {e["name"]: e for e in container["env"]}
    assert secret_of(env[CA_ENV]["value"]) == ("runctl-nats-tls", "ca.crt")
    assert env["RUNCTL_NATS_USER"]["value"] == "runctl-operator"
    ref = env["RUNCTL_NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "runctl-nats-passwords", "key": "RUNCTL_OPERATOR_PASSWORD"}
    (port,) = container["ports"]
    assert port["containerPort"] == args.port
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_k8s_values_bring_runctls_passwords_and_tls() -> None:
    values = yaml.safe_load((DEPLOY / "k8s" / "nats-values.yaml").read_text())
    config = values["config"]
    assert config["jetstream"]["enabled"] and config["cluster"]["replicas"] == 3
    assert config["nats"]["tls"]["secretName"] == config["cluster"]["tls"]["secretName"]
    assert config["cluster"]["tls"]["merge"] == {"verify": True}
    assert config["merge"]["00$include"] == "runctl-accounts.conf"
    accounts = accounts_block()
    for var in ("RUNCTL_AGENT_PASSWORD", "RUNCTL_OPERATOR_PASSWORD", "RUNCTL_OBSERVER_PASSWORD"):
        assert f"${var}" in accounts
        ref = values["container"]["env"][var]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "runctl-nats-passwords", "key": var}
    doc = (ROOT / "docs" / "deploy.md").read_text()
    assert "--set-file 'configMap.merge.data.runctl-accounts\\.conf=runctl-accounts.conf'" in doc


def accounts_block() -> str:
    """The recipe's own command: the accounts block cut out of the packaged nats.conf."""
    done = subprocess.run(
        ["awk", r"/^accounts \{/,/^\}/", str(packaged_config())],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def test_k8s_accounts_file_runs_in_a_real_server_with_tls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the chart renders, as far as runctl is concerned: the included accounts file,
    JetStream, TLS on the client port; logins over TLS as in the cluster."""
    accounts = tmp_path / "runctl-accounts.conf"
    accounts.write_text(accounts_block())
    assert (
        accounts.read_text().startswith("accounts {") and "runctl-operator" in accounts.read_text()
    )
    tls = ensure_tls(tmp_path / "tls", ["nats", "nats.runctl.svc.cluster.local"])
    creds = ensure_credentials(tmp_path / "credentials", env={})
    server = NatsServer(config_file=accounts, store_dir=tmp_path / "nats", tls=tls)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in creds.server_env().items():
            mp.setenv(key, value)
        server.start()
    try:
        monkeypatch.setenv(CA_ENV, str(tls.ca))
        for var in ("RUNCTL_NATS_USER", "RUNCTL_NATS_PASSWORD", "RUNCTL_NATS_URL"):
            monkeypatch.delenv(var, raising=False)

        async def operator_has_jetstream() -> bool:
            nc = await connect(server.url, **creds.auth("operator"))
            try:
                url = nc.connected_url
                return bool(url is not None and url.scheme == "tls" and nc.is_connected)
            finally:
                await nc.close()

        async def nobody() -> None:
            await connect(server.url, user="runctl-operator", password="wrong" * 4)

        assert anyio.run(operator_has_jetstream)
        with pytest.raises(Unavailable, match="Authorization"):
            anyio.run(nobody)
    finally:
        server.stop()


# --- SLURM ---------------------------------------------------------------------------------


def test_slurm_script_commands_parse_and_point_at_runctls_files() -> None:
    script = (DEPLOY / "slurm.sbatch").read_text()
    env = {"head": "node001", "store": "/scratch/runctl-1", "SLURM_JOB_ID": "1", "PWD": "/home/u"}
    lines = [line.strip() for line in script.replace("\\\n", " ").splitlines()]
    up_line = next(line for line in lines if line.startswith("srun") and " up " in line)
    argv = shlex.split(expand(up_line, env).rstrip("&"))
    up = parse(argv[argv.index("runctl") + 1 :])
    assert up.func is cli_server.up_command and up.tls and up.tls_host == ["node001"]
    assert up.host == "0.0.0.0" and up.store_dir == "/scratch/runctl-1"
    exports = dict(
        shlex.split(expand(line.removeprefix("export "), env))[0].split("=", 1)
        for line in lines
        if line.startswith("export ")
    )
    assert exports["RUNCTL_NATS_URL"] == f"tls://node001:{up.port or 4222}"
    assert exports[CA_ENV] == f"/home/u/{up.tls_dir}/ca.pem"
    assert exports["RUNCTL_RUN"] == "slurm-1"
    wait = next(line for line in lines if line.startswith("until runctl"))
    assert parse(shlex.split(wait)[2:3]).command == "ls"
    # docs/deploy.md shows the same commands as the script
    doc = (ROOT / "docs" / "deploy.md").read_text()
    block = doc.split("[`deploy/slurm.sbatch`](deploy/slurm.sbatch):", 1)[1].split("```")[1]
    for line in block.splitlines()[1:]:
        if line.strip():
            assert line in script, line


def test_runctl_tls_writes_certificates_for_a_server_started_elsewhere(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "runctl",
            "tls",
            "--tls-host",
            "nats-0.nats-headless",
            "--tls-dir",
            str(tmp_path / "tls"),
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "nats-0.nats-headless" in done.stderr
    assert (tmp_path / "tls" / "server.pem").is_file()
    assert not (tmp_path / "nats").exists()  # nothing started, no store
