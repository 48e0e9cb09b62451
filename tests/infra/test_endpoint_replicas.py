"""infra/ for the online endpoint: replicas of `stemma endpoint` behind nginx (compose) and
a Deployment with its Service and autoscaler (Kubernetes), checked against the code they
run: Stemma's own parser and spec, the endpoint app's routes, and each other.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.infra.test_infra_files import (
    DOCKERFILE,
    ENDPOINT_SERVICE,
    INFRA,
    NGINX_CONFIG_PATH,
    PROXY_CONFIG,
    PROXY_SERVICE,
    REPO_ROOT,
    compose,
    compose_environment,
    endpoint_container,
    endpoint_document,
    endpoint_documents,
    endpoint_settings,
    worker_document,
)


def compose_endpoint() -> dict:
    return compose()["services"][ENDPOINT_SERVICE]


def compose_endpoint_settings() -> Any:
    return endpoint_settings(tuple(compose_endpoint()["command"]))


def endpoint_routes() -> set[str]:
    """Paths the endpoint's app serves: the ``add_api_route`` calls of serving/app.py."""
    from stemma.components.serving import app

    paths = set()
    for node in ast.walk(ast.parse(Path(app.__file__).read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_api_route":
            path = node.args[0]
            paths.add(path.value if isinstance(path, ast.Constant) else getattr(app, path.id))
    return paths


def proxy_config() -> str:
    """nginx.conf without its comments."""
    return re.sub(r"#[^\n]*", "", PROXY_CONFIG.read_text())


def proxy_listen_port() -> int:
    (port,) = re.findall(r"^\s*listen\s+(\d+)\s*;", proxy_config(), flags=re.MULTILINE)
    return int(port)


def nginx_size(value: str) -> int:
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    number, unit = re.fullmatch(r"(\d+)([kKmMgG]?)", value).groups()
    return int(number) * units[unit.lower()]


@pytest.mark.parametrize(
    "command",
    [compose_endpoint()["command"], endpoint_container()["command"]],
    ids=["compose", "kubernetes"],
)
def test_endpoint_command_is_one_stemma_endpoint_runs(command):
    settings = endpoint_settings(tuple(command))
    assert settings.host == "0.0.0.0", "replicas listen beyond loopback, behind a proxy"
    assert settings.token_env, "an endpoint reachable from the network needs a token"
    assert settings.log is not None and settings.log.path.startswith("s3://"), (
        "replicas write their logs to storage they share"
    )


def test_compose_and_kubernetes_run_the_same_endpoint():
    assert compose_endpoint()["command"] == endpoint_container()["command"]
    assert compose_endpoint()["image"] == endpoint_container()["image"]


def test_endpoint_token_comes_from_a_secret_under_the_name_the_spec_reads():
    variable = compose_endpoint_settings().token_env
    assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", compose_endpoint()["environment"][variable])
    example = (INFRA / ".env.example").read_text().splitlines()
    assert f"{variable}=" in example, ".env.example does not name the token's variable"
    (token,) = [env for env in endpoint_container()["env"] if env["name"] == variable]
    assert token["valueFrom"]["secretKeyRef"]["key"] == variable


def test_endpoint_log_bucket_is_created_by_the_stack():
    bucket = urlsplit(compose_endpoint_settings().log.path).netloc
    created = compose()["services"]["create-buckets"]["command"][0]
    (line,) = [line for line in created.splitlines() if line.strip().startswith("mc mb")]
    assert f"stemma/{bucket}" in line.split()
    # The replicas and the flows that read the log reach MinIO, not AWS.
    s3_url = compose_environment("mlflow")["MLFLOW_S3_ENDPOINT_URL"]
    for service in (ENDPOINT_SERVICE, "prefect-worker"):
        assert compose_environment(service)["AWS_ENDPOINT_URL_S3"] == s3_url, service


def test_endpoint_probes_and_healthchecks_are_routes_of_the_app():
    routes = endpoint_routes()
    assert {"/v1/predict", "/ready", "/health"} <= routes, routes  # the reading works
    port = compose_endpoint_settings().port
    container = endpoint_container()
    (container_port,) = container["ports"]
    assert container_port["containerPort"] == port
    probes = {name: container[name] for name in ("readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/health"
    for probe in [*probes.values(), container["startupProbe"]]:
        assert probe["httpGet"]["path"] in routes
        assert probe["httpGet"]["port"] == container_port["name"]
    for service, listening in ((ENDPOINT_SERVICE, port), (PROXY_SERVICE, proxy_listen_port())):
        test = " ".join(compose()["services"][service]["healthcheck"]["test"])
        (url,) = re.findall(r"http://[^\s'\"]+", test)
        # The routes answer GET only (FastAPI adds no HEAD): no `wget --spider`, no `curl -I`.
        assert not re.search(r"--spider|(^|\s)-I\b|--head", test), service
        assert urlsplit(url).path == "/ready", service
        assert (urlsplit(url).hostname, urlsplit(url).port) == ("127.0.0.1", listening), service


def test_proxy_sends_to_every_replica_of_the_endpoint_service():
    settings = compose_endpoint_settings()
    text = proxy_config()
    upstreams = dict(re.findall(r"upstream\s+(\S+)\s*\{([^}]*)\}", text))
    (target,) = re.findall(r"proxy_pass\s+http://([^\s;/]+)", text)
    assert target in upstreams, f"proxy_pass names {target}, which is no upstream"
    (server,) = re.findall(r"^\s*server\s+([^;]+);", upstreams[target], flags=re.MULTILINE)
    address, *parameters = server.split()
    assert address == f"{ENDPOINT_SERVICE}:{settings.port}"
    # Docker's DNS names every replica; `resolve` (in a shared zone) follows --scale.
    assert "resolve" in parameters and re.search(r"^\s*zone\s", upstreams[target], re.M)
    assert re.search(r"resolver\s+127\.0\.0\.11\b", text)
    (size,) = re.findall(r"client_max_body_size\s+(\w+);", text)
    assert nginx_size(size) >= settings.max_body_bytes, "the endpoint's 413 names the limit"
    proxy = compose()["services"][PROXY_SERVICE]
    assert f"./{PROXY_CONFIG.relative_to(INFRA)}:{NGINX_CONFIG_PATH}:ro" in proxy["volumes"]
    (published,) = proxy["ports"]
    assert int(published.rsplit(":", 1)[1]) == proxy_listen_port()
    assert proxy["depends_on"][ENDPOINT_SERVICE]["condition"] == "service_healthy"


def test_endpoint_is_published_only_through_the_proxy_on_loopback():
    endpoint = compose_endpoint()
    assert "ports" not in endpoint, "replicas are reached through the proxy only"
    assert endpoint["expose"] == [str(compose_endpoint_settings().port)]
    assert endpoint["deploy"]["replicas"] >= 2
    (published,) = compose()["services"][PROXY_SERVICE]["ports"]
    assert published.startswith("127.0.0.1:")
    host_ports = [
        port.split(":")[1]
        for service in compose()["services"].values()
        for port in service.get("ports", [])
    ]
    assert len(host_ports) == len(set(host_ports)), host_ports
    # Both wait for `--profile endpoint`: a replica cannot start before a champion exists.
    for service in (ENDPOINT_SERVICE, PROXY_SERVICE):
        assert compose()["services"][service]["profiles"] == ["endpoint"]


def test_endpoint_manifest_agrees_with_itself_and_with_worker_yaml():
    deployment = endpoint_document("Deployment")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = endpoint_document("Service")["spec"]
    assert service["selector"].items() <= labels.items()
    (service_port,) = service["ports"]
    (container_port,) = endpoint_container()["ports"]
    assert service_port["targetPort"] == container_port["name"]
    assert service_port["port"] == container_port["containerPort"]
    budget = endpoint_document("PodDisruptionBudget")["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    autoscaler = endpoint_document("HorizontalPodAutoscaler")
    assert autoscaler["apiVersion"] == "autoscaling/v2"
    target = autoscaler["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert target["apiVersion"] == deployment["apiVersion"]
    assert autoscaler["spec"]["minReplicas"] >= 2
    (metric,) = autoscaler["spec"]["metrics"]
    assert (metric["type"], metric["resource"]["name"]) == ("Resource", "cpu")
    # CPU utilisation is a share of the CPU requested: without a request it is unknown.
    assert endpoint_container()["resources"]["requests"]["cpu"]
    # Non-root, as the image's user, with nothing to escalate.
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    assert f"--uid {security['runAsUser']} stemma" in DOCKERFILE.read_text()
    assert endpoint_container()["securityContext"]["allowPrivilegeEscalation"] is False
    # The namespace and the ConfigMap of the servers' addresses come from worker.yaml.
    namespace = worker_document("Namespace")["metadata"]["name"]
    assert {document["metadata"]["namespace"] for document in endpoint_documents()} == {namespace}
    (source,) = endpoint_container()["envFrom"]
    assert source["configMapRef"]["name"] == worker_document("ConfigMap")["metadata"]["name"]
    assert "MLFLOW_TRACKING_URI" in worker_document("ConfigMap")["data"]


def test_endpoint_command_gets_past_its_spec_in_the_image_project(tmp_path):
    # The image holds configs/ but no data: the command must take its spec as it is there
    # and stop only at the registry, here an empty one (exit code 5).
    shutil.copytree(REPO_ROOT / "configs", tmp_path / "configs")
    variable = compose_endpoint_settings().token_env
    environment = {key: value for key, value in os.environ.items() if "MLFLOW" not in key}
    environment |= {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        variable: "a-token",
    }
    stemma = Path(sys.executable).parent / "stemma"
    done = subprocess.run(
        [str(stemma), *compose_endpoint()["command"][1:]],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 5, done.stderr
    assert "credit" in done.stderr and "spec" not in done.stderr.split("\n")[0]
