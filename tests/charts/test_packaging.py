"""Packaging: the Dockerfile, .dockerignore and Tiltfile agree with each other and with the
chart; pyproject.toml declares what the code imports; requirements.txt pins the runtime set and
requirements-dev.txt the test tools on top; the image and scripts/setup.sh install the right one.
Static checks: there is no Docker engine or cluster in the test environment."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ImportError:                      # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
TILTFILE = (ROOT / "Tiltfile").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUP_SH = (ROOT / "scripts" / "setup.sh").read_text()

# Imports of services/shardline that no dependency provides, on purpose, and the files that may
# make them: "local" ones sit inside a function (it runs only where the feature is used) and
# fall back when missing; a "module" one is a module only ever imported under
# `try: ... except ImportError` (backends/gpu/engine.py falls back to its PyTorch attention).
KNOWN_OPTIONAL = {
    # CUDA builds of torch bring Triton; the transforms check find_spec("triton")
    "triton": {"services/shardline/transforms/triton_int8.py": "local",
               "services/shardline/transforms/triton_dequant.py": "local",
               "services/shardline/backends/gpu/triton_attention.py": "module"},
    # the [otlp-http] extra; common/telemetry.py falls back to the gRPC exporter on ImportError
    "opentelemetry.exporter.otlp.proto.http": {"services/shardline/common/telemetry.py": "local"},
}
# Declared dependencies that services/shardline does not import itself: other packages load them.
INDIRECT = {
    "gguf": "transformers reads .gguf files (the default model) with it",
    "sentencepiece": "transformers loads SentencePiece tokenizers (tokenizer.model) with it",
    "opentelemetry-proto": "the OTLP exporter's messages; kept in step with the other OTel pins",
    "numpy": "Tensor.numpy() in common/tensors.py needs it, and torch does not depend on it",
}
# Never in requirements.txt (the image): test runners, schema checkers, code generators.
TEST_TOOLS = re.compile(r"^(pytest.*|hypothesis|coverage|kubernetes-validate|grpcio-tools|mypy|ruff)$")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def req_name(req: str) -> str:
    return norm(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req.strip()).group(0))


def read_requirements(path: Path) -> tuple[list[str], dict[str, str]]:
    """(-r includes, {normalized name: pinned version}) of a requirements file; every
    requirement must be an exact `name==version` pin."""
    includes, pins = [], {}
    for line in path.read_text().splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-r "):
            includes.append(line[3:].strip())
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][A-Za-z0-9.+!-]*)", line)
        assert m, f"{path.name}: {line!r} is not an exact name==version pin"
        assert norm(m.group(1)) not in pins, f"{path.name}: {m.group(1)} pinned twice"
        pins[norm(m.group(1))] = m.group(2)
    return includes, pins


def runtime_deps() -> dict[str, str]:
    """pyproject.toml's [project] dependencies: {normalized name: requirement}."""
    return {req_name(r): r for r in PYPROJECT["project"]["dependencies"]}


def extra_deps(*extras: str) -> dict[str, str]:
    opt = PYPROJECT["project"]["optional-dependencies"]
    return {req_name(r): r for e in extras for r in opt[e]}


@lru_cache(maxsize=1)
def module_owners() -> dict[str, set[str]]:
    """Importable module name -> the installed distributions whose files provide it (namespace
    packages such as `opentelemetry` or `google` have several)."""
    owners: dict[str, set[str]] = {}
    for dist in importlib.metadata.distributions():
        name = norm(dist.metadata["Name"])
        for f in dist.files or ():
            parts = f.parts
            if not parts or parts[0] == ".." or ".dist-info" in parts[0] or ".data" in parts[0]:
                continue
            stem = parts[-1].split(".")[0]
            if not parts[-1].endswith((".py", ".so", ".pyd")) or not stem.isidentifier():
                continue
            mod = list(parts[:-1]) + ([] if stem == "__init__" else [stem])
            for i in range(1, len(mod) + 1):
                owners.setdefault(".".join(mod[:i]), set()).add(name)
    return owners


def third_party_imports() -> list[tuple[str, str, int, bool]]:
    """(module, file, line, inside a function) of every absolute import in services/shardline
    that is neither the standard library nor shardline itself. `from a import b` counts as a.b
    when a.b is a module, else as a."""
    pkg = ROOT / "services" / "shardline"
    found = []
    for path in sorted(pkg.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        in_function: set[ast.AST] = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                in_function.update(ast.walk(fn))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in module_owners()
                        else node.module for a in node.names]
            else:
                continue
            for mod in mods:
                top = mod.split(".")[0]
                if top in sys.stdlib_module_names or top == "shardline":
                    continue
                found.append((mod, str(path.relative_to(ROOT)), node.lineno, node in in_function))
    return found


def owners_of(mod: str) -> set[str]:
    """The distributions providing mod: those of its longest installed prefix."""
    parts = mod.split(".")
    for i in range(len(parts), 0, -1):
        owners = module_owners().get(".".join(parts[:i]))
        if owners:
            return owners
    return set()


def stages() -> dict[str, str]:
    """Dockerfile stage name -> its instructions."""
    parts = re.split(r"^FROM\s+", DOCKERFILE, flags=re.M)[1:]
    return {re.match(r"\S+\s+AS\s+(\S+)", p).group(1): p for p in parts}


def test_dockerfile_one_image_non_root_cpu_by_default():
    assert re.search(r"^ARG BASE=python:3\.11-slim$", DOCKERFILE, flags=re.M)
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cpu$", DOCKERFILE, flags=re.M)
    s = stages()
    assert list(s)[-1] == "runtime", "the default target is the runtime image"
    assert set(s) == {"build", "runtime-base", "dev", "runtime"}
    build = s["build"]
    # torch from TORCH_INDEX first, at the requirements.txt pin, then requirements, then the project
    order = [build.index('--index-url "${TORCH_INDEX}"'), build.index("pip install -r requirements.txt"),
             build.index("pip install --no-deps .")]
    assert order == sorted(order)
    base = s["runtime-base"]
    assert 'ENTRYPOINT ["shardline"]' in base
    assert "SHARDLINE_CACHE=/cache" in base and "HOME=/home/shardline" in base
    users = re.findall(r"^USER\s+(\S+)$", DOCKERFILE, flags=re.M)
    assert users[-1] == "10001:10001" and "USER 10001:10001" in s["dev"]
    chart = yaml.safe_load((ROOT / "charts/shardline/values.yaml").read_text())
    assert chart["securityContext"]["runAsUser"] == 10001
    assert chart["cache"]["mountPath"] == "/cache"


def test_dockerignore_keeps_the_context_small():
    lines = [l for l in (ROOT / ".dockerignore").read_text().splitlines() if l and not l.startswith("#")]
    assert lines[0] == "*", "allow-list: everything is excluded unless re-included"
    included = {l[1:].rstrip("/") for l in lines if l.startswith("!")}
    assert included == {"requirements.txt", "pyproject.toml", "README.md", "services"}
    assert "**/__pycache__" in lines


def test_tiltfile(helm):
    ast.parse(TILTFILE)                         # Starlark is a Python subset
    assert "target='dev'" in TILTFILE
    assert "sync('services', '/app/services')" in TILTFILE
    assert "ENV PYTHONPATH=/app/services" in stages()["dev"]
    assert "values=['charts/shardline/values-dev.yaml']" in TILTFILE
    assert (ROOT / "charts/shardline/values-dev.yaml").is_file()
    # the resources it names are the workloads the chart renders for its release
    release = re.search(r"^RELEASE = '([^']+)'", TILTFILE, flags=re.M).group(1)
    out = subprocess.run([helm, "template", release, str(ROOT / "charts/shardline"),
                          "-f", str(ROOT / "charts/shardline/values-dev.yaml")],
                         capture_output=True, text=True, check=True).stdout
    workloads = {d["metadata"]["name"] for d in yaml.safe_load_all(out)
                 if d and d["kind"] in ("Deployment", "StatefulSet")}
    named = set(re.findall(r"k8s_resource\(\s*'([^']+)'", TILTFILE))
    assert named == workloads
    assert "port_forwards=['50051:50051']" in TILTFILE
    image = yaml.safe_load((ROOT / "charts/shardline/values-dev.yaml").read_text())["image"]["repository"]
    assert re.search(rf"docker_build_with_restart\(\s*'{image}'", TILTFILE)


# -- dependencies ------------------------------------------------------------------------------
def test_every_third_party_import_is_declared():
    declared = set(runtime_deps())
    missing, optional_at_top = [], []
    for mod, path, line, local in third_party_imports():
        optional = next((o for o in KNOWN_OPTIONAL if mod == o or mod.startswith(o + ".")), None)
        if optional is not None:
            where = KNOWN_OPTIONAL[optional].get(path)
            if where is None or (where == "local" and not local):
                optional_at_top.append(f"{path}:{line} {mod}")
            continue
        owners = owners_of(mod)
        if not owners & declared:
            missing.append(f"{path}:{line} {mod} (installed from: {sorted(owners) or 'nothing'})")
    assert not missing, "imported but not in pyproject.toml [project] dependencies:\n" + \
        "\n".join(missing)
    assert not optional_at_top, "optional imports must stay function-local, where expected:\n" + \
        "\n".join(optional_at_top)


def test_every_declared_dependency_is_used():
    imported = set()
    for mod, *_ in third_party_imports():
        imported |= owners_of(mod)
    unused = set(runtime_deps()) - imported - set(INDIRECT)
    assert not unused, f"declared but never imported (drop them, or say why in INDIRECT): {unused}"
    assert not set(INDIRECT) - set(runtime_deps())


def test_test_tools_are_extras_not_dependencies():
    opt = PYPROJECT["project"]["optional-dependencies"]
    assert {"test", "charts", "dev"} <= set(opt)
    assert opt["dev"] == ["shardline[test,charts]"]
    for name in runtime_deps():
        assert not TEST_TOOLS.match(name), f"{name} is a test tool: it belongs in an extra"
    assert {"pytest", "pytest-timeout", "grpcio-tools"} <= set(extra_deps("test"))
    assert "kubernetes-validate" in extra_deps("charts")
    # every third-party module the tests and scripts import comes from the runtime set or an extra
    have = set(runtime_deps()) | set(extra_deps("test", "charts"))
    for root in ("tests", "scripts"):
        for path in (ROOT / root).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0
                         and node.module else [])
                for mod in names:
                    if mod.split(".")[0] in sys.stdlib_module_names | {"shardline", "tests"}:
                        continue
                    assert owners_of(mod) & have, f"{path.relative_to(ROOT)}: {mod} is not declared"


def test_requirements_pin_runtime_and_dev_apart():
    first = (ROOT / "requirements.txt").read_text().splitlines()[0]
    assert first == "torch==2.13.0", "torch is pinned first (an open torch range pulls a CUDA build)"
    includes, runtime = read_requirements(ROOT / "requirements.txt")
    assert not includes
    assert set(runtime) == set(runtime_deps()), "requirements.txt pins exactly the runtime deps"
    assert not [n for n in runtime if TEST_TOOLS.match(n)]
    assert not set(runtime) & set(extra_deps("test", "charts"))
    includes, dev = read_requirements(ROOT / "requirements-dev.txt")
    assert includes == ["requirements.txt"]
    assert set(dev) == set(extra_deps("test", "charts")), "requirements-dev.txt pins the extras"


def test_pins_satisfy_pyproject_and_are_installed():
    specifiers = pytest.importorskip("packaging.specifiers")
    version = pytest.importorskip("packaging.version")
    wanted = {**runtime_deps(), **extra_deps("test", "charts")}
    pins = {**read_requirements(ROOT / "requirements.txt")[1],
            **read_requirements(ROOT / "requirements-dev.txt")[1]}
    stale = []
    for name, pin in pins.items():
        spec = specifiers.SpecifierSet(wanted[name][len(re.match(r"[A-Za-z0-9._-]*", wanted[name])
                                                        .group(0)):].split(";")[0].strip())
        assert spec.contains(pin, prereleases=True), f"{name}=={pin} is outside {wanted[name]}"
        try:
            have = version.Version(importlib.metadata.version(name)).base_version
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have != version.Version(pin).base_version:     # torch 2.13.0+cpu is 2.13.0
            stale.append(f"{name}: pinned {pin}, installed {have}")
    assert not stale, "the environment differs from the pins (run scripts/setup.sh):\n" + \
        "\n".join(stale)


def test_generated_code_versions_are_declared():
    """The committed *_pb2.py refuse an older protobuf runtime, and *_pb2_grpc.py an older grpcio,
    than the grpcio-tools that made them: pyproject.toml's lower bounds say so."""
    version = pytest.importorskip("packaging.version")
    v1 = ROOT / "services" / "shardline" / "v1"
    gen = re.search(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,"
                    r"\s*(\d+),\s*(\d+),\s*(\d+),", (v1 / "common_pb2.py").read_text())
    protobuf_gen = version.Version(".".join(gen.groups()))
    grpc_gen = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'",
                         (v1 / "generate_pb2_grpc.py").read_text()).group(1)

    def lower_bound(name: str):
        m = re.search(r">=\s*([0-9][0-9.]*)", runtime_deps()[name])
        assert m, f"{name} needs a lower bound"
        return version.Version(m.group(1))

    assert lower_bound("protobuf") >= protobuf_gen
    assert f"<{protobuf_gen.major + 1}" in runtime_deps()["protobuf"].replace(" ", "")
    assert lower_bound("grpcio") >= version.Version(grpc_gen)
    assert read_requirements(ROOT / "requirements-dev.txt")[1]["grpcio-tools"] == grpc_gen, \
        "the pinned grpcio-tools is the one that generated services/shardline/v1"


def test_image_installs_runtime_requirements_only():
    instructions = "\n".join(l for l in DOCKERFILE.splitlines() if not l.lstrip().startswith("#"))
    assert "requirements-dev" not in instructions
    assert not re.search(r"pytest|\[(dev|test|charts)\]", instructions)
    assert re.findall(r"pip install (?:-\S+ )*-r (\S+)", instructions) == ["requirements.txt"]
    copied = re.findall(r"^COPY\s+(?!--from)(.+?)\s+\S+$", instructions, flags=re.M)
    assert "requirements.txt" in copied and not any("requirements-dev" in c for c in copied)
    build = stages()["build"]
    assert build.index("pip install --no-deps .") < build.index("&& pip check"), \
        "pip check: requirements.txt covers what pyproject.toml declares"


def test_setup_script_installs_dev_set_and_hashes_every_input():
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "setup.sh")]).returncode == 0
    inputs = re.search(r"^inputs=\(([^)]*)\)", SETUP_SH, flags=re.M).group(1).split()
    assert re.search(r'want=\$\(cat "\$\{inputs\[@\]\}" \| sha256sum', SETUP_SH)
    installed = re.findall(r"pip install (?:-\S+ )*-r (\S+)", SETUP_SH)
    assert installed == ["requirements-dev.txt"]
    # every requirements file read, with its -r includes, and pyproject.toml (pip install -e .)
    todo, read = list(installed), set()
    while todo:
        f = todo.pop()
        read.add(f)
        todo += [i for i in read_requirements(ROOT / f)[0] if i not in read]
    assert read | {"pyproject.toml"} <= set(inputs), f"the stamp hash misses {read - set(inputs)}"
    torch_step = SETUP_SH.index("pip install -q \"$(grep '^torch==' requirements.txt)\"")
    assert torch_step < SETUP_SH.index("-r requirements-dev.txt"), "torch (CPU) is installed first"
