"""cluster.yaml (the `ray up` config) passes Ray's own cluster-config validation, offline.

`ray up` loads the YAML, runs ``prepare_config`` (merges the provider's defaults.yaml, folds
``setup_commands`` into the head/worker lists, fills per-type worker limits) and then ``validate_config``
(ray-schema.json plus cross-field checks) before it talks to AWS. The tests run those same two functions
from the installed ray package, so they need neither credentials, boto3 nor network.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.providers import _NODE_PROVIDERS
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parent.parent
CLUSTER_YAML = REPO / "cluster.yaml"
LOCK_INSTALL = "~/venv/bin/pip install -r ~/rayuda/requirements.lock"
# the head's first interface address: its VPC-private IP (EC2 never puts the public IP on an interface)
HEAD_PRIVATE_IP = "$(hostname -I | awk '{print $1}')"


def raw_config() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_validated(raw: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does to the YAML before any cloud call (ray.autoscaler._private.commands._bootstrap_config)."""
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return ray_validated(raw_config())


def test_cluster_yaml_passes_ray_validation(config):
    assert config["cluster_name"] == "rayuda"
    assert config["provider"]["type"] == "aws" and "aws" in _NODE_PROVIDERS
    assert config["auth"]["ssh_user"] == "ubuntu"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"].get("CPU") == 0, "trials must not fit the head"
    assert head["max_workers"] == 0
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert workers and all(t["resources"].get("GPU", 0) >= 1 and t["min_workers"] == 0 for t in workers.values())
    assert 0 < sum(t["max_workers"] for t in workers.values()) and config["max_workers"] > 0
    assert config["file_mounts"] == {"~/rayuda": ".", "~/.ray/auth_token": "~/.ray/auth_token"}
    assert (REPO / "requirements.lock").is_file() and (REPO / "pyproject.toml").is_file()


def _drop(path: str):
    def mutate(c):
        *parents, key = path.split(".")
        node = c
        for p in parents:
            node = node[p]
        del node[key]
    return mutate


def _set(path: str, value: Any):
    def mutate(c):
        *parents, key = path.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[key] = value
    return mutate


@pytest.mark.parametrize("mutate, error", [
    (_set("head_nodes", {"InstanceType": "m5.large"}), jsonschema.ValidationError),   # unknown top-level key
    (_drop("available_node_types.gpu_worker.node_config"), jsonschema.ValidationError),
    (_drop("available_node_types.gpu_worker.resources"), jsonschema.ValidationError),
    (_set("available_node_types.gpu_worker.resources", {"CPU": 4, "GPU": 0.5}), jsonschema.ValidationError),
    (_set("available_node_types.gpu_worker.spot", True), jsonschema.ValidationError),  # unknown node-type key
    (_set("max_workers", "eight"), jsonschema.ValidationError),
    (_set("head_node_type", "cpu_head"), ValueError),                                  # not a declared node type
    (_set("available_node_types.gpu_worker.min_workers", 9), ValueError),              # above global max_workers
], ids=["unknown-top-level-key", "no-node_config", "no-resources", "fractional-gpu", "unknown-node-type-key",
        "max_workers-not-int", "unknown-head-type", "min-above-max"])
def test_broken_copies_are_rejected(mutate, error):
    broken = raw_config()
    mutate(broken)
    with pytest.raises(error):
        ray_validated(broken)


# -- MLflow on the head --------------------------------------------------------------------------------
def mlflow_bind_hosts(commands: list[str]) -> list[str]:
    """The --host of each `mlflow server` in commands, with a $VAR set earlier in the same command substituted."""
    hosts = []
    for cmd in commands:
        server = re.search(r"\bmlflow server\b(.*)", cmd)
        if server is None:
            continue
        flag = re.search(r"(?:--host|-h)(?:=|\s+)(\$\([^)]*\)|\S+)", server.group(1))
        host = flag.group(1) if flag else "127.0.0.1"  # MLflow's default
        variable = re.fullmatch(r"\$\{?(\w+)\}?", host)
        if variable:
            assigned = re.search(rf"\b{variable.group(1)}=(\$\([^)]*\)|[^\s;]+)", cmd[:server.start()])
            host = assigned.group(1) if assigned else host
        hosts.append(host)
    return hosts


def is_private_bind(host: str) -> bool:
    if host == HEAD_PRIVATE_IP:
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False  # a hostname or any other expression may resolve to a public or wildcard address
    return (address.is_private or address.is_loopback) and not address.is_unspecified


def test_mlflow_server_binds_the_heads_private_address_only(config):
    commands = config["head_start_ray_commands"]
    hosts = mlflow_bind_hosts(commands)
    assert hosts == [HEAD_PRIVATE_IP], hosts
    assert all(is_private_bind(h) for h in hosts)
    server = next(c for c in commands if "mlflow server" in c)
    assert "--port 5000" in server and "/mnt/shared/mlflow" in server
    assert "--disable-security-middleware" not in server and "--allowed-hosts" not in server
    relay = [c for c in commands if "socat" in c]  # the loopback end of `ray attach -p 5000`
    assert relay and all("bind=127.0.0.1" in c for c in relay)
    for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
        assert not rule.get("FromPort", 0) <= 5000 <= rule.get("ToPort", -1), "never open MLflow's port"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "54.12.34.56", "mlflow.example.com", "$(curl ifconfig.me)"])
def test_public_mlflow_binds_are_caught(config, host):
    commands = [c.replace("--host $HEAD_IP", f"--host {host}") for c in config["head_start_ray_commands"]]
    assert commands != config["head_start_ray_commands"], "cluster.yaml changed: update this test's substitution"
    assert not all(is_private_bind(h) for h in mlflow_bind_hosts(commands))


# -- the environment on every node ---------------------------------------------------------------------
def node_setup_commands(config: dict[str, Any]) -> dict[str, list[str]]:
    """Setup commands each node type really runs (after Ray's merge; a per-type list overrides the global)."""
    out = {}
    for name, node_type in config["available_node_types"].items():
        if name == config["head_node_type"]:
            out[name] = config["head_setup_commands"]
        else:
            out[name] = node_type.get("worker_setup_commands", config["worker_setup_commands"])
    return out


def test_every_node_installs_the_locked_environment(config):
    lock = (REPO / "requirements.lock").read_text()
    ray_pin = re.search(r"^ray==(\S+)$", lock, re.M).group(1)
    for name, commands in node_setup_commands(config).items():
        script = "\n".join(commands)
        assert "python3 -m venv ~/venv" in script, name
        assert script.count(LOCK_INSTALL) == 1, name
        assert script.index("python3 -m venv ~/venv") < script.index(LOCK_INSTALL) < script.index(
            "~/venv/bin/pip install --no-deps -e ~/rayuda"), name
        assert "mount -t nfs" not in script, name  # the EFS is mounted on the host (initialization_commands)
        # every pip is the venv's (a bare `pip`, e.g. Ray's default boto3 line, would hit the system Python)
        pips = re.findall(r"(\S*)\bpip3? install", script)
        assert pips and all(p == "~/venv/bin/" for p in pips), (name, pips)
        for pin in re.findall(r"ray\[[\w,]+\]==(\S+?)[\"'\s]", script):
            assert pin == ray_pin, (name, pin, ray_pin)
    host = "\n".join(config["initialization_commands"])  # on the host, also when the nodes run in docker
    assert "mount -t nfs" in host and "/mnt/shared" in host and "nfs-common" in host
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if re.search(r"\bray (start|stop)\b", c)]
        assert len(starts) == 2 and all("~/venv/bin/ray " in c for c in starts), key
    assert "--address=$RAY_HEAD_IP:6379" in config["worker_start_ray_commands"][-1]
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][1]


# -- the container path: rayuda's image through Ray's docker: section ------------------------------------
DOCKERFILE = REPO / "Dockerfile"


def docker_section() -> dict[str, Any]:
    """cluster.yaml's commented-out ``docker:`` section, uncommented and parsed."""
    lines = CLUSTER_YAML.read_text().splitlines()
    start = lines.index("# docker:")
    block = [lines[start][2:]]
    for line in lines[start + 1:]:
        if not line.startswith("#   "):
            break
        block.append(line[2:])
    return yaml.safe_load("\n".join(block))


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines()
                                      if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^(\w+)\s+(.*)$", text, re.M)]


def test_the_docker_section_passes_ray_validation_and_keeps_every_command(config):
    docker = docker_section()
    assert set(docker) == {"docker"} and docker["docker"]["image"].endswith("/rayuda:TAG")
    with_docker = ray_validated({**raw_config(), **docker})
    options = " ".join(with_docker["docker"]["run_options"])
    assert "-v /mnt/shared:/mnt/shared" in options and "nofile=65536" in options  # the host's EFS, passed in
    assert with_docker["docker"]["worker_run_options"] == ["--gpus all"]
    for key in ("initialization_commands", "head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
                "worker_start_ray_commands"):
        assert with_docker[key] == config[key], key  # the same commands serve both ways


def test_the_dockerfile_builds_the_layout_cluster_yaml_and_kuberay_expect():
    steps = dockerfile_instructions()
    kinds = [kind for kind, _ in steps]
    assert kinds[0] == "FROM" and re.match(r"python:3\.1[1-9]", steps[0][1])  # the lock needs Python >= 3.11
    runs = [args for kind, args in steps if kind == "RUN"]
    script = " ".join(runs)
    for package in ("rsync", "wget", "iproute2", "socat", "openssh-client"):
        assert package in runs[0], package
    assert "--uid 1000" in runs[0] and " ray" in runs[0] and ("USER", "ray") in steps
    assert "python -m venv /home/ray/venv" in script  # ~/venv: the path of cluster.yaml's commands
    assert "pip install -q -r /home/ray/venv-lock/requirements.lock" in script
    assert "sed -n 's/^ray==//p' /home/ray/venv-lock/requirements.lock" in script  # ray[default] at the lock's ray
    assert '"ray[default]==${RAY_VERSION}"' in script and "boto3" in script
    assert "cp /home/ray/venv-lock/requirements.lock /home/ray/venv/requirements.lock" in script
    assert "pip install -q --no-deps -e /home/ray/rayuda" in script
    copies = [args for kind, args in steps if kind == "COPY"]
    assert copies == ["--chown=ray:ray requirements.lock /home/ray/venv-lock/requirements.lock",
                      "--chown=ray:ray . /home/ray/rayuda"]  # the lock's layer before the code's
    assert any(kind == "ENV" and "RAYUDA_GIT_COMMIT=${RAYUDA_GIT_COMMIT}" in args for kind, args in steps)
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    assert {".git", ".venv", "mlflow.db", "rayuda_results"} <= set(ignored)


def _fake_home(tmp_path: Path, same_lock: bool) -> tuple[Path, dict[str, str]]:
    """A home with ~/rayuda/requirements.lock, an image-like ~/venv and stub pip/python3 that log their calls."""
    home = tmp_path / "home"
    (home / "rayuda").mkdir(parents=True)
    (home / "rayuda" / "requirements.lock").write_text((REPO / "requirements.lock").read_text())
    (home / "venv" / "bin").mkdir(parents=True)
    (home / "venv" / "requirements.lock").write_text((REPO / "requirements.lock").read_text() + ("" if same_lock
                                                                                                  else "extra==1\n"))
    log, stubs = tmp_path / "calls.log", tmp_path / "bin"
    stubs.mkdir()
    for path in (home / "venv" / "bin" / "pip", stubs / "python3"):
        path.write_text(f'#!/bin/sh\necho "$(basename $0) $*" >> {log}\n')
        path.chmod(0o755)
    return log, {"HOME": str(home), "PATH": f"{stubs}:/usr/bin:/bin"}


@pytest.mark.parametrize("same_lock", [True, False], ids=["image-holds-this-lock", "another-lock"])
def test_the_setup_command_installs_the_lock_only_when_the_venv_lacks_it(config, tmp_path, same_lock):
    import subprocess

    install = next(c for c in config["worker_setup_commands"] if "requirements.lock" in c)
    log, env = _fake_home(tmp_path, same_lock)
    subprocess.run(["bash", "-c", install], env=env, check=True, capture_output=True)
    calls = log.read_text().splitlines()
    home = env["HOME"]
    editable = f"pip install --no-deps -e {home}/rayuda"
    if same_lock:
        assert calls == [editable]  # rayuda's image: no reinstall of several GB
    else:
        assert calls == [f"python3 -m venv {home}/venv", f"pip install -r {home}/rayuda/requirements.lock", editable]
        assert Path(home, "venv", "requirements.lock").read_text() == (REPO / "requirements.lock").read_text()


def test_every_ray_start_uses_token_authentication(config):
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in config[key]
              if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ~/venv/bin/ray start" in c for c in starts)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # the laptop's token, on every node
    for name, commands in node_setup_commands(config).items():  # drivers started in a shell on a node use it too
        assert any("export RAY_AUTH_MODE=token" in c for c in commands), name
