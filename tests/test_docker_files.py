"""Static checks of the docker/ deployment (no Docker daemon here: nothing is built or run).

What can be checked without Docker is checked: the compose files parse and resolve (variable
defaults, the GPU override merged in), build contexts, COPY sources and bind-mount sources exist,
published ports are loopback-only, the PostgreSQL URLs agree with the postgres service, every Ray
process uses one RAY_AUTH_MODE, the Dockerfiles pin torch and the constraints and run evomerge as a
non-root user, and every command the files and docker/README.md run exists with the flags it passes:
evomerge subcommands and options (from the typer app), `ray` subcommands and options (from the
installed ray's click CLI), optuna-dashboard options (from its --help).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yml"
COMPOSE_GPU = DOCKER / "compose.gpu.yml"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile", "cuda": DOCKER / "Dockerfile.cuda"}
README = DOCKER / "README.md"
DRIVER_SCRIPT = DOCKER / "evomerge-driver.sh"
EXAMPLE_SPACE = DOCKER / "space.example.yml"
TORCH_VERSION = "2.13.0"
USER_MOUNTS = ("/models", "/work/space.yml", "/exports")  # container paths of user-provided bind mounts


# --------------------------------------------------------------------------------------------
# compose: loading, variable interpolation (defaults only, as with an empty environment), merging
# --------------------------------------------------------------------------------------------
_VARIABLE = re.compile(r"\$(?:(?P<dollar>\$)|\{(?P<braced>[^}]*)\}|(?P<name>[A-Za-z_][A-Za-z0-9_]*))")


def _interpolate(text: str, env: dict[str, str]) -> str:
    def substitute(match: re.Match) -> str:
        if match.group("dollar"):
            return "$"
        if match.group("name"):
            return env.get(match.group("name"), "")
        expression = match.group("braced")
        parts = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?", expression, re.S)
        assert parts, f"cannot read ${{{expression}}}"
        name, operator, argument = parts.groups()
        assert "$" not in (argument or ""), f"nested interpolation in ${{{expression}}}"
        value = env.get(name)
        if operator is None:
            return value or ""
        if operator in (":-", "-"):
            return value if (value if operator == ":-" else value is not None) else argument
        if operator in (":?", "?"):
            assert value, f"${{{expression}}} requires {name} to be set: give it a default instead"
            return value
        return argument if value else ""  # :+ and +

    return _VARIABLE.sub(substitute, text)


def _resolve(node, env):
    if isinstance(node, dict):
        return {key: _resolve(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [_resolve(value, env) for value in node]
    if isinstance(node, str):
        return _interpolate(node, env)
    return node


def _merge(base, override):
    """Compose's merge for what our override uses: mappings merge key by key, the rest replaces."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = _merge(base[key], value) if key in base else value
        return merged
    return override


@lru_cache
def _raw(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path.name}: not a mapping"
    return data


def _config(*paths: Path, env: dict[str, str] | None = None) -> dict:
    merged: dict = {}
    for path in paths:
        merged = _merge(merged, _raw(path))
    return _resolve(merged, env or {})


CONFIGS = {"cpu": (COMPOSE,), "gpu": (COMPOSE, COMPOSE_GPU)}


@pytest.fixture(params=sorted(CONFIGS))
def compose(request) -> dict:
    return _config(*CONFIGS[request.param])


def _argv(value) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def _dockerfile_for(service: dict) -> Path | None:
    build = service.get("build")
    if build is None:
        return None
    context = DOCKER / (build if isinstance(build, str) else build.get("context", "."))
    name = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    return (context / name).resolve()


def _service_argv(service: dict) -> list[str]:
    """What a service runs: its entrypoint (or its image's) followed by its command."""
    entrypoint = _argv(service.get("entrypoint"))
    command = _argv(service.get("command"))
    dockerfile = _dockerfile_for(service)
    if dockerfile is not None:
        image = _parse_dockerfile(dockerfile)
        if "entrypoint" not in service:
            entrypoint = image.entrypoint
        if "command" not in service and "entrypoint" not in service:
            command = image.cmd
    return entrypoint + command


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _ray_services(compose: dict) -> dict[str, dict]:
    """Services that run a Ray process: `ray ...` nodes, and drivers (RAY_ADDRESS set)."""
    found = {}
    for name, service in compose["services"].items():
        argv = _service_argv(service)
        if (argv and Path(argv[0]).name == "ray") or "RAY_ADDRESS" in _environment(service):
            found[name] = service
    return found


def _option(argv: list[str], flag: str) -> str | None:
    for i, token in enumerate(argv):
        if token == flag and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith(flag + "="):
            return token.split("=", 1)[1]
    return None


def _bytes(size: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)b?", str(size).strip().lower())
    assert match, f"cannot read size {size!r}"
    return int(float(match.group(1)) * 1024 ** "_kmgt".index(match.group(2) or "_"))


# --------------------------------------------------------------------------------------------
# Dockerfile: a small instruction parser
# --------------------------------------------------------------------------------------------
class Dockerfile:
    def __init__(self, path: Path):
        self.path = path
        self.instructions: list[tuple[str, str]] = []  # (INSTRUCTION, arguments), continuations joined
        logical = ""
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if not logical and (not stripped or stripped.startswith("#")):
                continue
            if logical and stripped.startswith("#"):
                continue  # comment lines inside a continued instruction are dropped
            if stripped.endswith("\\"):
                logical += stripped[:-1] + " "
                continue
            logical += stripped
            keyword, _, rest = logical.partition(" ")
            self.instructions.append((keyword.upper(), rest.strip()))
            logical = ""
        assert not logical, f"{path.name}: ends inside a continued line"
        self.args: dict[str, str] = {}
        for keyword, rest in self.instructions:
            if keyword == "ARG":
                name, _, default = rest.partition("=")
                self.args.setdefault(name.strip(), default.strip().strip('"'))

    def expand(self, text: str) -> str:
        return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: self.args.get(m.group(1), m.group(0)), text)

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    @staticmethod
    def _exec_form(rest: str) -> list[str]:
        return json.loads(rest) if rest.startswith("[") else ["/bin/sh", "-c", rest]

    @property
    def entrypoint(self) -> list[str]:
        found = self.all("ENTRYPOINT")
        return self._exec_form(found[-1]) if found else []

    @property
    def cmd(self) -> list[str]:
        found = self.all("CMD")
        return self._exec_form(found[-1]) if found else []

    @property
    def base_image(self) -> str:
        return self.expand(self.all("FROM")[0].split()[0])

    def copies(self) -> list[tuple[list[str], str, str]]:
        """(sources, destination, WORKDIR at that point) of every COPY/ADD from the build context."""
        result, workdir = [], "/"
        for keyword, rest in self.instructions:
            if keyword == "WORKDIR":
                workdir = str(Path(workdir) / self.expand(rest))
            if keyword not in ("COPY", "ADD"):
                continue
            tokens = shlex.split(rest)
            flags = [t for t in tokens if t.startswith("--")]
            if any(f.startswith("--from=") for f in flags):
                continue
            paths = [t for t in tokens if not t.startswith("--")]
            if paths and paths[0].startswith("["):
                paths = json.loads(rest[rest.index("[") :])
            result.append((paths[:-1], paths[-1], workdir))
        return result

    def run_commands(self) -> list[str]:
        """Every shell command of every RUN, split at && and ;."""
        commands = []
        for rest in self.all("RUN"):
            rest = re.sub(r"^(--\S+\s+)+", "", rest)  # RUN --mount=... flags
            commands += [c.strip() for c in re.split(r"&&|;", rest) if c.strip()]
        return commands

    def env(self) -> dict[str, str]:
        values = {}
        for rest in self.all("ENV"):
            for token in shlex.split(rest):
                key, _, value = token.partition("=")
                values[key] = value
        return values


@lru_cache
def _parse_dockerfile(path: Path) -> Dockerfile:
    return Dockerfile(path)


@pytest.fixture(params=sorted(DOCKERFILES))
def dockerfile(request) -> Dockerfile:
    return _parse_dockerfile(DOCKERFILES[request.param])


# --------------------------------------------------------------------------------------------
# the CLIs the files call
# --------------------------------------------------------------------------------------------
@lru_cache
def _evomerge_cli():
    import typer

    from evomerge.cli import app

    return typer.main.get_command(app)


@lru_cache
def _ray_cli():
    try:
        from ray.scripts.scripts import cli
    except ImportError:
        return None
    return cli


@lru_cache
def _optuna_dashboard_help() -> str | None:
    executable = Path(sys.executable).with_name("optuna-dashboard")
    if not executable.exists():
        return None
    return subprocess.run([str(executable), "--help"], capture_output=True, text=True, timeout=60, check=True).stdout


def _option_names(command) -> set[str]:
    return {
        name for param in command.params for name in (*param.opts, *param.secondary_opts) if name.startswith("-")
    } | {"--help"}


def _check_click_argv(root, argv: list[str], where: str) -> None:
    """argv (without the program name) names real (sub)commands and passes only their options.

    Groups are recognised by their `commands` mapping: typer vendors its own click, so its groups
    are not click.Group instances.
    """
    command, path, i = root, [], 0
    while isinstance(getattr(command, "commands", None), dict):
        while i < len(argv) and argv[i].startswith("-"):  # group options, e.g. evomerge --debug
            flag = argv[i].split("=", 1)[0]
            assert flag in _option_names(command), f"{where}: {' '.join(path) or 'root'} has no option {flag}"
            i += 1
        if i == len(argv):
            return
        name = argv[i]
        assert name in command.commands, (
            f"{where}: no subcommand {' '.join([*path, name])!r} (have: {sorted(command.commands)})"
        )
        command, path, i = command.commands[name], [*path, name], i + 1
    allowed = _option_names(command)
    for token in argv[i:]:
        if token == "--":
            break
        if token.startswith("-") and len(token) > 1 and not re.fullmatch(r"-\d.*", token):
            flag = token.split("=", 1)[0]
            assert flag in allowed, f"{where}: `{' '.join(path)}` has no option {flag} (it takes: {sorted(allowed)})"


# --------------------------------------------------------------------------------------------
# commands in docker/README.md (fenced code blocks and inline code)
# --------------------------------------------------------------------------------------------
def _readme_code_lines() -> list[str]:
    text = README.read_text()
    lines = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M):
        logical = ""
        for line in block.splitlines():
            if line.rstrip().endswith("\\"):
                logical += line.rstrip()[:-1] + " "
                continue
            lines.append(logical + line)
            logical = ""
    prose = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    lines += re.findall(r"`([^`\n]+)`", prose)
    return [re.sub(r"(^|\s)#.*$", "", line) for line in lines]  # drop comments


def _tokens_from(text: str) -> list[str]:
    """Tokens of one shell command starting at text, up to a separator (; && | &) or a closing quote."""
    try:
        tokens = shlex.split(text)
    except ValueError:  # the command sits inside quotes: stop at the quote
        tokens = shlex.split(re.split(r"[\"']", text, maxsplit=1)[0])
    out = []
    for token in tokens:
        if token in (";", "&&", "||", "|", "&") or token.endswith(";"):
            break
        out.append(token)
    return out


def readme_evomerge_commands() -> list[list[str]]:
    """Argument lists (after `evomerge`) of the commands README.md shows."""
    found = []
    for line in _readme_code_lines():
        compose_run = re.search(r"docker compose (?:-f \S+ )*run (?:--\S+ )*search\b(.*)", line)
        docker_run = re.search(r"docker run .*?\bevomerge:(?:cpu|cuda)\b(.*)", line)
        if compose_run:
            found.append(_tokens_from(compose_run.group(1)))
        elif docker_run:
            found.append(_tokens_from(docker_run.group(1)))
        for match in re.finditer(r"(?:^|[\s\"'])evomerge\s+(?=[a-z-])(.*)", line):
            found.append(_tokens_from(match.group(1)))
    return [argv for argv in found if argv]


def readme_ray_commands() -> list[list[str]]:
    """Argument lists (after `ray`) of the ray commands README.md shows."""
    found = []
    for line in _readme_code_lines():
        for match in re.finditer(r"(?:^|[\s\"'])ray\s+(?=[a-z])(.*)", line):
            argv = _tokens_from(match.group(1))
            if argv:
                found.append(argv)
    return found


def _script_commands(path: Path, program: str) -> list[list[str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    commands = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("#"):
            continue
        match = re.match(rf"(?:exec\s+)?{program}\s+(.*)", line)
        if match:
            commands.append(_tokens_from(match.group(1)))
    return commands


# ============================================================================================
# tests: compose
# ============================================================================================
def test_compose_files_parse():
    base, gpu = _raw(COMPOSE), _raw(COMPOSE_GPU)
    assert {"postgres", "ray-head", "ray-worker", "dashboard", "search"} <= set(base["services"])
    assert set(gpu["services"]) <= set(base["services"]), "the GPU override names a service compose.yml lacks"
    assert _raw(COMPOSE)["services"]["search"].get("profiles") == ["search"]


def test_build_contexts_and_dockerfiles_exist(compose):
    built = {name: _dockerfile_for(s) for name, s in compose["services"].items() if "build" in s}
    assert built, "no service builds our image"
    for name, dockerfile in built.items():
        build = compose["services"][name]["build"]
        context = (DOCKER / build["context"]).resolve()
        assert context == REPO, f"{name}: build context {context} should be the repository root"
        assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
        assert dockerfile in DOCKERFILES.values()
        assert compose["services"][name].get("image"), f"{name}: tag the built image (image:) so services share it"


def test_gpu_override_switches_every_evomerge_service_to_cuda_together():
    gpu = _config(COMPOSE, COMPOSE_GPU)
    built = {name: _dockerfile_for(s) for name, s in gpu["services"].items() if "build" in s}
    assert set(built.values()) == {DOCKERFILES["cuda"].resolve()}, (
        "mixed images: Ray needs the same Python on every node"
    )
    assert len({gpu["services"][name]["image"] for name in built}) == 1
    devices = gpu["services"]["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d.get("capabilities", []) for d in devices)
    cpu = _config(COMPOSE)
    assert {name for name, s in cpu["services"].items() if "build" in s} == set(built)
    assert set(_dockerfile_for(s) for s in cpu["services"].values() if "build" in s) == {DOCKERFILES["cpu"].resolve()}


def _bind_mounts(compose: dict):
    """(service, raw source, resolved source, target, read_only, mount) of every bind mount."""
    raw_services = _merge(_raw(COMPOSE), _raw(COMPOSE_GPU))["services"]
    for name, service in compose["services"].items():
        raw_volumes = raw_services[name].get("volumes", [])
        for raw, volume in zip(raw_volumes, service.get("volumes", [])):
            if isinstance(volume, str):
                parts = volume.split(":")
                source, target = parts[0], parts[1]
                read_only = len(parts) > 2 and "ro" in parts[2].split(",")
                raw_source = raw.split(":")[0]
                if not source.startswith((".", "/", "~")):
                    continue  # a named volume
            else:
                if volume.get("type") != "bind":
                    continue
                source, target, read_only, raw_source = (
                    volume["source"],
                    volume["target"],
                    volume.get("read_only", False),
                    raw["source"],
                )
            yield name, raw_source, source, target, read_only, volume


def test_bind_mount_sources(compose):
    readme = README.read_text()
    mounts = list(_bind_mounts(compose))
    targets = {m[3] for m in mounts}
    assert {"/models", "/work/space.yml"} <= targets
    for service, raw_source, source, target, read_only, volume in mounts:
        variables = re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", raw_source)
        if variables or target in USER_MOUNTS:  # yours (models, space file, exports): documented, not in the repo
            for text in (*variables, source, target):
                assert text in readme, (
                    f"{service}: user-provided mount {raw_source}:{target}: README.md does not mention {text!r}"
                )
            assert isinstance(volume, dict) and volume.get("bind", {}).get("create_host_path") is False, (
                f"{service}: {raw_source} should be long syntax with create_host_path: false, so a missing path "
                "is an error rather than an empty folder Docker creates"
            )
        else:
            assert (DOCKER / source).exists(), f"{service}: bind-mount source {source} does not exist in the repository"
        if target in ("/models", "/work/space.yml"):
            assert read_only, f"{service}: {target} should be mounted read-only"


def test_models_are_mounted_at_the_same_path_on_every_ray_node_and_the_driver(compose):
    for name in _ray_services(compose):
        targets = [m[3] for m in _bind_mounts(compose) if m[0] == name]
        assert "/models" in targets, f"{name}: every Ray node and the driver need the models at /models"


def test_published_ports_bind_to_loopback(compose):
    published = 0
    for name, service in compose["services"].items():
        assert service.get("network_mode") != "host", f"{name}: network_mode host would bypass the loopback binding"
        for port in service.get("ports", []):
            published += 1
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", f"{name}: port {port} is not bound to 127.0.0.1"
            else:
                assert str(port).startswith("127.0.0.1:"), f"{name}: published port {port!r} must start with 127.0.0.1:"
    assert published, "the dashboard should be published (on 127.0.0.1)"
    assert compose["services"]["dashboard"]["ports"] == ["127.0.0.1:8080:8080"]


def _postgres_urls(compose: dict) -> dict[str, str]:
    urls = {}
    for name, service in compose["services"].items():
        for token in _service_argv(service):
            if token.startswith("postgresql"):
                urls[name] = token
    return urls


def test_postgres_urls_match_the_postgres_service(compose):
    from sqlalchemy.engine import make_url

    postgres = compose["services"]["postgres"]
    env = _environment(postgres)
    assert postgres["image"].startswith("postgres:16")
    assert postgres.get("healthcheck"), "postgres needs a healthcheck for depends_on: service_healthy"
    assert any(str(v).split(":")[0] in (compose.get("volumes") or {}) for v in postgres.get("volumes", [])), (
        "postgres data in a named volume"
    )
    urls = _postgres_urls(compose)
    assert {"search", "dashboard"} <= set(urls), f"search and dashboard should both name the database: {urls}"
    assert _option(_service_argv(compose["services"]["search"]), "--storage") == urls["search"]
    example = yaml.safe_load(EXAMPLE_SPACE.read_text())["search"]["storage"]
    for where, url in {**urls, "space.example.yml": example}.items():
        parsed = make_url(url)
        assert parsed.drivername == "postgresql+psycopg", f"{where}: {url}"
        assert parsed.host == "postgres" and parsed.port in (None, 5432), (
            f"{where}: {url} should reach the postgres service"
        )
        assert parsed.username == env["POSTGRES_USER"], f"{where}: user {parsed.username} != POSTGRES_USER"
        assert parsed.password == env["POSTGRES_PASSWORD"], f"{where}: password differs from POSTGRES_PASSWORD"
        assert parsed.database == env["POSTGRES_DB"], f"{where}: database {parsed.database} != POSTGRES_DB"
    for name in ("search", "dashboard"):
        assert compose["services"][name]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_postgres_password_override_reaches_every_url():
    """POSTGRES_PASSWORD set in the environment changes the server and every client URL together."""
    from sqlalchemy.engine import make_url

    compose = _config(COMPOSE, env={"POSTGRES_PASSWORD": "s3cret"})
    assert _environment(compose["services"]["postgres"])["POSTGRES_PASSWORD"] == "s3cret"
    assert {make_url(u).password for u in _postgres_urls(compose).values()} == {"s3cret"}


def test_every_ray_process_sets_the_same_auth_mode(compose):
    ray_services = _ray_services(compose)
    assert {"ray-head", "ray-worker", "search"} <= set(ray_services)
    modes = {}
    for name, service in ray_services.items():
        env = _environment(service)
        assert "RAY_AUTH_MODE" in env, f"{name} runs Ray but does not set RAY_AUTH_MODE"
        modes[name] = env["RAY_AUTH_MODE"]
        assert env.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0", f"{name}: that setting forbids multi-node Ray"
    assert len(set(modes.values())) == 1, f"RAY_AUTH_MODE differs between Ray processes: {modes}"
    assert set(modes.values()) <= {"disabled", "token"}
    if "token" in modes.values():
        for name, service in ray_services.items():
            assert _environment(service).get("RAY_AUTH_TOKEN"), (
                f"{name}: token mode needs the same RAY_AUTH_TOKEN everywhere"
            )


def test_ray_topology(compose):
    services = compose["services"]
    head = _service_argv(services["ray-head"])
    worker = _service_argv(services["ray-worker"])
    assert head[:3] == ["ray", "start", "--head"] and "--block" in head
    assert _option(head, "--dashboard-host") == "127.0.0.1"
    head_address = f"ray-head:{_option(head, '--port')}"
    assert worker[:2] == ["ray", "start"] and "--block" in worker
    assert _option(worker, "--address") == head_address
    assert _environment(services["search"])["RAY_ADDRESS"] == head_address
    assert yaml.safe_load(EXAMPLE_SPACE.read_text())["ray"]["address"] == head_address
    assert services["search"]["depends_on"]["ray-head"]["condition"] == "service_healthy"
    assert services["ray-worker"]["depends_on"]["ray-head"]["condition"] == "service_healthy"
    assert services["ray-worker"].get("deploy", {}).get("replicas", 1) >= 1
    assert _option(head, "--num-cpus") is not None and _option(worker, "--num-cpus") is not None


def test_object_store_fits_in_shm(compose):
    """Ray's object store lives in /dev/shm: each Ray container's shm_size must hold it."""
    driver_default = int(re.search(r"OBJECT_STORE_BYTES:-(\d+)", DRIVER_SCRIPT.read_text()).group(1))
    for name, service in _ray_services(compose).items():
        assert "shm_size" in service, f"{name}: set shm_size (Docker's default /dev/shm is 64 MB)"
        store = _option(_service_argv(service), "--object-store-memory")
        store = int(store) if store else driver_default
        assert store <= _bytes(service["shm_size"]), f"{name}: object store {store} > shm_size {service['shm_size']}"


def test_search_service_runs_evomerge_run_on_the_space_file(compose):
    argv = _service_argv(compose["services"]["search"])
    assert argv[0] == "evomerge-driver" and argv[1:3] == ["run", "/work/space.yml"]


def test_compose_variables_are_documented():
    readme = README.read_text()
    variables = set()

    def collect(node):
        if isinstance(node, dict):
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)
        elif isinstance(node, str):
            variables.update(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", node))

    for path in (COMPOSE, COMPOSE_GPU):
        collect(_raw(path))  # parsed: comments do not count
    variables |= set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):-", DRIVER_SCRIPT.read_text()))
    missing = sorted(v for v in variables if v not in readme)
    assert not missing, f"docker/README.md does not mention {missing}"


# ============================================================================================
# tests: Dockerfiles
# ============================================================================================
def test_dockerfile_base_image(dockerfile):
    assert dockerfile.all("FROM"), f"{dockerfile.path.name}: no FROM"
    base = dockerfile.base_image
    if dockerfile.path.name == "Dockerfile":
        assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base), base
    else:
        assert re.fullmatch(r"nvidia/cuda:12\.\d+(\.\d+)?-(cudnn-)?runtime-ubuntu2[24]\.04", base), base
        assert re.search(r"\bpython3\.11 -m venv\b", " ".join(dockerfile.run_commands()))


def test_dockerfile_copy_sources_exist_and_pass_the_ignore_file(dockerfile):
    ignore = Path(f"{dockerfile.path}.dockerignore")
    assert ignore.is_file(), f"{ignore.name} missing: the build would upload .venv and the models"
    patterns = [line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*", "an allow-list: exclude everything, then re-include"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copies = dockerfile.copies()
    assert copies
    for sources, _, _ in copies:
        for source in sources:
            assert (REPO / source).exists(), f"{dockerfile.path.name}: COPY source {source} does not exist"
            assert source.rstrip("/") in allowed, f"{ignore.name} leaves out {source}, which the Dockerfile copies"
    copied = {source.rstrip("/") for sources, _, _ in copies for source in sources}
    assert {"pyproject.toml", "constraints.txt", "README.md", "evomerge", "tasks", "search_spaces"} <= copied


def _pip_installs(dockerfile: Dockerfile) -> list[str]:
    return [c for c in dockerfile.run_commands() if re.match(r"(python -m )?pip install\b", c)]


def test_dockerfile_pins_torch_and_uses_constraints(dockerfile):
    constraints = (REPO / "constraints.txt").read_text()
    assert re.search(rf"^torch=={re.escape(TORCH_VERSION)}$", constraints, re.M), (
        "constraints.txt and the Dockerfiles disagree on torch"
    )
    installs = _pip_installs(dockerfile)
    torch_installs = [c for c in installs if f"torch=={TORCH_VERSION}" in c.split()]
    assert torch_installs, f"{dockerfile.path.name}: no `pip install torch=={TORCH_VERSION}`"
    index = dockerfile.expand(
        _option(shlex.split(torch_installs[0]), "--extra-index-url")
        or _option(shlex.split(torch_installs[0]), "--index-url")
        or ""
    )
    expected = "/whl/cpu" if dockerfile.path.name == "Dockerfile" else "/whl/cu12"
    assert expected in index, f"{dockerfile.path.name}: torch from {index!r}"
    for command in installs:
        assert "-c constraints.txt" in command, f"{dockerfile.path.name}: `{command}` without -c constraints.txt"
        assert not re.search(r"(^|\s)(-e|--editable)\s", command), f"{dockerfile.path.name}: editable install"
    project = [c for c in installs if re.search(r"""\s["']?\.(\[[\w,]+\])?["']?$""", c)]
    assert project, f"{dockerfile.path.name}: the project itself is not pip-installed"
    assert "[postgres]" in project[-1], "the image talks to postgresql+psycopg://: install the postgres extra (psycopg)"


def test_dockerfile_entrypoint_user_and_environment(dockerfile):
    assert dockerfile.entrypoint == ["evomerge"], dockerfile.entrypoint
    users = dockerfile.all("USER")
    assert users, f"{dockerfile.path.name}: runs as root (no USER)"
    user = dockerfile.expand(users[-1]).split(":")[0]
    assert user.isdigit() and user != "0", (
        f"USER {user}: numeric and non-root (Kubernetes runAsNonRoot checks the number)"
    )
    env = dockerfile.env()
    for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}.items():
        assert env.get(key) == value, f"{dockerfile.path.name}: ENV {key}={value} missing"
    assert "/opt/venv/bin" in env.get("PATH", "")


def test_cpu_and_cuda_dockerfiles_install_the_same_way():
    cpu, cuda = (_parse_dockerfile(p) for p in DOCKERFILES.values())
    assert cpu.copies() == cuda.copies()

    def normalised(df):
        return [re.sub(r"--(extra-)?index-url \S+ ", "", c) for c in _pip_installs(df)]

    assert normalised(cpu) == normalised(cuda)
    assert cpu.entrypoint == cuda.entrypoint and cpu.cmd == cuda.cmd and cpu.all("USER") == cuda.all("USER")
    assert cpu.env() == cuda.env()


def test_driver_script_is_valid_sh():
    assert DRIVER_SCRIPT.stat().st_mode & 0o111, "evomerge-driver.sh should be executable"
    subprocess.run(["sh", "-n", str(DRIVER_SCRIPT)], check=True)
    text = DRIVER_SCRIPT.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert 'exec evomerge "$@"' in text
    starts = _script_commands(DRIVER_SCRIPT, "ray")
    assert starts and all("--num-cpus=0" in argv and "--num-gpus=0" in argv for argv in starts), (
        "the driver node must offer no resources"
    )
    copied = [
        dest
        for sources, dest, _ in _parse_dockerfile(DOCKERFILES["cpu"]).copies()
        if "docker/evomerge-driver.sh" in sources
    ]
    assert copied and Path(copied[0]).name == "evomerge-driver", "the image installs the script as evomerge-driver"


# ============================================================================================
# tests: every command exists, with the flags passed
# ============================================================================================
def _evomerge_argvs() -> list[tuple[str, list[str]]]:
    found = []
    for label, paths in CONFIGS.items():
        for name, service in _config(*paths)["services"].items():
            argv = _service_argv(service)
            if argv and argv[0] in ("evomerge", "evomerge-driver"):
                found.append((f"compose[{label}] {name}", argv[1:]))
    for path in DOCKERFILES.values():
        found.append((f"{path.name} CMD", _parse_dockerfile(path).cmd))
    found += [("evomerge-driver.sh", argv) for argv in _script_commands(DRIVER_SCRIPT, "evomerge")]
    found += [("docker/README.md", argv) for argv in readme_evomerge_commands()]
    return found


def test_evomerge_commands_and_options_exist():
    root = _evomerge_cli()
    commands = _evomerge_argvs()
    assert any(where.startswith("docker/README.md") for where, _ in commands)
    subcommands = set()
    for where, argv in commands:
        if argv == ["$@"]:  # evomerge-driver.sh passes its arguments through
            continue
        _check_click_argv(root, argv, where)
        subcommands.add(argv[0])
    assert {"run", "front", "export", "validate", "demo"} <= subcommands, subcommands


def _ray_argvs() -> list[tuple[str, list[str]]]:
    found = []
    for label, paths in CONFIGS.items():
        for name, service in _config(*paths)["services"].items():
            argv = _service_argv(service)
            if argv and argv[0] == "ray":
                found.append((f"compose[{label}] {name}", argv[1:]))
            test = _argv(service.get("healthcheck", {}).get("test"))
            if test[:2] == ["CMD", "ray"]:
                found.append((f"compose[{label}] {name} healthcheck", test[2:]))
    found += [("evomerge-driver.sh", argv) for argv in _script_commands(DRIVER_SCRIPT, "ray")]
    found += [("docker/README.md", argv) for argv in readme_ray_commands()]
    return found


def test_ray_commands_and_flags_exist():
    cli = _ray_cli()
    if cli is None:
        pytest.skip("ray's CLI is not installed")
    commands = _ray_argvs()
    used = {argv[0] for _, argv in commands}
    assert {"start", "health-check", "status", "up", "exec", "job"} <= used, used
    for where, argv in commands:
        _check_click_argv(cli, argv, where)


def test_optuna_dashboard_flags_exist(compose):
    help_text = _optuna_dashboard_help()
    if help_text is None:
        pytest.skip("optuna-dashboard is not installed")
    argv = _service_argv(compose["services"]["dashboard"])
    assert argv[0] == "optuna-dashboard"
    flags = [token.split("=", 1)[0] for token in argv[1:] if token.startswith("-")]
    assert {"--host", "--port"} <= set(flags)
    for flag in flags:
        assert re.search(rf"(^|[\s,\[]){re.escape(flag)}\b", help_text), f"optuna-dashboard has no option {flag}"
    assert _option(argv, "--host") == "0.0.0.0" and _option(argv, "--port") == "8080", (
        "inside the container; published on 127.0.0.1"
    )


# ============================================================================================
# tests: README and the example space file
# ============================================================================================
def test_readme_covers_the_workflow():
    readme = README.read_text()
    for text in (
        "docker compose build",
        "docker compose up -d postgres ray-head ray-worker dashboard",
        "--scale ray-worker=",
        "docker compose run --rm search",
        "http://127.0.0.1:8080",
        "search export",
        "search.storage",
        "search.workers",
        "ray.address",
        "RAY_ADDRESS",
        "RAY_AUTH_MODE",
        "compose.gpu.yml",
        "device: cuda",
        "KubeRay",
        "RayCluster",
        "RayJob",
        "ray job submit",
        "ray up",
        "shared filesystem",
        "Dockerfile.dockerignore",
    ):
        assert text in readme, f"docker/README.md does not cover {text!r}"


def _image_path_to_repo(container_path: str) -> Path | None:
    for sources, dest, workdir in _parse_dockerfile(DOCKERFILES["cpu"]).copies():
        if len(sources) != 1 or not sources[0].endswith("/"):
            continue  # folders only: `COPY tasks/ tasks/` puts tasks/'s content at WORKDIR/tasks
        target = str(Path(workdir) / dest)
        if container_path == target or container_path.startswith(target + "/"):
            return REPO / sources[0] / container_path[len(target) :].lstrip("/")
    return None


def test_example_space_file_is_valid_for_the_stack():
    from evomerge.config.space import load_space

    space = load_space(EXAMPLE_SPACE, check_paths=False)  # models are mounted at run time
    for model in [*space.models, space.base_model]:
        assert str(model.path).startswith("/models/"), f"{model.name}: {model.path} is not under the /models mount"
    assert space.search.workers >= 2
    assert space.ray.address == "ray-head:6379"
    tasks = {o.task for o in space.objectives} | {o.selection_task for o in space.objectives if o.selection_task}
    for include in space.eval.include_paths:
        repo_dir = _image_path_to_repo(str(include))
        assert repo_dir is not None and repo_dir.is_dir(), (
            f"{include} is not a folder the image copies from the repository"
        )
        defined = set(re.findall(r"^task:\s*(\S+)", "\n".join(p.read_text() for p in repo_dir.glob("*.yaml")), re.M))
        assert tasks <= defined, f"tasks {sorted(tasks - defined)} are not defined under {include}"
