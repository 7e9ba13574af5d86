"""Packaging: what the wheel carries, honest dependencies, one version, the cluster image's pins.

The slow test builds the wheel and runs `segsearch demo` from it in a fresh virtual environment
layered on this one (its site-packages after the new one's, so the installed torch/Ray/MLflow are
reused without a copy and the repository's segsearch stays out of sight).
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import re
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

import segsearch

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SPACES = sorted(path.name for path in (ROOT / "search_spaces").glob("*.yaml"))


def requirements() -> list[Requirement]:
    return [Requirement(line) for line in PYPROJECT["project"]["dependencies"]]


def imported_modules() -> set[str]:
    """Top-level names of every module the package imports (lazy imports in functions included)."""
    names: set[str] = set()
    for path in (ROOT / "segsearch").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"segsearch"}


def import_names(distribution: str) -> set[str]:
    """The top-level modules an installed distribution provides (pyyaml → yaml, pillow → PIL)."""
    wanted = canonicalize_name(distribution)
    return {
        module
        for module, dists in md.packages_distributions().items()
        if wanted in {canonicalize_name(dist) for dist in dists}
    }


def requirements_of(requirement: Requirement) -> list[Requirement]:
    """What an installed requirement itself requires, with the extras asked of it."""
    found = []
    for line in md.requires(requirement.name) or []:
        sub = Requirement(line)
        if sub.marker is None or any(
            sub.marker.evaluate({"extra": extra}) for extra in requirement.extras or {""}
        ):
            found.append(sub)
    return found


def test_every_required_dependency_is_imported_by_the_package() -> None:
    imported = imported_modules()
    unused = [req.name for req in requirements() if not import_names(req.name) & imported]
    assert not unused, f"required in pyproject.toml but never imported by segsearch/: {unused}"


def test_every_imported_module_is_declared_or_comes_with_a_declared_dependency() -> None:
    """What segsearch imports is required in pyproject, or (exception types such as aiohttp's,
    pydantic_core's) required by a declared dependency with the extras segsearch asks for."""
    declared = {canonicalize_name(req.name) for req in requirements()}
    carried = {
        canonicalize_name(sub.name) for req in requirements() for sub in requirements_of(req)
    }
    providers = md.packages_distributions()
    undeclared = {
        module: providers.get(module)
        for module in imported_modules()
        if not {canonicalize_name(d) for d in providers.get(module, [])} & (declared | carried)
    }
    assert not undeclared, f"imported by segsearch/ but not required: {undeclared}"


def test_the_installed_releases_meet_the_bounds() -> None:
    """CI tests what is installed: the bounds must admit it, and what the extras asked of it need
    (so the wheel test can install with --no-deps)."""
    for req in requirements():
        assert req.specifier.contains(md.version(req.name), prereleases=True), req
        for sub in requirements_of(req):
            installed = md.version(sub.name)
            assert sub.specifier.contains(installed, prereleases=True), (req, sub, installed)


def test_the_import_check_sees_lazy_imports_and_names_that_differ() -> None:
    assert {"yaml", "PIL", "aiohttp"} <= imported_modules()  # aiohttp: inside jobs.follow only
    assert "yaml" in import_names("pyyaml") and "PIL" in import_names("pillow")
    assert import_names("boto3") & imported_modules()  # inside manifest.s3_etag only


def test_version_has_one_source() -> None:
    """pyproject reads segsearch.__version__ (the slow test checks the wheel and --version)."""
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "segsearch.__version__"
    }
    assert Version(segsearch.__version__)


def test_package_list_covers_every_package_folder_and_the_shipped_spaces() -> None:
    settings = PYPROJECT["tool"]["setuptools"]
    folders = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "segsearch").rglob("__init__.py")
    }
    assert set(settings["packages"]) == folders | {"segsearch.search_spaces"}
    assert settings["package-dir"] == {"segsearch.search_spaces": "search_spaces"}
    assert settings["package-data"]["segsearch.search_spaces"] == ["*.yaml"]
    assert (ROOT / "segsearch" / "py.typed").is_file() and "demo.yaml" in SPACES


def dockerfile_args() -> dict[str, str]:
    text = (ROOT / "Dockerfile").read_text()
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.MULTILINE))


def test_dockerfile_pins_what_pyproject_and_ci_use() -> None:
    """The image's Ray, torch and Python are the ones the package allows and CI installs."""
    args = dockerfile_args()
    specs = {canonicalize_name(req.name): req.specifier for req in requirements()}
    assert Version(args["RAY_VERSION"]) in specs["ray"]
    assert Version(args["TORCH_VERSION"]) in specs["torch"]
    assert f"torch=={args['TORCH_VERSION']}" in (ROOT / ".ci" / "run").read_text()
    major, minor = re.fullmatch(r"py(\d)(\d+)", args["PYTHON_TAG"]).groups()
    assert Version(f"{major}.{minor}") in SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert (int(major), int(minor)) == sys.version_info[:2]


@pytest.mark.slow
def test_wheel_runs_the_demo_from_an_unrelated_directory(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path / "dist")
    assert {f"segsearch/search_spaces/{name}" for name in SPACES} | {"segsearch/py.typed"} <= set(
        zipfile.ZipFile(wheel).namelist()
    )
    python = layered_venv(tmp_path / "venv")
    # No index: every dependency must be satisfied by what CI installed, or the bounds are wrong.
    pip = [sys.executable, "-m", "pip", "--python", python]
    installed = run([*pip, "install", "--no-index", str(wheel)], tmp_path)
    assert re.search(r"^Successfully installed segsearch-\S+$", installed, flags=re.MULTILINE)
    where = run([python, "-c", "import segsearch; print(segsearch.__file__)"], tmp_path)
    assert Path(where.strip()).is_relative_to(tmp_path / "venv")
    cli = Path(python).parent / "segsearch"
    assert segsearch.__version__ in run([cli, "--version"], tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    output = run([cli, "demo", "--trials", "1", "--epochs", "1"], work)
    assert re.search(r"^best trial \S+: \w+=\d\.\d{4}", output, flags=re.MULTILINE), output


def build_wheel(dist: Path) -> Path:
    """`pip wheel` with this environment's setuptools (no build isolation: no index needed)."""
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    run([*command, "-w", str(dist), str(ROOT)], ROOT)
    (wheel,) = dist.glob(f"segsearch-{segsearch.__version__}-*.whl")
    return wheel


def layered_venv(path: Path) -> str:
    """A new venv, without pip or setuptools of its own, that sees this environment's
    site-packages after its own (plain path entries: this environment's .pth files, such as an
    editable segsearch's finder, are not run)."""
    venv.EnvBuilder(with_pip=False).create(path)
    python = path / "bin" / "python"
    own = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], path)
    layers = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (Path(own.strip()) / "_segsearch_test_layer.pth").write_text("\n".join(layers) + "\n")
    return str(python)


def run(command: list, cwd: Path) -> str:
    """Run with this repository off the path; return stdout+stderr, failing with them shown."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    done = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{output[-4000:]}"
    return output
