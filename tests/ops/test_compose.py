"""The compose deployment, checked without a Docker engine.

What can be checked here: docker-compose.yml parses and validates against the Compose Specification
(the published JSON schema kept in tests/ops/data, and a compose client's own ``config`` when one
is installed); every command it runs exists in our CLI with the options it passes; no secret is
written in it and .env.example covers every variable; each GPU worker reserves a GPU of its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from worker.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "data"
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
SCHEMA_FILE = DATA / "compose-spec.json"

# Sub-commands another engineer is adding (issue 7, parts 2 and 3).
PENDING = {
    "beat": "`styletag beat` (nightly schedule, issue 7 part 2) is not in worker.cli.COMMANDS yet",
    "metrics": "`styletag metrics` (Prometheus exporter, issue 7 part 3) is not in worker.cli.COMMANDS yet",
}

SECRET_NAME = re.compile(r"pass(word)?|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|credential|auth",
                         re.IGNORECASE)
# A secret may only be a ${VAR} reference, optionally ${VAR:?message}; never ${VAR:-literal default}.
SECRET_REF = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(:?\?[^}]*)?\}$")
INTERPOLATED = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)|(?<!\$)\$([A-Za-z_][A-Za-z0-9_]*)")
RUNTIME_REF = re.compile(r"\$\$\{?([A-Za-z_][A-Za-z0-9_]*)")
URL_PASSWORD = re.compile(r"://[^/\s:@]*:([^@\s/]+)@")
ASSIGNED_SECRET = re.compile(r"\b[A-Za-z0-9_]*(?:PASSWORD|SECRET|TOKEN|_KEY|_AUTH)[A-Za-z0-9_]*=([^\s;&|]+)",
                             re.IGNORECASE)
FLAG_SECRET = re.compile(r"--?[\w-]*(?:pass|secret|token|key|auth)[\w-]*(?:=|\s+)([^\s;&|]+)", re.IGNORECASE)


def _load_compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _env_example(include_commented: bool = False) -> dict[str, str]:
    """KEY=VALUE lines of .env.example; with include_commented, also ``# KEY=`` lines."""
    values: dict[str, str] = {}
    pattern = re.compile(r"^(#\s*)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = pattern.match(line.strip())
        if m and (include_commented or not m.group(1)):
            values.setdefault(m.group(2), m.group(3).strip())
    return values


def _dockerfile_entrypoint() -> list[str]:
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if ln.startswith("ENTRYPOINT")]
    assert lines, "Dockerfile has no ENTRYPOINT"
    return json.loads(lines[-1].split(None, 1)[1])


def _uses_our_image(service: dict) -> bool:
    return "build" in service or str(service.get("image", "")).startswith("${STYLETAG_IMAGE")


def _as_argv(value) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def _argv(service: dict) -> list[str]:
    """What the container runs: the entrypoint (the service's, else the Dockerfile's) plus the command."""
    entry = service.get("entrypoint")
    return (_as_argv(entry) if entry is not None else _dockerfile_entrypoint()) + _as_argv(service.get("command"))


def _subcommand(argv: list[str]) -> str:
    """First argument after ``styletag`` that is not a group option (``--log-level X``, ``--log-json``)."""
    args = iter(argv[1:])
    for arg in args:
        if arg == "--log-level":
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return ""


def _strings(node, path=()):
    """Every (path, key, value) in the document, values being scalars."""
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(v, dict | list):
                yield from _strings(v, (*path, str(k)))
            else:
                yield (*path, str(k)), str(k), v
    elif isinstance(node, list):
        if node and not any(isinstance(v, dict | list) for v in node):
            # An exec-form command as one line too, so that a flag and its value are seen together.
            yield (*path, "*"), None, shlex.join(str(v) for v in node)
        for i, v in enumerate(node):
            if isinstance(v, dict | list):
                yield from _strings(v, (*path, str(i)))
            else:
                yield (*path, str(i)), None, v


def _styletag_services() -> list[str]:
    try:
        services = _load_compose()["services"]
    except Exception:  # the structural tests below report a broken file
        return []
    return [n for n, s in services.items() if _uses_our_image(s) and _argv(s)[:1] == ["styletag"]]


def _cli_param(name: str):
    sub = _subcommand(_argv(_load_compose()["services"][name]))
    if sub in PENDING and sub not in COMMANDS:
        return pytest.param(name, id=name, marks=pytest.mark.xfail(reason=PENDING[sub], strict=False))
    return pytest.param(name, id=name)


@pytest.fixture(scope="module")
def compose() -> dict:
    return _load_compose()


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


# --- (a) the file parses and is a valid Compose Specification file ---------------------------------

def test_compose_file_parses_without_version_key(compose):
    assert isinstance(compose, dict)
    assert "version" not in compose, "the Compose Specification has no version: key (it is obsolete)"
    assert set(compose) <= {"name", "services", "volumes", "networks", "secrets", "configs", "include",
                            "models"} | {k for k in compose if k.startswith("x-")}
    for name in ("redis", "postgres", "minio", "minio-init", "migrate", "worker-gpu0", "worker-gpu1",
                 "worker-cpu", "beat", "flower", "metrics"):
        assert name in compose["services"], name


def test_schema_is_the_recorded_compose_spec():
    digest = hashlib.sha256(SCHEMA_FILE.read_bytes()).hexdigest()
    assert digest in (DATA / "README.md").read_text(), "compose-spec.json changed: record its origin and hash"
    schema = json.loads(SCHEMA_FILE.read_text())
    assert schema["title"] == "Compose Specification"
    jsonschema.Draft7Validator.check_schema(schema)


def test_compose_validates_against_compose_spec_schema(compose):
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA_FILE.read_text()))
    errors = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
              for e in sorted(validator.iter_errors(compose), key=lambda e: list(map(str, e.path)))]
    assert not errors, "\n".join(errors)


def test_schema_rejects_a_broken_file(compose):
    """The validation above is not vacuous: a misspelt key and a bad depends_on condition fail."""
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA_FILE.read_text()))
    broken = json.loads(json.dumps(compose))
    broken["services"]["beat"]["comand"] = ["beat"]
    broken["services"]["migrate"]["depends_on"]["postgres"]["condition"] = "service_ready"
    paths = {tuple(map(str, e.absolute_path)) for e in validator.iter_errors(broken)}
    assert ("services", "beat") in paths
    assert any(p[:3] == ("services", "migrate", "depends_on") for p in paths)


def _compose_client() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        try:
            if subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30).returncode == 0:
                return [docker, "compose"]
        except (OSError, subprocess.SubprocessError):
            pass
    for candidate in (Path(sys.executable).parent / "docker-compose", shutil.which("docker-compose")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return [str(candidate)]
    return None


def test_compose_client_accepts_the_file(tmp_path):
    """``docker compose config`` needs no engine; it interpolates .env and applies the profiles."""
    client = _compose_client()
    if client is None:
        pytest.skip("no compose client installed (neither the docker compose plugin nor docker-compose); "
                    "the JSON-schema test covers validation")
    for name in ("docker-compose.yml", "Dockerfile"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copy(ENV_EXAMPLE, tmp_path / ".env")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}

    def run(*args: str) -> str:
        proc = subprocess.run([*client, "-f", "docker-compose.yml", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"{' '.join(client)} {' '.join(args)}:\n{proc.stderr}"
        return proc.stdout

    run("config", "-q")
    default = set(run("config", "--services").split())
    cpu = set(run("--profile", "cpu", "config", "--services").split())
    assert {"worker-gpu0", "worker-gpu1"} <= default and "worker-cpu" not in default
    assert "worker-cpu" in cpu and not {"worker-gpu0", "worker-gpu1"} & cpu


# --- (b) every command the file runs exists in our CLI ------------------------------------------------

def test_every_service_of_our_image_runs_styletag_or_celery(services):
    ours = {n: _argv(s) for n, s in services.items() if _uses_our_image(s)}
    assert _dockerfile_entrypoint() == ["styletag"]
    assert ours and all(argv[0] in ("styletag", "celery") for argv in ours.values()), ours


@pytest.mark.parametrize("name", [_cli_param(n) for n in _styletag_services()])
def test_styletag_command_exists(services, name):
    argv = _argv(services[name])
    sub = _subcommand(argv)
    assert sub in COMMANDS, f"service {name} runs 'styletag {sub}', which worker.cli.COMMANDS does not have"
    exe = Path(sys.executable).parent / "styletag"
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "worker.cli"]
    # --help after the service's own arguments: click rejects an unknown option before printing help.
    # A worker goes further: --dry-run parses every value and prints the processes it would start.
    extra = ["--dry-run"] if sub == "worker" else ["--help"]
    proc = subprocess.run([*base, *argv[1:], *extra], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, f"styletag {' '.join(argv[1:] + extra)}:\n{proc.stdout}\n{proc.stderr}"
    if sub == "worker":
        specs = json.loads(proc.stdout)
        assert sorted(s["queue"] for s in specs) == ["bulk", "uploads"]
        gpus = argv[argv.index("--gpus") + 1]
        assert {s["CUDA_VISIBLE_DEVICES"] for s in specs} == {"" if gpus == "none" else gpus}


def test_flower_runs_our_celery_app(services):
    argv = _argv(services["flower"])
    assert argv[0] == "celery" and "flower" in argv
    target = argv[argv.index("--app") + 1] if "--app" in argv else argv[argv.index("-A") + 1]
    module, attr = target.split(":")
    from celery import Celery

    assert isinstance(getattr(__import__(module, fromlist=[attr]), attr), Celery)
    assert re.search(r"pip install [^\n]*flower", DOCKERFILE.read_text()), "the image must install flower"


# --- (c) no secret literal; .env.example covers every variable ----------------------------------------

def test_no_secret_literal_in_compose_file(compose):
    problems = []
    for path, key, value in _strings(compose):
        where = "/".join(path)
        text = "" if value is None else str(value)
        if key is not None and SECRET_NAME.search(key) and not SECRET_REF.match(text):
            problems.append(f"{where}: {key} must be a ${{VAR}} reference without a default, got {text!r}")
        if key is None and "environment" in path and path[-1] != "*" and "=" in text:
            name, _, val = text.partition("=")  # list-form environment: KEY=VALUE
            if SECRET_NAME.search(name) and not SECRET_REF.match(val):
                problems.append(f"{where}: {name} must be a ${{VAR}} reference, got {val!r}")
        for pattern in (URL_PASSWORD, ASSIGNED_SECRET, FLAG_SECRET):
            for m in pattern.finditer(text):
                if not m.group(1).lstrip("\"'").startswith("$"):
                    problems.append(f"{where}: literal secret in {m.group(0)!r}")
    assert not problems, "\n".join(problems)


def test_no_example_secret_value_is_copied_into_compose_file():
    raw = COMPOSE_FILE.read_text()
    env = _env_example()
    secrets = {k: v for k, v in env.items() if SECRET_NAME.search(k) and v}
    for key in ("STYLETAG_DATABASE_URL", "STYLETAG_BROKER_URL"):
        m = URL_PASSWORD.search(env.get(key, ""))
        if m:
            secrets[key] = m.group(1)
    assert secrets, ".env.example has no secret placeholders?"
    leaked = sorted(k for k, v in secrets.items() if v in raw)
    assert not leaked, f"values of {leaked} from .env.example are written into docker-compose.yml"


def test_env_example_covers_every_compose_variable(compose):
    values = "\n".join(str(v) for _, _, v in _strings(compose) if v is not None)  # comments excluded
    listed = set(_env_example())
    interpolated = {a or b for a, b in INTERPOLATED.findall(values)}
    runtime = set(RUNTIME_REF.findall(values))  # $$VAR: read inside the container from its environment
    assert interpolated, "compose file uses no ${VAR} at all?"
    assert not interpolated - listed, f"${{VAR}} used in docker-compose.yml but not in .env.example: " \
                                      f"{sorted(interpolated - listed)}"
    assert not runtime - listed, f"$$VAR used in docker-compose.yml but not in .env.example: {sorted(runtime - listed)}"


def test_env_example_lists_the_deployment_variables():
    env = _env_example()
    required = {"STYLETAG_DATABASE_URL", "STYLETAG_BROKER_URL", "STYLETAG_STORE_URL",
                "STYLETAG_ALLOWED_IMAGE_PREFIXES", "STYLETAG_MODEL", "STYLETAG_NIGHTLY_CRON", "AWS_ENDPOINT_URL",
                "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "POSTGRES_PASSWORD", "MINIO_ROOT_USER",
                "MINIO_ROOT_PASSWORD", "REDIS_PASSWORD", "COMPOSE_PROFILES"}
    assert not required - set(env), sorted(required - set(env))
    # Every secret is an obvious placeholder, so a real one is never committed by copying a file back.
    for key, value in env.items():
        if SECRET_NAME.search(key):
            assert "change-me" in value, f"{key} in .env.example should be a change-me placeholder"
    # The URLs repeat the passwords (a .env value is not interpolated for the containers): keep them equal.
    assert URL_PASSWORD.search(env["STYLETAG_DATABASE_URL"]).group(1) == env["POSTGRES_PASSWORD"]
    assert URL_PASSWORD.search(env["STYLETAG_BROKER_URL"]).group(1) == env["REDIS_PASSWORD"]
    assert env["STYLETAG_STORE_URL"].startswith(f"s3://{env['STYLETAG_BUCKET']}/")
    assert any(env["STYLETAG_STORE_URL"].startswith(p) for p in env["STYLETAG_ALLOWED_IMAGE_PREFIXES"].split(","))


def test_env_example_mentions_every_setting_read_from_the_environment():
    """Every setting an operator sets (catalog.settings.ENV, less the ones `styletag worker` sets for each
    process it starts) appears in .env.example (a commented ``# KEY=`` line counts: it documents a variable
    left at its default)."""
    from catalog.settings import ENV

    per_process = {ENV["device"], ENV["gpu"], ENV["queue"]}
    missing = sorted(set(ENV.values()) - per_process - set(_env_example(include_commented=True)))
    assert not missing, f"add to .env.example: {missing}"


def test_every_service_of_our_image_reads_env_file(services):
    for name, service in services.items():
        if _uses_our_image(service):
            files = service.get("env_file")
            files = [files] if isinstance(files, str) else files or []
            assert ".env" in [f if isinstance(f, str) else f.get("path") for f in files], name
            assert "environment" not in service, f"{name}: configure styletag services through .env only"


# --- (d) GPUs: one device per worker, distinct; CPU worker in its own profile --------------------------

def _gpu_devices(service: dict) -> list[dict]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return [d for d in devices if "gpu" in d.get("capabilities", [])]


def test_gpu_workers_reserve_distinct_devices(services):
    reserved: dict[str, str] = {}
    for name, service in services.items():
        devices = _gpu_devices(service)
        if not devices:
            continue
        assert len(devices) == 1 and devices[0].get("driver") == "nvidia", name
        ids = [str(i) for i in devices[0].get("device_ids", [])]
        assert len(ids) == 1 and "count" not in devices[0], f"{name} must reserve exactly one device id"
        assert ids[0] not in reserved, f"{name} and {reserved.get(ids[0])} both reserve GPU {ids[0]}"
        reserved[ids[0]] = name
        assert name == f"worker-gpu{ids[0]}", f"{name} reserves GPU {ids[0]}: name it worker-gpu{ids[0]}"
        argv = _argv(service)
        # The container sees only its reserved GPU, as index 0.
        assert _subcommand(argv) == "worker" and argv[argv.index("--gpus") + 1] in ("0", "all"), name
        assert "gpu" in service.get("profiles", []), f"{name}: GPU workers belong to the gpu profile"
    assert {"worker-gpu0", "worker-gpu1"} <= set(reserved.values())


def test_cpu_worker_is_in_a_profile_and_needs_no_gpu(services):
    cpu = services["worker-cpu"]
    assert "cpu" in cpu.get("profiles", [])
    argv = _argv(cpu)
    assert argv[argv.index("--gpus") + 1] == "none"
    # `docker compose --profile cpu up` on a machine without GPUs starts no service that needs one.
    for name, service in services.items():
        profiles = service.get("profiles")
        if profiles is None or "cpu" in profiles:
            assert not _gpu_devices(service), f"{name} would need a GPU under --profile cpu"
    assert _env_example()["COMPOSE_PROFILES"] == "gpu"


# --- the rest of the deployment's promises -----------------------------------------------------------

def test_stateful_services_persist_and_report_health(compose, services):
    redis = services["redis"]
    assert "--appendonly yes" in " ".join(_as_argv(redis["command"]))
    assert any(str(v).split(":")[1:2] == ["/data"] for v in redis["volumes"])
    assert "pg_isready" in " ".join(_as_argv(services["postgres"]["healthcheck"]["test"]))
    assert any(":/var/lib/postgresql/data" in str(v) for v in services["postgres"]["volumes"])
    for name in ("redis", "postgres", "minio"):
        assert "healthcheck" in services[name], name
        volume = str(services[name]["volumes"][0]).split(":")[0]
        assert volume in compose["volumes"], f"{name} must keep its data on a named volume"
    assert "mc" in " ".join(_as_argv(services["minio-init"]["command"]))
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"


def test_migrate_runs_first_and_everything_waits_for_it(services):
    migrate = services["migrate"]
    assert _argv(migrate)[:3] == ["styletag", "db", "upgrade"]
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert str(migrate["restart"]) == "no" and str(services["minio-init"]["restart"]) == "no"
    for name, service in services.items():
        if _uses_our_image(service) and name not in ("migrate", "flower"):
            assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name


def test_dockerfile_builds_the_package_as_a_non_root_user():
    text = DOCKERFILE.read_text()
    assert re.search(r"python:3\.1[1-9]-slim|nvidia/cuda", text)
    torch_at = text.index("torch==2.11.*")
    assert "torchvision==0.26.*" in text and torch_at < text.index("pip install .")
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".env" in ignored and ".venv" in ignored, ".env and .venv must never enter the build context"
