"""Static checks of the Docker stack: docker/compose.yml, docker/Dockerfile, .dockerignore.

These machines have no Docker engine, so the stack is checked as data: the compose file is
parsed and every wiring a broken `docker compose up` would reveal late (wrong Kafka version,
a listener clients cannot reach, a service starting before its topics exist, a command the
CLI does not have) is asserted here.
"""

from __future__ import annotations

import json
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
COMPOSE = REPO / "docker" / "compose.yml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
POM = REPO / "pipeline" / "kafka" / "pom.xml"

PROJECT_SERVICES = ("topics", "worker", "trainer", "trainer-gpu", "server", "devices")
LONG_LIVED = ("kafka", "worker", "trainer", "trainer-gpu", "server")

# The `fedex` commands compose may run: top-level name -> the sub-commands it may be given
# (empty: a plain command, whose further arguments are options and their values).
FEDEX_COMMANDS: dict[str, frozenset[str]] = {
    "worker": frozenset(),
    "trainer": frozenset(),
    "serve": frozenset(),
    "devices": frozenset(),
    "topics": frozenset({"ensure"}),
}

#: Commands compose already runs whose implementation lands with a later issue. The CLI
#: check skips exactly these, so the list must shrink to nothing as the issues land.
NOT_YET_IN_CLI: dict[str, str] = {}

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict), "compose.yml must be a mapping"
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def kafka_env(services: dict[str, dict[str, Any]]) -> dict[str, str]:
    env = services["kafka"]["environment"]
    assert isinstance(env, dict), "kafka environment must be a mapping"
    return {key: str(value) for key, value in env.items()}


def pom_kafka_version() -> str:
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    version = ET.parse(POM).getroot().findtext("m:properties/m:kafka.version", namespaces=ns)
    assert version, f"no <kafka.version> property in {POM}"
    return version.strip()


def command_args(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    assert command, "project services must say which fedex command they run"
    return shlex.split(command) if isinstance(command, str) else [str(arg) for arg in command]


def option_value(args: list[str], option: str) -> str:
    assert option in args, f"{option} missing from {args}"
    return args[args.index(option) + 1]


def listener_map(spec: str) -> dict[str, str]:
    """'NAME://host:port,...' -> {NAME: 'host:port'}."""
    out = {}
    for item in spec.split(","):
        name, _, address = item.strip().partition("://")
        out[name] = address
    return out


def port_of(address: str) -> str:
    return address.rpartition(":")[2]


def published(service: dict[str, Any]) -> set[tuple[str, str]]:
    """Short-syntax port mappings as (host port, container port)."""
    pairs = set()
    for mapping in service.get("ports", []):
        parts = str(mapping).split(":")
        assert len(parts) >= 2, f"port {mapping!r} is not published to a fixed host port"
        pairs.add((parts[-2], parts[-1]))
    return pairs


def named_volume_mounts(service: dict[str, Any]) -> dict[str, str]:
    """Short-syntax named-volume mounts as {volume: container path}."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, _, target = str(volume).partition(":")
        if not source.startswith((".", "/", "~")):
            mounts[source] = target.split(":")[0]
    return mounts


def healthcheck_words(service: dict[str, Any]) -> list[str]:
    check = service.get("healthcheck")
    assert check, "service has no healthcheck"
    test = check["test"]
    assert isinstance(test, list), "healthcheck test must be an exec-form list"
    assert test[0] in ("CMD", "CMD-SHELL"), f"healthcheck test must start with CMD: {test}"
    assert len(test) > 1, "healthcheck test has no command"
    for key in ("interval", "retries", "start_period"):
        assert key in check, f"healthcheck lacks {key}"
    return [str(word) for word in test[1:]]


def test_services_exist_and_no_version_key(compose: dict[str, Any]) -> None:
    assert "version" not in compose, "the compose spec has no `version:` key"
    assert set(compose["services"]) == {"kafka", *PROJECT_SERVICES}


def test_kafka_image_matches_pom(services: dict[str, dict[str, Any]]) -> None:
    repository, _, tag = services["kafka"]["image"].partition(":")
    assert repository == "apache/kafka"
    assert tag == pom_kafka_version(), "docker/compose.yml and pipeline/kafka/pom.xml disagree"


def test_kafka_is_single_node_kraft(kafka_env: dict[str, str]) -> None:
    assert set(kafka_env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node_id = kafka_env["KAFKA_NODE_ID"]
    voters = kafka_env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
    assert [voter.partition("@")[0] for voter in voters] == [node_id]
    controller = kafka_env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    listeners = listener_map(kafka_env["KAFKA_LISTENERS"])
    assert controller in listeners
    assert port_of(voters[0]) == port_of(listeners[controller])
    for key in (
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
    ):
        assert kafka_env[key] == "1", key
    assert kafka_env["KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS"] == "0"


def test_kafka_accepts_model_topic_messages(kafka_env: dict[str, str]) -> None:
    from pipeline.settings import Settings

    broker_max = int(kafka_env["KAFKA_MESSAGE_MAX_BYTES"])
    assert broker_max == 16 * MIB
    assert broker_max >= Settings.model_fields["max_message_bytes"].default


def test_kafka_listeners_reach_clients(
    compose: dict[str, Any], services: dict[str, dict[str, Any]], kafka_env: dict[str, str]
) -> None:
    listeners = listener_map(kafka_env["KAFKA_LISTENERS"])
    advertised = listener_map(kafka_env["KAFKA_ADVERTISED_LISTENERS"])
    protocols = listener_map(kafka_env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].replace(":", "://"))
    assert set(listeners) <= set(protocols), "every listener needs a security protocol"
    assert set(advertised) <= set(listeners), "advertised listeners must be bound"
    assert kafka_env["KAFKA_CONTROLLER_LISTENER_NAMES"] not in advertised
    for name, address in advertised.items():
        assert port_of(address) == port_of(listeners[name]), name

    # In-network clients bootstrap from what the broker advertises in-network.
    bootstrap = compose["x-fedex-env"]["FEDEX_KAFKA_BOOTSTRAP"]
    assert bootstrap == "kafka:9092"
    assert bootstrap in advertised.values()

    # The host listener: advertised on localhost (overridable) and published on that port.
    host = [address for address in advertised.values() if "localhost" in address]
    assert len(host) == 1, f"one advertised listener must be for the host: {advertised}"
    host_port = port_of(host[0])
    assert host_port != port_of(bootstrap)
    assert (host_port, host_port) in published(services["kafka"])


def test_kafka_data_is_a_named_volume(
    compose: dict[str, Any], services: dict[str, dict[str, Any]], kafka_env: dict[str, str]
) -> None:
    mounts = named_volume_mounts(services["kafka"])
    assert kafka_env["KAFKA_LOG_DIRS"] in mounts.values()
    assert set(mounts) <= set(compose.get("volumes") or {})


def test_project_services_use_project_image(services: dict[str, dict[str, Any]]) -> None:
    images = set()
    for name in PROJECT_SERVICES:
        service = services[name]
        build = service.get("build")
        assert isinstance(build, dict), f"{name} must build the project image"
        assert (COMPOSE.parent / build["context"]).resolve() == REPO, name
        # The dockerfile path is relative to the build context.
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        assert "entrypoint" not in service, f"{name} must keep the image's fedex entrypoint"
        images.add(service.get("image"))
    assert len(images) == 1, f"project services must share one image name: {images}"
    assert None not in images


def test_project_services_share_env_and_data(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    shared = compose["x-fedex-env"]
    assert shared["FEDEX_HOME"] == "/data"
    for name in PROJECT_SERVICES:
        env = services[name]["environment"]
        assert isinstance(env, dict), name
        assert shared.items() <= env.items(), f"{name} must use the x-fedex-env anchor"
    # The trainers write checkpoints that the server reads: the same volume at FEDEX_HOME.
    for name in ("trainer", "trainer-gpu", "server"):
        assert "/data" in named_volume_mounts(services[name]).values(), name
    trainer_volumes = named_volume_mounts(services["trainer"])
    for name in ("trainer-gpu", "server"):
        assert named_volume_mounts(services[name]) == trainer_volumes, name
    used = {vol for service in services.values() for vol in named_volume_mounts(service)}
    assert used <= set(compose.get("volumes") or {}), "undeclared named volume"


def test_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    kafka = healthcheck_words(services["kafka"])
    assert kafka[0].endswith("kafka-broker-api-versions.sh")
    assert option_value(kafka, "--bootstrap-server") == "localhost:9092"
    server = " ".join(healthcheck_words(services["server"]))
    assert "http://localhost:8080/healthz" in server
    for tool in ("curl", "wget"):
        assert tool not in server, f"python:3.11-slim has no {tool}"


def test_depends_on_conditions(services: dict[str, dict[str, Any]]) -> None:
    assert services["topics"]["depends_on"] == {"kafka": {"condition": "service_healthy"}}
    for name in ("worker", "trainer", "trainer-gpu", "server", "devices"):
        depends = services[name]["depends_on"]
        assert depends["topics"] == {"condition": "service_completed_successfully"}, name
    assert services["devices"]["depends_on"]["server"] == {"condition": "service_healthy"}
    # A healthy condition on a service without a healthcheck would never be met.
    for name, service in services.items():
        for target, spec in service.get("depends_on", {}).items():
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits on {target}"


def test_restart_policies(services: dict[str, dict[str, Any]]) -> None:
    # Unquoted `no` is YAML false, which compose rejects: it must be the string.
    assert services["topics"]["restart"] == "no"
    for name in LONG_LIVED:
        assert services[name]["restart"] == "unless-stopped", name


def test_published_ports(services: dict[str, dict[str, Any]]) -> None:
    assert ("8080", "8080") in published(services["server"])
    args = command_args(services["server"])
    assert option_value(args, "--port") == "8080"
    assert option_value(args, "--host") == "0.0.0.0", "a loopback bind is unreachable"
    # Scalable services publish nothing, or a second replica could not bind the host port.
    for name in ("worker", "trainer", "trainer-gpu", "devices"):
        assert not services[name].get("ports"), name


def test_trainers_gpu_and_cpu(services: dict[str, dict[str, Any]]) -> None:
    gpu = services["trainer-gpu"]
    assert gpu.get("profiles") == ["gpu"], "trainer-gpu must start only with --profile gpu"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert option_value(command_args(gpu), "--device") == "cuda"

    # The default trainer starts everywhere: no profile, no reservation, device picked at run.
    cpu = services["trainer"]
    assert "profiles" not in cpu
    assert "deploy" not in cpu
    assert option_value(command_args(cpu), "--device") == "auto"
    for name, service in services.items():
        if name != "trainer-gpu":
            assert "gpu" not in json.dumps(service.get("deploy", {})), name


def test_fedex_commands_are_known(services: dict[str, dict[str, Any]]) -> None:
    for name in PROJECT_SERVICES:
        args = command_args(services[name])
        assert args[0] in FEDEX_COMMANDS, f"{name} runs unknown command `fedex {args[0]}`"
        subcommands = FEDEX_COMMANDS[args[0]]
        if subcommands:
            assert len(args) > 1, f"{name}: `fedex {args[0]}` needs a sub-command"
            assert args[1] in subcommands, f"{name}: `fedex {' '.join(args)}` is unknown"


def test_fedex_commands_exist_in_cli(services: dict[str, dict[str, Any]]) -> None:
    """FEDEX_COMMANDS is only honest while the real CLI has the same commands and options."""
    try:
        import typer.main

        from pipeline.cli import build_app

        app = build_app()
    except ImportError as exc:  # the CLI is still being assembled
        pytest.skip(f"pipeline.cli not importable: {exc}")

    root = typer.main.get_command(app)
    commands = getattr(root, "commands", {})
    for name in NOT_YET_IN_CLI:
        assert name not in commands, f"`fedex {name}` exists now: drop it from NOT_YET_IN_CLI"
    for name, subcommands in FEDEX_COMMANDS.items():
        if name in NOT_YET_IN_CLI:
            continue
        assert name in commands, f"`fedex {name}` is not a command of pipeline.cli"
        if subcommands:
            registered = set(getattr(commands[name], "commands", {}))
            assert subcommands <= registered, f"`fedex {name}` lacks {subcommands - registered}"

    # Every option compose passes must be one the command declares.
    for name in PROJECT_SERVICES:
        args = command_args(services[name])
        if args[0] in NOT_YET_IN_CLI:
            continue
        command = commands[args[0]]
        if FEDEX_COMMANDS[args[0]]:
            command = command.commands[args[1]]
        declared = {opt for param in command.params for opt in param.opts}
        for arg in args:
            if arg.startswith("--"):
                assert arg.split("=")[0] in declared, f"{name}: `fedex {args[0]}` has no {arg}"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    joined = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile() -> None:
    instructions = dockerfile_instructions()
    bases = [args.split()[0] for keyword, args in instructions if keyword == "FROM"]
    assert bases, "no FROM"
    assert all(base.startswith("python:3.11") for base in bases), bases
    assert bases[-1] == "python:3.11-slim"

    entrypoints = [args for keyword, args in instructions if keyword == "ENTRYPOINT"]
    assert entrypoints, "no ENTRYPOINT"
    assert json.loads(entrypoints[-1]) == ["fedex"]

    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users, "no USER: the image would run as root"
    assert users[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"

    # Dependencies are installed before any source is copied, so editing code keeps the
    # torch layer cached.
    steps = [(keyword, args) for keyword, args in instructions if keyword in ("COPY", "RUN")]
    first_source = next(i for i, (kw, a) in enumerate(steps) if kw == "COPY" and "pipeline" in a)
    first_install = next(i for i, (kw, a) in enumerate(steps) if kw == "RUN" and "pip install" in a)
    assert first_install < first_source
    for package in ("pipeline", "agents", "device_sim", "trainer"):
        assert any(kw == "COPY" and package in a for kw, a in steps), package


def test_dockerignore() -> None:
    patterns = {
        line.strip().strip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for required in (".venv", ".fedex", ".git"):
        assert required in patterns, required
    assert any("__pycache__" in pattern for pattern in patterns)
