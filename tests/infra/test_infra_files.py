"""infra/ without Docker or a cluster: every file parses, matches its schema, and agrees
with the code and with the other files (images, env vars, work pools, ports, Python).

Schemas come from packages, offline: the compose-spec JSON schema vendored by
check-jsonschema, Kubernetes' JSON schemas shipped by kubernetes-validate, Prefect's own
models for prefect.yaml and for work pools, and prefect-kubernetes' own rendering of a
base job template into a Job.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import json
import re
import shlex
import tomllib
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from stemma.components.platform import services

REPO_ROOT = Path(__file__).resolve().parents[2]
INFRA = REPO_ROOT / "infra"
COMPOSE = INFRA / "docker-compose.yml"
PREFECT_YAML = INFRA / "prefect.yaml"
WORKER = INFRA / "k8s" / "worker.yaml"
ENDPOINT = INFRA / "k8s" / "endpoint.yaml"
PROXY_CONFIG = INFRA / "endpoint" / "nginx.conf"
JOB_TEMPLATE = INFRA / "k8s" / "gpu-job-template.json"
DOCKERFILE = INFRA / "Dockerfile"
DEPLOY_SCRIPT = INFRA / "deploy.sh"
#: The Kubernetes version the manifests are checked against (strict: unknown fields fail).
KUBERNETES_VERSION = "1.33.0"
#: Services of the compose file that run Stemma's image.
STEMMA_SERVICES = ("prefect-server", "mlflow", "prefect-worker", "deploy", "endpoint")
#: The compose services of the online endpoint: its replicas and the proxy in front.
ENDPOINT_SERVICE, PROXY_SERVICE = "endpoint", "endpoint-proxy"
#: Where the nginx image reads its configuration.
NGINX_CONFIG_PATH = "/etc/nginx/nginx.conf"
#: Environment variables that third-party images read, as their documentation names them
#: (these images' code is not here to ask). Anything else must be read by Stemma's
#: libraries, or by the script the service runs.
IMAGE_VARIABLES = {
    "postgres": {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"},
    "minio": {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"},
}
#: Read by libpq, under psycopg2 (MLflow) and asyncpg (Prefect).
LIBPQ_VARIABLES = {"PGPASSWORD", "PGHOST", "PGPORT", "PGUSER", "PGDATABASE"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH|_KEY\b|ACCESS_KEY")


# ---------------------------------------------------------------------------------------
# Loading


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def compose() -> dict:
    return load_yaml(COMPOSE)


def prefect_yaml() -> dict:
    return load_yaml(PREFECT_YAML)


def worker_documents() -> list[dict]:
    return [document for document in yaml.safe_load_all(WORKER.read_text()) if document]


def worker_document(kind: str, name: str | None = None) -> dict:
    (document,) = [
        document
        for document in worker_documents()
        if document["kind"] == kind and (name is None or document["metadata"]["name"] == name)
    ]
    return document


def endpoint_documents() -> list[dict]:
    return [document for document in yaml.safe_load_all(ENDPOINT.read_text()) if document]


def endpoint_document(kind: str) -> dict:
    (document,) = [document for document in endpoint_documents() if document["kind"] == kind]
    return document


def endpoint_container() -> dict:
    (container,) = endpoint_document("Deployment")["spec"]["template"]["spec"]["containers"]
    return container


@functools.cache
def endpoint_settings(command: tuple[str, ...]) -> Any:
    """The ``endpoint`` section a `stemma endpoint` command line runs with: parsed by
    Stemma's own parser and loaded as the command loads it."""
    from stemma.components.spec import EndpointSpec, load_spec
    from stemma.flows.cli.endpoint import ENDPOINT_FLAGS, endpoint_command
    from stemma.flows.cli.parser import build_parser

    assert command[0] == "stemma", command
    args = build_parser().parse_args(command[1:])
    assert args.handler is endpoint_command, command
    overrides = [
        *args.overrides,
        *(f"{key}={getattr(args, name)}" for name, key in ENDPOINT_FLAGS.items()),
    ]
    assert (REPO_ROOT / args.config).is_file(), args.config
    loaded = load_spec(str(REPO_ROOT / args.config), overrides, check_paths=False)
    return loaded.spec.endpoint or EndpointSpec()


def job_template() -> dict:
    return json.loads(JOB_TEMPLATE.read_text())


def pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def stemma_version() -> str:
    return pyproject()["project"]["version"]


def created_work_pools() -> dict[str, str]:
    """Work pools infra/deploy.sh creates: name -> type."""
    found = re.findall(r"work-pool create (\S+) --type (\S+)", DEPLOY_SCRIPT.read_text())
    return dict(found)


def option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def worker_container() -> dict:
    deployment = worker_document("Deployment", "stemma-worker")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


# ---------------------------------------------------------------------------------------
# Parsing and schemas


@pytest.mark.parametrize(
    "path",
    [
        COMPOSE,
        PREFECT_YAML,
        WORKER,
        ENDPOINT,
        JOB_TEMPLATE,
        PROXY_CONFIG,
        INFRA / "Dockerfile.dockerignore",
    ],
    ids=lambda path: str(path.relative_to(INFRA)),
)
def test_every_file_parses(path):
    if path.suffix == ".json":
        assert isinstance(json.loads(path.read_text()), dict)
    elif path.suffix in (".yml", ".yaml"):
        documents = [document for document in yaml.safe_load_all(path.read_text()) if document]
        assert documents and all(isinstance(document, dict) for document in documents)
    else:
        assert path.read_text().strip()


def test_compose_file_matches_the_compose_spec():
    schema_file = resources.files("check_jsonschema") / "builtin_schemas/vendor/compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    errors = sorted(
        validator_class(schema).iter_errors(compose()), key=lambda error: list(error.path)
    )
    assert not errors, "\n".join(
        f"{'.'.join(map(str, error.path))}: {error.message}" for error in errors
    )


def test_compose_references_resolve():
    spec = compose()
    names = set(spec["services"])
    volumes = set(spec.get("volumes", {}))
    for name, service in spec["services"].items():
        assert set(service.get("depends_on", {})) <= names, name
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source}"
            else:
                assert source in volumes, f"{name}: volume {source} is not declared"
        if "build" in service:
            context = COMPOSE.parent / service["build"]["context"]
            assert (context / service["build"]["dockerfile"]).resolve() == DOCKERFILE


@pytest.mark.parametrize(
    "document",
    [*worker_documents(), *endpoint_documents()],
    ids=lambda document: f"{document['kind']}/{document['metadata']['name']}",
)
def test_kubernetes_manifests_match_their_schemas(document):
    import kubernetes_validate

    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def render_job(values: dict | None = None) -> dict:
    """The Job prefect-kubernetes' worker would create from the template for a flow run."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    async def render() -> dict:
        configuration = await KubernetesWorkerJobConfiguration.from_template_and_values(
            job_template(), values or {}
        )
        configuration.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="brave-otter"))
        return configuration.job_manifest

    # The worker's own API URL: without one, preparing a run would start a local server.
    with temporary_settings({PREFECT_API_URL: "http://prefect-server.stemma.svc:4200/api"}):
        return asyncio.run(render())


def test_gpu_job_template_renders_a_valid_job_with_one_gpu():
    import kubernetes_validate

    job = render_job()
    kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"] == f"stemma:{stemma_version()}-cuda"
    assert container["args"] == ["prefect", "flow-run", "execute"]
    # What the job needs exists in worker.yaml: namespace, service account, environment.
    assert job["metadata"]["namespace"] == worker_document("Namespace")["metadata"]["name"]
    assert worker_document("ServiceAccount", pod["serviceAccountName"])
    configmaps = [source["configMapRef"]["name"] for source in container["envFrom"][:1]]
    assert configmaps == [worker_document("ConfigMap")["metadata"]["name"]]
    secrets = [
        source["secretRef"]["name"] for source in container["envFrom"] if "secretRef" in source
    ]
    assert secrets == [
        env["valueFrom"]["secretKeyRef"]["name"]
        for env in worker_container()["env"]
        if "valueFrom" in env
    ]


def test_gpu_count_is_a_job_variable():
    job = render_job({"gpu_count": 2, "image": "registry.example/stemma:custom"})
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["image"] == "registry.example/stemma:custom"


def test_gpu_job_template_is_a_valid_work_pool_template():
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.templating import find_placeholders

    template = job_template()
    WorkPoolCreate(name="stemma-kubernetes", type="kubernetes", base_job_template=template)
    variables = template["variables"]
    jsonschema.Draft7Validator.check_schema(variables)
    declared = set(variables["properties"])
    used = {placeholder.name for placeholder in find_placeholders(template["job_configuration"])}
    assert used <= declared, f"placeholders without a variable: {used - declared}"
    for name, field in variables["properties"].items():
        assert field.get("description"), f"variable {name} has no description"
    # The default values form a valid set of job variables.
    defaults = {
        name: field["default"]
        for name, field in variables["properties"].items()
        if "default" in field
    }
    jsonschema.Draft7Validator(variables).validate(defaults)


# ---------------------------------------------------------------------------------------
# prefect.yaml


def test_prefect_yaml_matches_prefect_deploy_models():
    from prefect.cli.deploy._models import DeploymentConfig, PrefectYamlModel, RawScheduleConfig
    from prefect.cli.deploy._triggers import _initialize_deployment_triggers

    spec = prefect_yaml()
    model = PrefectYamlModel.model_validate(spec)
    assert len(model.deployments) == len(spec["deployments"])
    known = set(DeploymentConfig.model_fields)
    for deployment in spec["deployments"]:
        # Prefect ignores unknown keys: a typo would silently drop a schedule or trigger.
        assert set(deployment) <= known, set(deployment) - known
        for schedule in deployment.get("schedules", []):
            RawScheduleConfig.model_validate(schedule)
        _initialize_deployment_triggers(deployment["name"], list(deployment.get("triggers", [])))


def test_pull_steps_are_prefect_steps():
    for step in prefect_yaml()["pull"]:
        ((path, arguments),) = step.items()
        module, function = path.rsplit(".", 1)
        callable_step = getattr(importlib.import_module(module), function)
        # `id` names the step's output for later steps; the rest are the step's arguments.
        options = {key: value for key, value in arguments.items() if key != "id"}
        inspect.signature(callable_step).bind(**options)


def deployments() -> list[dict]:
    return prefect_yaml()["deployments"]


@pytest.mark.parametrize(
    "deployment", deployments(), ids=lambda item: f"{item['entrypoint']}-{item['name']}"
)
def test_entrypoint_is_a_prefect_flow_that_accepts_the_parameters(deployment):
    from prefect import Flow

    module, function = deployment["entrypoint"].split(":")
    flow = getattr(importlib.import_module(module), function)
    assert isinstance(flow, Flow)
    flow.validate_parameters(deployment.get("parameters", {}))
    for trigger in deployment.get("triggers", []):
        flow.validate_parameters(trigger.get("parameters", {}))


def test_nightly_schedules_and_event_triggers():
    from stemma.components.platform.deployments import (
        BATCH_SCORED_EVENT,
        DRIFT_DETECTED_EVENT,
        pipeline_resource_id,
    )
    from stemma.components.spec import load_spec

    # The repository carries no generated data: check the spec, not its paths.
    loaded = load_spec(str(REPO_ROOT / "configs" / "credit.yaml"), [], check_paths=False)
    by_flow = {
        deployment["entrypoint"].rsplit(":", 1)[1]: deployment for deployment in deployments()
    }
    crons = {
        name: [schedule["cron"] for schedule in deployment.get("schedules", [])]
        for name, deployment in by_flow.items()
    }
    assert crons["score_flow"] == [loaded.spec.score.schedule] == ["0 2 * * *"]
    assert crons["retrain_flow"] == [loaded.spec.retrain.schedule] == ["0 3 * * *"]
    resource = {"prefect.resource.id": pipeline_resource_id(loaded.spec.pipeline.name)}
    # The events and resource the flows emit, as `stemma serve` names them.
    (drift,) = by_flow["retrain_flow"]["triggers"]
    assert drift["expect"] == [DRIFT_DETECTED_EVENT] == ["stemma.drift.detected"]
    assert drift["match"] == resource
    assert drift["parameters"]["cause"] == "{{ event.payload.report_run_id }}"
    (scored,) = by_flow["monitor_flow"]["triggers"]
    assert scored["expect"] == [BATCH_SCORED_EVENT]
    assert scored["match"] == resource
    # Only retraining and monitoring react to events.
    triggered = sorted(d["entrypoint"] for d in deployments() if d.get("triggers"))
    assert triggered == ["stemma.flows.monitor:monitor_flow", "stemma.flows.retrain:retrain_flow"]


def test_prefect_yaml_deploys_on_the_cpu_pool_what_stemma_serve_deploys():
    from stemma.components.platform.deployments import deployment_plans
    from stemma.components.spec import load_spec

    loaded = load_spec(str(REPO_ROOT / "configs" / "credit.yaml"), [], check_paths=False)
    served = {
        (plan.entrypoint, plan.name): {
            "parameters": plan.parameters,
            "schedules": [(plan.cron, plan.timezone)] if plan.cron else [],
            "triggers": [
                (trigger.event, trigger.resource_id, trigger.parameters)
                for trigger in plan.triggers
            ],
            "concurrency": plan.concurrency_limit,
            "tags": list(plan.tags),
        }
        for plan in deployment_plans(loaded, "configs/credit.yaml")
    }
    on_cpu = [d for d in deployments() if d["work_pool"]["name"] == "stemma"]
    deployed = {
        (deployment["entrypoint"], deployment["name"]): {
            "parameters": deployment["parameters"],
            "schedules": [
                (schedule["cron"], schedule["timezone"])
                for schedule in deployment.get("schedules", [])
            ],
            "triggers": [
                (event, trigger["match"]["prefect.resource.id"], trigger["parameters"])
                for trigger in deployment.get("triggers", [])
                for event in trigger["expect"]
            ],
            "concurrency": deployment.get("concurrency_limit", {}).get("limit"),
            "tags": deployment["tags"],
        }
        for deployment in on_cpu
    }
    assert len(deployed) == len(on_cpu), "two deployments of one flow share a name"
    # Every flow `stemma serve` deploys is deployable from the UI of the production stack
    # too, run as `stemma serve` runs it; the GPU training deployment is the one extra.
    assert deployed == served
    limited = [d for d in deployments() if "concurrency_limit" in d]
    assert all(d["concurrency_limit"]["collision_strategy"] == "CANCEL_NEW" for d in limited)


def test_deployment_config_paths_exist():
    for deployment in deployments():
        config = deployment["parameters"]["config"]
        assert (REPO_ROOT / config).is_file(), config


# ---------------------------------------------------------------------------------------
# Agreement between the files


def test_work_pool_names_match_between_prefect_yaml_workers_and_deploy_script():
    pools = created_work_pools()
    used = {deployment["work_pool"]["name"] for deployment in deployments()}
    assert used == set(pools)
    compose_worker = compose()["services"]["prefect-worker"]["command"]
    assert pools[option(compose_worker, "--pool")] == option(compose_worker, "--type") == "process"
    kubernetes_worker = worker_container()["command"]
    assert (
        pools[option(kubernetes_worker, "--pool")]
        == option(kubernetes_worker, "--type")
        == "kubernetes"
    )
    gpu_pools = {
        deployment["work_pool"]["name"]
        for deployment in deployments()
        if "gpu_count" in deployment["work_pool"].get("job_variables", {})
    }
    assert gpu_pools == {option(kubernetes_worker, "--pool")}
    assert f'--base-job-template "$here/k8s/{JOB_TEMPLATE.name}"' in DEPLOY_SCRIPT.read_text()


def stemma_images() -> dict[str, str]:
    """Every reference to Stemma's image, by where it appears."""
    found = {}
    for name, service in compose()["services"].items():
        if "stemma" in service["image"]:
            found[f"compose {name}"] = service["image"]
    found["worker.yaml"] = worker_container()["image"]
    found["endpoint.yaml"] = endpoint_container()["image"]
    found["gpu-job-template.json"] = job_template()["variables"]["properties"]["image"]["default"]
    for deployment in deployments():
        image = deployment["work_pool"].get("job_variables", {}).get("image")
        if image:
            found[f"prefect.yaml {deployment['name']}"] = image
    for tag in re.findall(r"-t (\S+)", DOCKERFILE.read_text()):
        found[f"Dockerfile {tag}"] = tag
    return found


def test_image_tags_match_the_package_version():
    version = stemma_version()
    images = stemma_images()
    assert set(images.values()) == {f"stemma:{version}", f"stemma:{version}-cuda"}, images
    # The CPU image serves the stack, the CUDA one the GPU jobs.
    assert {images[f"compose {name}"] for name in STEMMA_SERVICES} == {f"stemma:{version}"}
    assert images["worker.yaml"] == images["endpoint.yaml"] == f"stemma:{version}"
    built = [name for name, service in compose()["services"].items() if "build" in service]
    assert built == ["prefect-server"]


def test_third_party_images_are_pinned():
    for name, service in compose()["services"].items():
        image = service["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: {image}"


def test_dockerfile_python_and_install_match_pyproject():
    from packaging.specifiers import SpecifierSet

    text = DOCKERFILE.read_text()
    (python,) = re.findall(r"^ARG PYTHON_VERSION=(\S+)$", text, flags=re.MULTILINE)
    requires = SpecifierSet(pyproject()["project"]["requires-python"])
    assert f"{python}.0" in requires and f"{python}.99" in requires
    assert re.search(r"^FROM python:\$\{PYTHON_VERSION\}-", text, flags=re.MULTILINE)
    (install,) = [
        line for line in text.splitlines() if "pip install" in line and "constraints.txt" in line
    ]
    assert "-c constraints.txt" in install
    (extras,) = re.findall(r"^ARG STEMMA_EXTRAS=(\S+)$", text, flags=re.MULTILINE)
    assert set(extras.split(",")) <= set(pyproject()["project"]["optional-dependencies"])
    # The files the image copies exist.
    for line in text.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO_ROOT / source).exists(), source


def url_port(url: str) -> int:
    from urllib.parse import urlsplit

    port = urlsplit(url).port
    assert port is not None, url
    return port


def test_ports_match():
    spec = compose()["services"]
    prefect_port, mlflow_port = services.DEFAULT_PREFECT_PORT, services.DEFAULT_MLFLOW_PORT
    assert int(option(spec["prefect-server"]["command"], "--port")) == prefect_port
    assert int(option(spec["mlflow"]["command"], "--port")) == mlflow_port
    assert spec["prefect-server"]["ports"] == [f"127.0.0.1:{prefect_port}:{prefect_port}"]
    assert spec["mlflow"]["ports"] == [f"127.0.0.1:{mlflow_port}:{mlflow_port}"]
    clients = [spec["prefect-worker"]["environment"], worker_document("ConfigMap")["data"]]
    for environment in clients:
        assert url_port(environment["PREFECT_API_URL"]) == prefect_port
        assert url_port(environment["MLFLOW_TRACKING_URI"]) == mlflow_port
    assert url_port(spec["deploy"]["environment"]["PREFECT_API_URL"]) == prefect_port
    assert url_port(spec["prefect-server"]["environment"]["PREFECT_UI_API_URL"]) == prefect_port
    s3_port = url_port(spec["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"])
    assert f"127.0.0.1:{s3_port}:{s3_port}" in spec["minio"]["ports"]
    assert str(s3_port) in option(spec["minio"]["command"], "--address")
    assert f"EXPOSE {prefect_port} {mlflow_port}" in DOCKERFILE.read_text()
    for service in spec.values():
        for published in service.get("ports", []):
            assert published.startswith("127.0.0.1:"), published


def test_each_server_has_its_own_database():
    spec = compose()["services"]
    created = spec["postgres"]["environment"]["STEMMA_DATABASES"].split()
    prefect_database = spec["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_NAME"]
    mlflow_uri = spec["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    mlflow_database = mlflow_uri.rsplit("/", 1)[1]
    assert sorted(created) == sorted({prefect_database, mlflow_database})
    assert mlflow_uri.startswith("postgresql://") and "@postgres:5432/" in mlflow_uri
    assert spec["prefect-server"]["environment"]["PREFECT_SERVER_DATABASE_DRIVER"] == (
        "postgresql+asyncpg"
    )
    assert spec["mlflow"]["environment"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")


# ---------------------------------------------------------------------------------------
# Environment variables and secrets


def known_variables() -> set[str]:
    """Every environment variable that Prefect, prefect-kubernetes, MLflow, botocore and
    libpq read."""
    import mlflow.cli
    import mlflow.environment_variables as mlflow_variables
    from botocore.configprovider import BOTOCORE_DEFAUT_SESSION_VARIABLES
    from botocore.credentials import EnvProvider
    from prefect.settings import Settings
    from prefect.settings.legacy import _get_valid_setting_names
    from prefect_kubernetes.settings import KubernetesSettings

    names = set(_get_valid_setting_names(Settings)) | set(
        _get_valid_setting_names(KubernetesSettings)
    )
    names |= {
        variable.name
        for variable in vars(mlflow_variables).values()
        if hasattr(variable, "name") and hasattr(variable, "get")
    }
    names |= {parameter.envvar for parameter in mlflow.cli.server.params if parameter.envvar}
    for _, variable, *_ in BOTOCORE_DEFAUT_SESSION_VARIABLES.values():
        names |= {variable} if isinstance(variable, str) else set(variable or [])
    names |= {EnvProvider.ACCESS_KEY, EnvProvider.SECRET_KEY, EnvProvider.TOKENS[0]}
    names |= s3_endpoint_variables()
    return names | LIBPQ_VARIABLES


def s3_endpoint_variables() -> set[str]:
    """The variables from which botocore (and s3fs over it) takes an S3 endpoint URL."""
    from botocore.configprovider import ConfiguredEndpointProvider

    candidates = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
    url = "http://minio.invalid:9000"
    return {
        name
        for name in candidates
        if ConfiguredEndpointProvider({}, {}, "s3", environ={name: url}).provide() == url
    }


def stemma_variables(command: list[str]) -> set[str]:
    """Variables Stemma reads because the spec a `stemma endpoint` command runs names them."""
    if command[:2] != ["stemma", "endpoint"]:
        return set()
    return {endpoint_settings(tuple(command)).token_env} - {None}


def compose_environment(name: str) -> dict[str, str]:
    return compose()["services"][name].get("environment", {})


def test_known_variables_cover_what_the_stack_relies_on():
    # Guards the lookup itself: if these were missing, the next test would prove nothing.
    known = known_variables()
    for name in (
        "PREFECT_API_URL",
        "PREFECT_SERVER_DATABASE_PASSWORD",
        "PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_S3_ENDPOINT_URL",
        "MLFLOW_BACKEND_STORE_URI",
        "AWS_ACCESS_KEY_ID",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL_S3",
    ):
        assert name in known, name
    assert "MLFLOW_S3_ENDPOINT" not in known and "PREFECT_API_URI" not in known


@pytest.mark.parametrize("service", sorted(compose()["services"]))
def test_compose_variables_are_read_by_something(service):
    command = compose()["services"][service].get("command", [])
    known = known_variables() | IMAGE_VARIABLES.get(service, set()) | stemma_variables(command)
    script = " ".join(map(str, command))
    for mount in compose()["services"][service].get("volumes", []):
        source = COMPOSE.parent / mount.split(":", 1)[0]
        if source.is_file():
            script += source.read_text()
    unknown = [
        name
        for name in compose_environment(service)
        if name not in known and f"${name}" not in script and f"${{{name}" not in script
    ]
    assert not unknown, f"{service}: nothing reads {unknown}"


def test_kubernetes_variables_are_read_by_prefect_mlflow_or_boto():
    known = known_variables() | stemma_variables(endpoint_container()["command"])
    names = [env["name"] for env in worker_container()["env"] + endpoint_container()["env"]]
    names += list(worker_document("ConfigMap")["data"])
    assert [name for name in names if name not in known] == []


def test_no_secret_value_is_written_in_a_file():
    for service, spec in compose()["services"].items():
        for name, value in spec.get("environment", {}).items():
            if SECRET_NAME.search(name):
                assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", str(value)), f"{service}: {name}"
        for argument in spec.get("command", []):
            # Interpolated values would land in the container's command line.
            assert not re.search(r"(?<!\$)\$\{?\w*(PASSWORD|SECRET)", str(argument)), service
    for document in [*worker_documents(), *endpoint_documents()]:
        assert document["kind"] != "Secret", "Secrets are created by hand, never committed"
    for env in worker_container()["env"] + endpoint_container()["env"]:
        if SECRET_NAME.search(env["name"]):
            assert "secretKeyRef" in env.get("valueFrom", {}), env["name"]
    assert not any(SECRET_NAME.search(name) for name in worker_document("ConfigMap")["data"])
    for line in (INFRA / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            name, value = line.split("=", 1)
            assert value == "", f".env.example gives {name} a value"
    assert ".env" in (INFRA / ".gitignore").read_text().split()
    for line in DOCKERFILE.read_text().splitlines():
        assert not (line.startswith(("ENV", "ARG")) and SECRET_NAME.search(line)), line


def test_mlflow_server_accepts_the_host_names_clients_use():
    allowed = compose_environment("mlflow")["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    from urllib.parse import urlsplit

    for environment in (compose_environment("prefect-worker"),):
        assert urlsplit(environment["MLFLOW_TRACKING_URI"]).netloc in allowed


def test_deploy_script_commands_parse():
    for line in DEPLOY_SCRIPT.read_text().splitlines():
        if "work-pool create" in line or " deploy " in line:
            shlex.split(line.rstrip("\\"))


def test_agrees_with_stemma_serve_on_the_flows_both_deploy():
    from stemma.components.platform.deployments import deployment_plans
    from stemma.components.spec import load_spec

    # The repository carries no generated data: check the spec, not its paths.
    loaded = load_spec(str(REPO_ROOT / "configs" / "credit.yaml"), [], check_paths=False)
    plans = {plan.entrypoint: plan for plan in deployment_plans(loaded, "configs/credit.yaml")}
    for deployment in deployments():
        plan = plans[deployment["entrypoint"]]
        assert deployment["parameters"] == plan.parameters
        if deployment["name"] == plan.name:
            crons = [schedule["cron"] for schedule in deployment.get("schedules", [])]
            assert crons == ([plan.cron] if plan.cron else [])
