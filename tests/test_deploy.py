"""deploy/: the Kubernetes manifests validate against the Kubernetes schemas (kubernetes-validate,
strict: no unknown fields), the KEDA ScaledObject against the fields of KEDA's CRD, and every
manifest agrees with the server it deploys: flags, health service names, stream and group names."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tensorgate.server.api.health import SERVER_SERVICES
from tensorgate.server.cli import add_serve_command, resolve
from tensorgate.server.config import ConfigError
from tensorgate.server.jobs.redis_store import GROUP, _stream

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
KUBERNETES_VERSION = "1.30.0"


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _manifests() -> list[dict[str, Any]]:
    return [doc for path in sorted(DEPLOY.glob("kubernetes/*.yaml")) for doc in _documents(path)]


def _kind(kind: str) -> dict[str, Any]:
    [found] = [doc for doc in _manifests() if doc["kind"] == kind and "tensorgate" in str(doc)]
    return found


# The ScaledObject fields of KEDA's CRD (keda.sh/v1alpha1) that a manifest may use.
SCALED_OBJECT = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string"},
                        "kind": {"type": "string"},
                        "apiVersion": {"type": "string"},
                        "envSourceContainerName": {"type": "string"},
                    },
                },
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "idleReplicaCount": {"type": "integer"},
                "advanced": {"type": "object"},
                "fallback": {"type": "object"},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "authenticationRef": {"type": "object"},
                            # KEDA reads every trigger setting as a string.
                            "metadata": {
                                "type": "object",
                                "additionalProperties": {"type": "string"},
                            },
                        },
                    },
                },
            },
        },
    },
}

# The redis-streams scaler's settings (keda.sh/docs/scalers/redis-streams).
REDIS_STREAMS_KEYS = {
    "address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv", "usernameFromEnv",
    "passwordFromEnv", "stream", "consumerGroup", "pendingEntriesCount", "streamLength",
    "lagCount", "activationLagCount", "enableTLS", "unsafeSsl", "databaseIndex",
}  # fmt: skip


@pytest.mark.parametrize(
    "doc",
    [d for d in _manifests() if d["kind"] != "ScaledObject"],
    ids=lambda d: f"{d['kind']}/{d['metadata']['name']}",
)
def test_manifests_validate_against_the_kubernetes_schemas(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_scaled_object_validates_and_watches_the_job_streams() -> None:
    scaled = _kind("ScaledObject")
    jsonschema.validate(scaled, SCALED_OBJECT)
    deployment = _kind("Deployment")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    for trigger in scaled["spec"]["triggers"]:
        assert trigger["type"] == "redis-streams"
        settings = trigger["metadata"]
        assert set(settings) <= REDIS_STREAMS_KEYS, set(settings) - REDIS_STREAMS_KEYS
        assert settings["stream"] == _stream("mlp")  # the bundled model's stream
        assert settings["consumerGroup"] == GROUP
        assert (
            f"redis://{settings['address']}/{settings['databaseIndex']}"
            == _env(deployment)["TENSORGATE_JOB_STORE"]
        )


def _env(deployment: dict[str, Any]) -> dict[str, str]:
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return {item["name"]: item["value"] for item in container["env"]}


def _serve_flags() -> set[str]:
    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers())
    serve = parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    return {option for action in serve._actions for option in action.option_strings}


def test_the_deployment_probes_health_and_uses_real_flags() -> None:
    deployment = _kind("Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        grpc_probe = container[probe]["grpc"]
        assert grpc_probe["port"] == ports["grpc"]
        assert grpc_probe.get("service", "") in SERVER_SERVICES
    flags = _serve_flags()
    env = _env(deployment)
    for name in env:
        assert name.startswith("TENSORGATE_")
        assert "--" + name.removeprefix("TENSORGATE_").lower().replace("_", "-") in flags, name
    # Kubernetes waits longer than the server's own drain before it kills the pod.
    grace_s = float(env["TENSORGATE_SHUTDOWN_GRACE_S"])
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace_s
    budget = _kind("PodDisruptionBudget")
    assert budget["spec"]["selector"] == deployment["spec"]["selector"]
    assert budget["spec"]["minAvailable"] < deployment["spec"]["replicas"]


def test_compose_runs_two_replicas_on_one_redis_with_aof() -> None:
    [compose] = _documents(DEPLOY / "compose.yaml")
    services = compose["services"]
    replicas = [s for name, s in services.items() if name.startswith("tensorgate")]
    assert len(replicas) == 2
    stores = {s["environment"]["TENSORGATE_JOB_STORE"] for s in replicas}
    assert stores == {"redis://redis:6379/0"}
    assert len({port for s in replicas for port in s["ports"]}) == 4  # no host port twice
    command = services["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "everysec"
    flags = _serve_flags()
    for replica in replicas:
        for name in replica["environment"]:
            assert "--" + name.removeprefix("TENSORGATE_").lower().replace("_", "-") in flags


def test_the_image_copies_every_package_and_probes_real_flags() -> None:
    root = DEPLOY.parent
    dockerfile = (root / "Dockerfile").read_text()
    copied = {
        line.split()[1] for line in dockerfile.splitlines() if line.startswith("COPY ")
    } | {name for line in dockerfile.splitlines() if line.startswith("COPY ")
         for name in line.split()[1:-1]}  # fmt: skip
    for source in copied:
        assert (root / source).exists(), source
    packages = re.search(r"packages = \[(.*?)\]", (root / "pyproject.toml").read_text(), re.S)
    assert packages is not None
    for package in re.findall(r'"([\w.]+)"', packages.group(1)):
        top = "protos" if package.startswith("tensorgate.") or package == "tensorgate" else package
        assert top.split(".")[0] in copied, package
    exposed = re.search(r"^EXPOSE (.*)$", dockerfile, re.M)
    assert exposed is not None and set(exposed.group(1).split()) == {"50051", "8002"}
    healthcheck = dockerfile[dockerfile.index("HEALTHCHECK") :].split("CMD", 1)[1]
    command = json.loads(healthcheck.strip().splitlines()[0])
    assert command[:2] == ["tensorgate", "health"]
    parser = argparse.ArgumentParser()
    from tensorgate.client.cli import add_client_commands

    add_client_commands(parser.add_subparsers())
    parser.parse_args(command[1:])  # exits with a usage error if a flag is wrong
    ignored = (root / ".dockerignore").read_text().split()
    assert {".venv", ".venv-*", ".git"} <= set(ignored)


def _service_links(services: list[dict[str, Any]]) -> dict[str, str]:
    """The variables Kubernetes injects into a pod for each Service of its namespace, unless the
    pod sets enableServiceLinks: false (the docker links form: NAME_PORT=tcp://IP:PORT, ...)."""
    env: dict[str, str] = {}
    for number, service in enumerate(services):
        name = service["metadata"]["name"].upper().replace("-", "_")
        ip = f"10.96.1.{number + 2}"
        ports = service["spec"]["ports"]
        env[f"{name}_SERVICE_HOST"] = ip
        env[f"{name}_SERVICE_PORT"] = str(ports[0]["port"])
        env[f"{name}_PORT"] = f"tcp://{ip}:{ports[0]['port']}"
        for port in ports:
            prefix = f"{name}_PORT_{port['port']}_TCP"
            env[prefix] = f"tcp://{ip}:{port['port']}"
            env[f"{prefix}_PROTO"], env[f"{prefix}_PORT"], env[f"{prefix}_ADDR"] = (
                "tcp", str(port["port"]), ip,
            )  # fmt: skip
    return env


def _pod_environment(pod_spec: dict[str, Any]) -> dict[str, str]:
    services = [doc for doc in _manifests() if doc["kind"] == "Service"]
    links = {} if pod_spec.get("enableServiceLinks") is False else _service_links(services)
    [container] = pod_spec["containers"]
    return {**links, **{item["name"]: item["value"] for item in container.get("env", [])}}


def _resolved(environ: dict[str, str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers())
    args = parser.parse_args(["serve"])
    resolve(args, environ)
    return args


def test_the_pods_environment_as_kubernetes_fills_it_is_read_without_error() -> None:
    deployment = _kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["enableServiceLinks"] is False
    args = _resolved(_pod_environment(pod))
    assert args.port == 50051 and args.job_store == "redis://redis:6379/0"
    [container] = pod["containers"]
    # A locally loaded image (kind load / minikube image load) is used without a registry.
    assert container["imagePullPolicy"] == "IfNotPresent"


def test_an_injected_service_link_would_be_refused_in_one_line_naming_the_variable() -> None:
    pod = dict(_kind("Deployment")["spec"]["template"]["spec"])
    del pod["enableServiceLinks"]
    with pytest.raises(ConfigError) as refused:
        _resolved(_pod_environment(pod))
    message = str(refused.value)
    assert "TENSORGATE_PORT='tcp://10.96.1." in message and "--port" in message
    assert "enableServiceLinks: false" in message and "\n" not in message
