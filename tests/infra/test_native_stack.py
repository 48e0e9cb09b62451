"""The production stack of infra/, run natively on this machine, end to end.

The same servers as infra/docker-compose.yml, without Docker: PostgreSQL from Debian's
packages (databases made by infra/postgres/create-databases.sh, password authentication),
moto's S3 server standing in for MinIO, and Prefect and MLflow servers started by
``stemma up``'s own launcher (:func:`stemma.components.platform.services.start_services`) on those
databases, with MLflow's artifacts in S3. A training flow runs against it as a user runs
it (``stemma run train``), and the test checks through the servers' REST APIs, the
databases and the S3 bucket that everything landed where the stack says it does. Then
infra/deploy.sh creates the work pools and prefect.yaml's deployments on the same server,
and a drift event starts the retraining deployment.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from stemma.components.platform.services import start_services, stop_services
from tests.support import build_project, free_port, git

REPO_ROOT = Path(__file__).resolve().parents[2]
INFRA = REPO_ROOT / "infra"
VENV_BIN = Path(sys.executable).parent

#: Small enough to train two epochs in seconds.
TRAIN_ROWS = 2_000
DB_USER = "stemma"
#: Made up per run: the servers authenticate with it, and nothing is stored anywhere.
DB_PASSWORD = f"pw-{os.getpid()}-{time.time_ns()}"
MLFLOW_BUCKET = "mlflow"
DVC_BUCKET = "dvc"
#: moto accepts any credentials; the MLflow server needs some to sign its requests.
S3_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "stemma-test",
    "AWS_SECRET_ACCESS_KEY": "stemma-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
#: Seconds to wait for the drift event's automation to create the retraining run.
TRIGGER_TIMEOUT_S = 60.0

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------------------
# PostgreSQL


@dataclass(frozen=True)
class Postgres:
    bin_dir: Path
    port: int

    def url(self, database: str, *, password: bool = True) -> str:
        secret = f":{DB_PASSWORD}" if password else ""
        return f"postgresql://{DB_USER}{secret}@127.0.0.1:{self.port}/{database}"

    def query(self, database: str, sql: str, *args) -> list[tuple]:
        import psycopg2

        with (
            contextlib.closing(psycopg2.connect(self.url(database))) as connection,
            connection.cursor() as cursor,
        ):
            cursor.execute(sql, args)
            return cursor.fetchall()


def find_postgres_bin() -> Path | None:
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(os.path.realpath(on_path)).parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return candidates[-1].parent if candidates else None


def postgres_bin_or_skip() -> Path:
    """The folder of initdb/pg_ctl, installed by infra/native/install.sh if need be."""
    found = find_postgres_bin()
    if found is None:
        done = subprocess.run(
            ["bash", str(INFRA / "native" / "install.sh")],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.fail(f"infra/native/install.sh failed:\n{done.stdout}\n{done.stderr}")
        found = find_postgres_bin()
        if found is None:
            reason = (done.stdout + done.stderr).strip()
            print(f"PostgreSQL unavailable: {reason}")
            pytest.skip(f"PostgreSQL binaries unavailable and not installable: {reason}")
    return found


def server_user() -> str | None:
    """initdb refuses to run as root: run PostgreSQL as `postgres` (or `nobody`) then."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    pytest.skip("running as root and no unprivileged user to run PostgreSQL as")


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL server on a free loopback port, with password authentication."""
    bin_dir = postgres_bin_or_skip()
    user = server_user()
    # Outside pytest's tmp folder: that one is private to root and the server's user
    # must reach its files.
    folder = Path(tempfile.mkdtemp(prefix="stemma-postgres-"))
    data, password_file = folder / "data", folder / "password"
    password_file.write_text(DB_PASSWORD + "\n")
    if user:
        record = pwd.getpwnam(user)
        for path in (folder, password_file):
            os.chown(path, record.pw_uid, record.pw_gid)
    port = free_port()

    def run(*command: str) -> None:
        subprocess.run(command, check=True, capture_output=True, user=user, cwd=folder)

    try:
        run(
            str(bin_dir / "initdb"),
            "--pgdata",
            str(data),
            "--username",
            DB_USER,
            "--pwfile",
            str(password_file),
            "--auth",
            "scram-sha-256",
            "--encoding",
            "UTF8",
            "--no-instructions",
        )
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off"
        run(
            str(bin_dir / "pg_ctl"),
            "start",
            "--pgdata",
            str(data),
            "--log",
            str(folder / "server.log"),
            "--wait",
            "--options",
            options,
        )
    except subprocess.CalledProcessError as error:
        shutil.rmtree(folder, ignore_errors=True)
        raise AssertionError(
            f"PostgreSQL did not start: {error.stderr.decode(errors='replace')}"
        ) from error
    try:
        yield Postgres(bin_dir=bin_dir, port=port)
    finally:
        subprocess.run(
            [str(bin_dir / "pg_ctl"), "stop", "--pgdata", str(data), "--mode", "fast", "--wait"],
            check=False,
            capture_output=True,
            user=user,
            cwd=folder,
        )
        shutil.rmtree(folder, ignore_errors=True)


def create_databases(postgres: Postgres) -> None:
    """The databases of the stack, made by the script the postgres container runs."""
    environment = {
        **os.environ,
        "PATH": f"{postgres.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "POSTGRES_USER": DB_USER,
        "POSTGRES_DB": "postgres",
        "PGHOST": "127.0.0.1",
        "PGPORT": str(postgres.port),
        "PGPASSWORD": DB_PASSWORD,
    }
    subprocess.run(
        ["bash", str(INFRA / "postgres" / "create-databases.sh")],
        env=environment,
        check=True,
        capture_output=True,
    )


# ---------------------------------------------------------------------------------------
# S3 and the servers


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """moto's S3 server on a free loopback port, with the stack's two buckets."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        client = boto3.client("s3", endpoint_url=endpoint, **_boto_credentials())
        for bucket in (MLFLOW_BUCKET, DVC_BUCKET):
            client.create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stop()


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": S3_ENVIRONMENT["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_ENVIRONMENT["AWS_SECRET_ACCESS_KEY"],
        "region_name": S3_ENVIRONMENT["AWS_DEFAULT_REGION"],
    }


@dataclass(frozen=True)
class Stack:
    project: Path
    prefect_api: str
    mlflow: str
    s3: str
    postgres: Postgres


@pytest.fixture(scope="module")
def stack(postgres, s3, tmp_path_factory) -> Iterator[Stack]:
    """Prefect and MLflow servers on PostgreSQL, MLflow's artifacts in moto's S3."""
    project = build_project(
        tmp_path_factory.mktemp("native") / "project", REPO_ROOT, train_rows=TRAIN_ROWS
    )
    create_databases(postgres)
    prefect_port, mlflow_port = free_port(), free_port()
    with pytest.MonkeyPatch.context() as patch:
        # What the compose file gives the mlflow service: S3 endpoint and credentials,
        # and the database password through libpq's PGPASSWORD, not in the URI.
        for name, value in {
            **S3_ENVIRONMENT,
            "MLFLOW_S3_ENDPOINT_URL": s3,
            "PGPASSWORD": DB_PASSWORD,
        }.items():
            patch.setenv(name, value)
        try:
            services = start_services(
                project,
                prefect_port=prefect_port,
                mlflow_port=mlflow_port,
                prefect_database_url=postgres.url("prefect"),
                mlflow_database_url=postgres.url("mlflow", password=False),
                mlflow_artifacts_destination=f"s3://{MLFLOW_BUCKET}",
            )
        except BaseException:
            stop_services(project)
            raise
    try:
        urls = {service.name: service.url for service in services}
        yield Stack(
            project=project,
            prefect_api=f"{urls['prefect']}/api",
            mlflow=urls["mlflow"],
            s3=s3,
            postgres=postgres,
        )
    finally:
        stop_services(project)


def client_environment(stack: Stack) -> dict[str, str]:
    """A user's shell pointed at the stack: no S3 credentials, no database password.

    The MLflow server proxies artifacts, so a client needs nothing but its URL.
    """
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("AWS_", "MLFLOW_", "PREFECT_", "PG"))
    }
    environment.update(
        {
            "PREFECT_API_URL": stack.prefect_api,
            "MLFLOW_TRACKING_URI": stack.mlflow,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
    )
    return environment


def api(url: str, body: dict | None = None) -> dict | list:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url,
        data=data,
        headers={"Content-Type": "application/json"},
        method="GET" if body is None else "POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise AssertionError(f"{url}: HTTP {error.code}: {error.read()[:500]!r}") from error


# ---------------------------------------------------------------------------------------
# Training against the stack


@pytest.fixture(scope="module")
def deploying(stack) -> Iterator[subprocess.Popen]:
    """infra/deploy.sh started against the stack's Prefect server (pools, then prefect.yaml).

    It only talks to the Prefect server, as the training does: the two run side by side.
    """
    environment = client_environment(stack)
    environment["PREFECT"] = str(VENV_BIN / "prefect")
    process = subprocess.Popen(
        ["bash", str(INFRA / "deploy.sh")],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.fixture(scope="module")
def trained(stack, deploying, stemma_exe) -> dict:
    """`stemma run train` against the stack, as a user runs it (while deploy.sh runs)."""
    done = subprocess.run(
        [*stemma_exe, "run", "train", "configs/credit.yaml", "--set", "train.epochs=2"],
        cwd=stack.project,
        env=client_environment(stack),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"training failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    experiment = api(
        f"{stack.mlflow}/api/2.0/mlflow/experiments/get-by-name?experiment_name=credit"
    )["experiment"]
    runs = api(
        f"{stack.mlflow}/api/2.0/mlflow/runs/search",
        {"experiment_ids": [experiment["experiment_id"]], "max_results": 10},
    )["runs"]
    return {"experiment": experiment, "runs": runs, "output": done.stdout}


def test_training_run_is_tracked_by_the_mlflow_server_on_postgresql(stack, trained):
    (run,) = trained["runs"]
    assert run["info"]["status"] == "FINISHED"
    tags = {tag["key"]: tag["value"] for tag in run["data"]["tags"]}
    assert tags["stemma.flow"] == "train"
    # The experiment's artifacts go through the server (proxied), not to a client path.
    assert trained["experiment"]["artifact_location"].startswith("mlflow-artifacts:")
    # The run is a row of MLflow's PostgreSQL database, not of some SQLite file.
    rows = stack.postgres.query(
        "mlflow", "SELECT status FROM runs WHERE run_uuid = %s", run["info"]["run_id"]
    )
    assert rows == [("FINISHED",)]
    assert not (stack.project / ".stemma" / "mlflow.db").exists()


def test_model_version_is_registered_with_its_weights_in_s3(stack, trained):
    import boto3

    (run,) = trained["runs"]
    run_id = run["info"]["run_id"]
    versions = api(
        f"{stack.mlflow}/api/2.0/mlflow/model-versions/search?filter=name%3D%27credit%27"
    )["model_versions"]
    assert [version["run_id"] for version in versions] == [run_id]
    version = versions[0]
    assert version["status"] == "READY"
    tags = {tag["key"]: tag["value"] for tag in version["tags"]}

    client = boto3.client("s3", endpoint_url=stack.s3, **_boto_credentials())
    keys = [
        item["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=MLFLOW_BUCKET)
        for item in page.get("Contents", [])
    ]
    experiment_id = trained["experiment"]["experiment_id"]
    assert f"{experiment_id}/{run_id}/artifacts/lineage/record.json" in keys
    weights = [key for key in keys if key.endswith("/weights.safetensors")]
    assert len(weights) == 1, keys
    body = client.get_object(Bucket=MLFLOW_BUCKET, Key=weights[0])["Body"].read()
    assert hashlib.sha256(body).hexdigest() == tags["stemma.weights.sha256"]


def test_flow_run_is_recorded_by_the_prefect_server_on_postgresql(stack, trained):
    (run,) = trained["runs"]
    tags = {tag["key"]: tag["value"] for tag in run["data"]["tags"]}
    flow_run_id = tags["stemma.prefect.flow_run_id"]
    flow_run = api(f"{stack.prefect_api}/flow_runs/{flow_run_id}")
    assert flow_run["state_type"] == "COMPLETED"
    rows = stack.postgres.query(
        "prefect", "SELECT state_type FROM flow_run WHERE id = %s", flow_run_id
    )
    assert rows == [("COMPLETED",)]


# ---------------------------------------------------------------------------------------
# Work pools, deployments and the drift trigger


@pytest.fixture(scope="module")
def deployed(stack, deploying) -> dict[str, dict]:
    """What infra/deploy.sh made on the stack's Prefect server, once it finished."""
    stdout, stderr = deploying.communicate(timeout=300)
    assert deploying.returncode == 0, f"deploy.sh failed:\n{stdout[-4000:]}\n{stderr[-4000:]}"
    deployments = api(f"{stack.prefect_api}/deployments/filter", {"limit": 100})
    flows = {flow["id"]: flow["name"] for flow in api(f"{stack.prefect_api}/flows/filter", {})}
    return {f"{flows[item['flow_id']]}/{item['name']}": item for item in deployments}


def test_prefect_yaml_deploys_every_deployment_to_its_work_pool(deployed):
    import yaml

    spec = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    expected = {
        (item["entrypoint"], item["name"], item["work_pool"]["name"])
        for item in spec["deployments"]
    }
    found = {
        (item["entrypoint"], item["name"], item["work_pool_name"]) for item in deployed.values()
    }
    assert found == expected


def test_nightly_schedules_are_active_crons(deployed):
    crons = {
        name: sorted(
            (schedule["schedule"]["cron"], schedule["active"]) for schedule in item["schedules"]
        )
        for name, item in deployed.items()
        if item["schedules"]
    }
    assert crons == {
        "score/credit · nightly scoring": [("0 2 * * *", True)],
        "retrain/credit · retraining": [("0 3 * * *", True)],
    }


def test_gpu_work_pool_asks_kubernetes_for_a_gpu(stack, deployed):
    pool = api(f"{stack.prefect_api}/work_pools/stemma-kubernetes")
    assert pool["type"] == "kubernetes"
    (container,) = pool["base_job_template"]["job_configuration"]["job_manifest"]["spec"][
        "template"
    ]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert pool["base_job_template"]["variables"]["properties"]["gpu_count"]["default"] == 1
    gpu = deployed["train/credit · training on GPU"]
    assert gpu["job_variables"]["gpu_count"] == 1


def test_drift_event_starts_the_retraining_deployment(stack, deployed):
    retrain = deployed["retrain/credit · retraining"]
    automations = api(f"{stack.prefect_api}/automations/filter", {})
    (automation,) = [
        item
        for item in automations
        if any(action.get("deployment_id") == retrain["id"] for action in item["actions"])
    ]
    assert automation["trigger"]["expect"] == ["stemma.drift.detected"]
    assert automation["trigger"]["match"] == {"prefect.resource.id": "stemma.pipeline.credit"}

    emitted = subprocess.run(
        [
            str(VENV_BIN / "prefect"),
            "event",
            "emit",
            "stemma.drift.detected",
            "--resource-id",
            "stemma.pipeline.credit",
        ],
        env=client_environment(stack),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert emitted.returncode == 0, emitted.stdout + emitted.stderr
    body = {"deployments": {"id": {"any_": [retrain["id"]]}}}
    deadline = time.monotonic() + TRIGGER_TIMEOUT_S
    runs: list = []
    while time.monotonic() < deadline and not runs:
        runs = api(f"{stack.prefect_api}/flow_runs/filter", body)
        time.sleep(1)
    assert runs, "no retraining run was created for the drift event"
    parameters = runs[0]["parameters"]
    assert (parameters["config"], parameters["overrides"]) == ("configs/credit.yaml", [])
    # The event carries no payload here, so no drift report is named as the cause.
    assert not parameters.get("cause")


# ---------------------------------------------------------------------------------------
# DVC remote on the same S3


def test_dvc_push_then_pull_into_a_clean_clone_restores_the_data(s3, tmp_path):
    from stemma.components.data.tables import resolve_data_version

    project = build_project(tmp_path / "project", REPO_ROOT, train_rows=TRAIN_ROWS)
    environment = {**os.environ, **S3_ENVIRONMENT}
    dvc = [str(VENV_BIN / "dvc")]

    def run(*command: str, cwd: Path = project) -> None:
        done = subprocess.run(
            command, cwd=cwd, env=environment, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout}\n{done.stderr}"

    run(*dvc, "remote", "add", "--default", "s3remote", f"s3://{DVC_BUCKET}/credit")
    run(*dvc, "remote", "modify", "s3remote", "endpointurl", s3)
    git(project, "add", ".dvc/config")
    git(project, "commit", "-q", "-m", "DVC remote on S3")
    run(*dvc, "push")
    import boto3

    client = boto3.client("s3", endpoint_url=s3, **_boto_credentials())
    pushed = client.list_objects_v2(Bucket=DVC_BUCKET, Prefix="credit/")
    # Every file of the data folder, plus the folder's listing.
    assert pushed["KeyCount"] == len([p for p in (project / "data").rglob("*") if p.is_file()]) + 1

    clone = tmp_path / "clone"
    run("git", "clone", "--quiet", str(project), str(clone))
    assert not (clone / "data").exists()
    run(*dvc, "pull", cwd=clone)
    original = resolve_data_version(project, project / "data" / "credit" / "train.parquet")
    restored = resolve_data_version(clone, clone / "data" / "credit" / "train.parquet")
    assert restored.md5 == original.md5
    assert restored.file_md5 == original.file_md5
