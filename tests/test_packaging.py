"""Packaging (pyproject.toml): metadata, extras, console scripts, checked as a user installs.

The install test makes a fresh venv that also sees this environment's site-packages through a
.pth file (so torch and every dependency are the ones already installed and nothing is
downloaded), installs a copy of the repository non-editable with
``pip install --no-index --no-build-isolation ".[all]"`` (``--no-index``: the installed
environment must satisfy ".[all]" as it is, and pip can fetch nothing, torch least of all), then
runs ``stratopt-train``, ``stratopt-study`` and ``stratopt-data --help`` from outside the
repository. About 15 s on an idle 2-core machine.
"""
from __future__ import annotations

import ast
import importlib.metadata as md
import json
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
SELF = "stratopt-ds"
SCRIPTS = {  # console script -> words its --help must show (subcommands, options)
    "stratopt-train": ["--optimizer", "--preset", "--data", "--deepspeed_config", "--resume"],
    "stratopt-study": ["check", "run", "report"],
    "stratopt-data": ["build", "info"],
}
# Imports that need a distribution other than the one their module name says.
IMPLIED = {"torch.utils.tensorboard": "tensorboard"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def req_name(req: str) -> str:
    return norm(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1))


def extra_names(extra: str, seen: frozenset = frozenset()) -> set[str]:
    """Distribution names an extra brings, following ``stratopt-ds[...]`` self-references."""
    names = set()
    for req in PROJECT["optional-dependencies"][extra]:
        if req_name(req) == SELF:
            for sub in re.search(r"\[(.*)\]", req).group(1).split(","):
                if sub.strip() not in seen:
                    names |= extra_names(sub.strip(), seen | {extra})
        else:
            names.add(req_name(req))
    return names


CORE = {req_name(r) for r in PROJECT["dependencies"]}


# ------------------------------------------------------------------------------------------------
# Static checks of pyproject.toml


def test_version_comes_from_the_package():
    assert "version" in PROJECT["dynamic"] and "version" not in PROJECT
    attr = PYPROJECT["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "stratopt_ds.__version__"
    source = (ROOT / "stratopt_ds" / "__init__.py").read_text()
    assert re.search(r'^__version__ = "\d+\.\d+\.\d+"$', source, re.M)  # read statically


def test_torch_is_a_floor_never_a_build_requirement_nor_a_pin():
    """An installed torch (CPU or CUDA build, any version >= the floor) must satisfy every
    requirement, so that pip never replaces it; building must never fetch it."""
    assert not any(req_name(r) == "torch" for r in PYPROJECT["build-system"]["requires"])
    torch_reqs = [r for r in PROJECT["dependencies"] if req_name(r) == "torch"]
    assert len(torch_reqs) == 1
    spec = torch_reqs[0][len("torch"):].strip()
    assert re.fullmatch(r">=\s*[\d.]+", spec), spec
    for extra in PROJECT["optional-dependencies"]:
        assert "torch" not in extra_names(extra), extra
    txt = (ROOT / "requirements.txt").read_text().splitlines()
    assert not any(req_name(line) == "torch" for line in txt if line.strip() and line[0] != "#")


def test_extras_train_study_all():
    extras = PROJECT["optional-dependencies"]
    assert {"train", "study", "all"} <= set(extras)
    assert {"deepspeed", "transformers", "datasets", "tokenizers", "tensorboard"} <= extra_names("train")
    # the study harness runs stratopt-train processes, so it brings everything train needs
    assert {"pyyaml", "scipy", "statsmodels", "matplotlib"} | extra_names("train") <= extra_names("study")
    everything = set().union(*(extra_names(e) for e in extras if e != "all"))
    assert extra_names("all") == everything


def test_console_scripts_point_at_each_modules_cli():
    scripts = PROJECT["scripts"]
    assert scripts == {"stratopt-train": "stratopt_ds.train:cli",
                       "stratopt-study": "stratopt_ds.study.__main__:main",
                       "stratopt-data": "stratopt_ds.data.__main__:main"}
    for target in scripts.values():  # the function exists (read, not imported)
        module, func = target.split(":")
        path = ROOT / Path(*module.split("."))
        path = path.with_suffix(".py") if path.with_suffix(".py").is_file() else path / "__init__.py"
        tree = ast.parse(path.read_text())
        assert any(isinstance(n, ast.FunctionDef) and n.name == func for n in tree.body), target


def test_requirements_txt_lists_every_dependency():
    """`make setup` installs requirements.txt, then the package with --no-deps: it must name
    everything ".[all]" needs (torch aside, installed before)."""
    listed = {req_name(line) for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.lstrip().startswith(("#", "-"))}
    missing = (CORE | extra_names("all")) - {"torch"} - listed
    assert not missing, f"in pyproject.toml but not in requirements.txt: {sorted(missing)}"


def imported_distributions(path: Path, to_dist: dict) -> set[str]:
    """Distributions (normalised names) that a module's imports need, top-level or in functions."""
    stdlib = set(sys.stdlib_module_names)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in stdlib or top == "stratopt_ds":
                continue
            dists = to_dist.get(top)
            assert dists, f"{path.relative_to(ROOT)}: no installed distribution provides {name!r}"
            found.add(norm(dists[0]))
            found |= {dist for prefix, dist in IMPLIED.items()
                      if name == prefix or name.startswith(prefix + ".")}
    return found


def test_every_import_of_the_package_is_declared():
    """stratopt_ds/study needs no more than core + study; every other module no more than
    core + train (stratopt-train, stratopt-data, the DeepSpeed / HF / accelerate bindings)."""
    allowed = {"study": CORE | extra_names("study"), "other": CORE | extra_names("train")}
    undeclared, to_dist = {}, md.packages_distributions()
    for path in sorted((ROOT / "stratopt_ds").rglob("*.py")):
        rel = path.relative_to(ROOT / "stratopt_ds")
        group = "study" if rel.parts[0] == "study" else "other"
        extra = imported_distributions(path, to_dist) - allowed[group]
        if extra:
            undeclared[str(rel)] = sorted(extra)
    assert not undeclared, f"imports not declared in pyproject.toml: {undeclared}"


# ------------------------------------------------------------------------------------------------
# A real, non-editable install into a fresh venv


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
    return {**env, "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PYTHONDONTWRITEBYTECODE": "1", **extra}


def copy_repository(dest: Path) -> Path:
    """The files a build reads (no build/, egg-info or in-tree artefacts of the checkout)."""
    dest.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "requirements.txt"):
        shutil.copy(ROOT / name, dest)
    for lic in ROOT.glob("LICEN[CS]E*"):
        shutil.copy(lic, dest)
    ops_copy = ROOT / "stratopt_ds" / "ops" / "csrc"  # the build's copy of csrc/, if left behind

    def ignore(directory, names):
        skip = {n for n in names if n == "__pycache__" or n.endswith((".so", ".pyc", ".egg-info"))}
        return skip | ({"csrc"} if Path(directory) == ops_copy.parent else set())

    for tree in ("stratopt_ds", "csrc"):
        shutil.copytree(ROOT / tree, dest / tree, ignore=ignore)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A venv with nothing of its own but what `pip install ".[all]"` put there."""
    base = tmp_path_factory.mktemp("packaging")
    src = copy_repository(base / "src")
    venv = base / "venv"
    times = {}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, env=clean_env()).stdout.strip())
    # This environment's site-packages, after the venv's own: its torch, its dependencies, its
    # pip and setuptools. A path line in a .pth file is only appended to sys.path: the .pth files
    # over there (e.g. an editable install of this repository) are not run.
    parents = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        parents[site.getusersitepackages()] = None
    (purelib / "_parent_env.pth").write_text("".join(f"{p}\n" for p in parents))
    times["venv"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    proc = subprocess.run([str(python), "-m", "pip", "install", "--no-index", "--no-build-isolation",
                           f"{src}[all]"], capture_output=True, text=True, timeout=300,
                          cwd=base, env=clean_env())
    times["pip install"] = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"venv": venv, "python": python, "purelib": purelib, "cwd": base, "pip": proc,
            "times": times}


def run_in(installed, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300,
                          cwd=installed["cwd"], env=clean_env())


def test_pip_installs_the_package_and_leaves_torch_alone(installed):
    own = {p.name.lower() for p in installed["purelib"].iterdir()}
    assert "stratopt_ds" in own and not any(n.startswith("torch") for n in own), sorted(own)
    installing = [line for line in installed["pip"].stdout.splitlines()
                  if line.startswith("Installing collected packages")]
    assert installing == ["Installing collected packages: stratopt-ds"], installing
    r = run_in(installed, installed["python"], "-c",
               "import stratopt_ds; print(stratopt_ds.__file__)")
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).is_relative_to(installed["purelib"]), r.stdout  # not the repo
    assert (installed["purelib"] / "stratopt_ds" / "study" / "plans" / "ci_tiny.yaml").is_file()
    assert (installed["purelib"] / "stratopt_ds" / "ops" / "csrc" / "cpu" / "stratopt_cpu.cpp").is_file()


def test_installed_metadata_has_the_extras_and_scripts(installed):
    code = ("import importlib.metadata as md, json; d = md.distribution('stratopt-ds'); "
            "print(json.dumps({'path': str(d.locate_file('')), 'version': d.version, "
            "'requires': d.requires, 'extras': d.metadata.get_all('Provides-Extra'), "
            "'scripts': {e.name: e.value for e in d.entry_points if e.group == 'console_scripts'}}))")
    r = run_in(installed, installed["python"], "-c", code)
    assert r.returncode == 0, r.stderr
    meta = json.loads(r.stdout)
    assert Path(meta["path"]).is_relative_to(installed["venv"])  # this install's metadata
    version = re.search(r'^__version__ = "(.+)"$',
                        (ROOT / "stratopt_ds" / "__init__.py").read_text(), re.M).group(1)
    assert meta["version"] == version
    assert {"train", "study", "all"} <= set(meta["extras"])
    requires = {(req_name(r), re.search(r'extra == "(\w+)"', r).group(1) if "extra ==" in r else None)
                for r in meta["requires"]}
    for dist in ("pyyaml", "scipy", "statsmodels", "matplotlib", SELF):
        assert (dist, "study") in requires, (dist, sorted(requires, key=str))
    for dist in ("deepspeed", "transformers", "datasets", "tensorboard"):
        assert (dist, "train") in requires, dist
    assert ("torch", None) in requires
    assert meta["scripts"] == PROJECT["scripts"]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_help_works_outside_the_repository(installed, script):
    exe = installed["venv"] / "bin" / script
    assert exe.is_file()
    t0 = time.perf_counter()
    r = run_in(installed, exe, "--help")
    installed["times"][script] = time.perf_counter() - t0
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stdout.startswith("usage: ")
    for word in SCRIPTS[script]:
        assert word in r.stdout, (script, word, r.stdout)


def test_python_m_still_works_in_the_install(installed):
    r = run_in(installed, installed["python"], "-m", "stratopt_ds.study", "--help")
    assert r.returncode == 0 and "report" in r.stdout, r.stderr[-3000:]
    print("packaging timings (s):", {k: round(v, 1) for k, v in installed["times"].items()})
