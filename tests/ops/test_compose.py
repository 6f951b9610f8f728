"""The compose deployment, checked without a Docker engine.

What can be checked here: docker-compose.yml parses and validates against the Compose Specification
(the published JSON schema kept in tests/ops/data, and a compose client's own ``config`` when one
is installed); every command it runs exists in our CLI with the options it passes; no secret is
written in it and .env.example covers every variable; each GPU worker reserves a GPU of its own.
Issue 15, items 10 and 11: each service sees only the secrets it needs, the Redis password is on no
command line, every long-running service has a health check (a worker's pings its own Celery nodes),
images are pinned, the bucket set-up swallows no error, the CPU worker is the default, torch is pinned
once, and ``make demo`` installs no browser.
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


def test_compose_client_accepts_the_file(tmp_path):  # skipped where no compose client is installed
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
    gpu = set(run("--profile", "gpu", "config", "--services").split())
    assert "worker-cpu" in default and not {"worker-gpu0", "worker-gpu1"} & default
    assert {"worker-gpu0", "worker-gpu1"} <= gpu


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

    per_process = {ENV["device"], ENV["gpu"], ENV["queue"], ENV["host_procs"]}
    missing = sorted(set(ENV.values()) - per_process - set(_env_example(include_commented=True)))
    assert not missing, f"add to .env.example: {missing}"


# Which service may see which secret (a URL with a password counts as that password).
SECRET_USERS = {
    "STYLETAG_DATABASE_URL": {"migrate", "worker-cpu", "worker-gpu0", "worker-gpu1", "beat", "metrics"},
    "STYLETAG_BROKER_URL": {"worker-cpu", "worker-gpu0", "worker-gpu1", "beat", "metrics", "flower"},
    "AWS_ACCESS_KEY_ID": {"worker-cpu", "worker-gpu0", "worker-gpu1", "minio-init"},
    "AWS_SECRET_ACCESS_KEY": {"worker-cpu", "worker-gpu0", "worker-gpu1", "minio-init"},
    "MINIO_ROOT_USER": {"minio", "minio-init"},
    "MINIO_ROOT_PASSWORD": {"minio", "minio-init"},
    "POSTGRES_PASSWORD": {"postgres"},
    "FLOWER_BASIC_AUTH": {"flower"},
    "REDIS_PASSWORD": set(),  # a config file for redis, nothing else
}


def _env_refs(service: dict) -> set[str]:
    """Variables of .env whose values reach the service's environment."""
    env = service.get("environment") or {}
    values = env.values() if isinstance(env, dict) else [e.partition("=")[2] for e in env]
    return {a or b for v in values for a, b in INTERPOLATED.findall(str(v))}


def test_no_service_reads_the_env_file_whole(services):
    """.env holds every password: compose reads it for interpolation, no container gets it (issue 15)."""
    for name, service in services.items():
        assert "env_file" not in service, f"{name}: env_file hands the container every secret of .env"


def test_each_service_gets_only_the_secrets_it_needs(services):
    for secret, users in SECRET_USERS.items():
        seen = {name for name, service in services.items() if secret in _env_refs(service)}
        assert seen == users, f"{secret}: given to {sorted(seen)}, needed by {sorted(users)}"
    # and nothing named like a secret slipped in beside them
    for name, service in services.items():
        extra = {v for v in _env_refs(service) if SECRET_NAME.search(v) and v not in SECRET_USERS}
        assert not extra, f"{name} gets {sorted(extra)}"


def test_every_styletag_service_gets_the_settings_it_reads(services):
    from catalog.settings import ENV

    per_process = {ENV[k] for k in ("device", "gpu", "queue", "host_procs", "metrics_port",
                                    "broker_sentinel_password")}
    secrets = {ENV["database_url"], ENV["broker_url"]}
    for name, service in services.items():
        if not _uses_our_image(service):
            continue
        refs = _env_refs(service)
        missing = set(ENV.values()) - per_process - secrets - refs
        assert not missing, f"{name} does not pass {sorted(missing)}"


def test_redis_password_is_on_no_command_line(compose, services):
    for name, service in services.items():
        for key in ("command", "entrypoint"):
            text = " ".join(_as_argv(service.get(key)))
            assert "requirepass" not in text and "REDIS_PASSWORD" not in text, f"{name} {key}: {text}"
        assert "REDIS_PASSWORD" not in _env_refs(service), name
    conf = compose["configs"]["redis-conf"]["content"]
    assert "requirepass ${REDIS_PASSWORD:?" in conf and "appendonly yes" in conf
    redis = services["redis"]
    target = redis["configs"][0]["target"]
    assert redis["configs"][0]["source"] == "redis-conf" and _as_argv(redis["command"]) == ["redis-server", target]
    assert target in redis["healthcheck"]["test"][1]  # the health check reads the password from the file


# --- health checks (issue 15, item 10: a dead consumer went unseen) ------------------------------------

ONE_SHOT = {"minio-init", "migrate"}


def test_every_long_running_service_has_a_health_check(services):
    for name, service in services.items():
        if name in ONE_SHOT:
            continue
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), f"{name} has no health check"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name


def test_worker_health_check_pings_the_nodes_its_own_command_starts(services):
    """The check is the service's own command plus --health: the same --gpus and --queues give the same
    Celery node names (``queue-slot@hostname``, the container's hostname in both), so it pings exactly
    the processes the launcher started; tests/worker/test_malformed_items.py runs it against a real one."""
    workers = [n for n in services if n.startswith("worker-")]
    assert workers
    for name in workers:
        command, check = _argv(services[name]), services[name]["healthcheck"]["test"]
        assert check[0] == "CMD" and check[1] == "styletag", check
        options = [a for a in command[1:] if a not in ("--metrics-port", "9109")]
        assert check[2:] == [*options, "--health"], (name, check)
        assert services[name]["healthcheck"]["start_period"]  # model loading is not a failure
    exe = Path(sys.executable).parent / "styletag"
    base = [str(exe)] if exe.exists() else [sys.executable, "-m", "worker.cli"]
    for sub in ("worker", "beat"):
        out = subprocess.run([*base, sub, "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT).stdout
        assert "--health" in out, sub
    assert services["beat"]["healthcheck"]["test"] == ["CMD", "styletag", "beat", "--health"]


def test_http_health_checks_request_the_services_own_port(services):
    metrics = " ".join(services["metrics"]["healthcheck"]["test"])
    assert "127.0.0.1:9108/metrics" in metrics and "9108" in _argv(services["metrics"])
    flower = " ".join(services["flower"]["healthcheck"]["test"])
    assert "127.0.0.1:5555/healthcheck" in flower and "--port=5555" in _argv(services["flower"])
    assert "FLOWER_BASIC_AUTH" in flower  # Flower asks for its basic auth on every page


# --- images pinned; the bucket set-up stops on an error -------------------------------------------------

def test_third_party_images_are_pinned(services):
    for name, service in services.items():
        if _uses_our_image(service):
            continue
        image = str(service["image"])
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest" and "/" not in tag, f"{name}: image {image!r} is not pinned"
        if repo.startswith("minio/"):
            assert re.fullmatch(r"RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", tag), image
        else:
            assert re.fullmatch(r"\d+\.\d+(\.\d+)?", tag), f"{name}: pin a minor version, not {tag!r}"


def test_bucket_setup_swallows_no_error_and_grants_one_bucket(services):
    script = "\n".join(_as_argv(services["minio-init"]["command"]))
    assert "|| true" not in script and "set -eu" in script.splitlines()[0]
    assert "readwrite" not in script  # MinIO's built-in policy: every bucket of the server
    assert "arn:aws:s3:::%s/*" in script and "mc admin policy attach local styletag-bucket" in script
    assert "mc anonymous set none" in script


# --- torch pinned once; the demo installs no browser (issue 15, item 11) ------------------------------

def _makefile_torch() -> str:
    m = re.search(r"^TORCH := (.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert m, "Makefile has no TORCH := line"
    return m.group(1).strip()


def test_dockerfile_and_makefile_install_the_same_torch():
    m = re.search(r'^ARG TORCH_SPEC="([^"]+)"', DOCKERFILE.read_text(), re.MULTILINE)
    assert m and m.group(1) == _makefile_torch(), (m and m.group(1), _makefile_torch())
    assert re.fullmatch(r"torch==\d+\.\d+\.\d+ torchvision==\d+\.\d+\.\d+", _makefile_torch())


def _make_dry_run(target: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    proc = subprocess.run(["make", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_make_demo_installs_no_browser_and_make_test_does():
    demo = _make_dry_run("demo")
    assert "chromium" not in demo and "python -m worker.ops.demo" in demo
    assert f"pip install -q {_makefile_torch()}" in demo
    assert all("--no-install-recommends" in ln for ln in demo.splitlines() if "apt-get install" in ln)
    test = _make_dry_run("test")
    installs = [ln for ln in test.splitlines() if "apt-get install" in ln and "chromium" in ln]
    assert installs and all("--no-install-recommends" in ln for ln in installs)
    assert test.index("chromium") < test.index("pytest")


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
    assert _env_example()["COMPOSE_PROFILES"] == "cpu"  # a CPU host needs no flag; a GPU host sets gpu


# --- the rest of the deployment's promises -----------------------------------------------------------

def test_stateful_services_persist_and_report_health(compose, services):
    redis = services["redis"]
    assert "appendonly yes" in compose["configs"]["redis-conf"]["content"]
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
    assert text.index("${TORCH_SPEC}") < text.index("pip install .")
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".env" in ignored and ".venv" in ignored, ".env and .venv must never enter the build context"
