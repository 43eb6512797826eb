"""Every command on a core install (no extras): it succeeds or exits 2 with one line naming the
``pip install``, never a traceback; ``pyproject.toml`` declares every module the package imports;
swav.extras agrees with it."""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from swav.extras import OPTIONAL_MODULES, MissingExtraError, missing_extra_message, require, require_extra

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "swav"
DRIVER = REPO / "tests" / "plain_install.py"
# import name -> distribution, where they differ (the optional ones are in swav.extras)
DISTRIBUTION_OF = {"yaml": "pyyaml", "PIL": "pillow", **{m: d for m, (d, _) in OPTIONAL_MODULES.items()}}


def _dist(requirement: str) -> str:
    """'scikit-learn>=1.3' -> 'scikit-learn' (normalised as pip does)."""
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)
    return re.sub(r"[-_.]+", "-", name).lower()


def _pyproject() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    core = {_dist(r) for r in project["dependencies"]}
    extras = {name: {_dist(r) for r in reqs} for name, reqs in project["optional-dependencies"].items()}
    return core, extras


IMPORTING_CALLS = ("require", "import_module", "is_installed", "find_spec", "__import__")


def _called(node: ast.Call) -> str:
    f = node.func
    return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""


def imported_top_level_modules() -> dict[str, list[str]]:
    """{top-level module: [files that import it]} for every import outside the standard library
    and swav itself, anywhere in a file (lazy imports inside functions included, and imports by
    name: ``require("sklearn.manifold", ...)``, ``importlib.import_module("x")``)."""
    found: dict[str, list[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Call) and _called(node) in IMPORTING_CALLS and node.args \
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                names = [node.args[0].value]  # require("sklearn.manifold", ...), import_module("x")
            for name in names:
                top = name.partition(".")[0]
                if top not in sys.stdlib_module_names and top not in ("swav", "__future__"):
                    found.setdefault(top, []).append(str(path.relative_to(REPO)))
    return found


def test_pyproject_declares_every_module_the_package_imports():
    core, extras = _pyproject()
    declared = core | {d for name, dists in extras.items() if name != "test" for d in dists}
    imported = imported_top_level_modules()
    assert {"torch", "numpy", "PIL", "yaml", "matplotlib", "sklearn"} <= set(imported)  # the walk sees them
    undeclared = {m: files for m, files in imported.items() if _dist(DISTRIBUTION_OF.get(m, m)) not in declared}
    assert not undeclared, f"imported but declared in no dependency or extra of pyproject.toml: {undeclared}"


def test_optional_modules_are_the_extras_of_pyproject():
    core, extras = _pyproject()
    for module, (dist, extra) in OPTIONAL_MODULES.items():
        assert _dist(dist) in extras.get(extra, set()), f"{module}: {dist} is not in extra {extra!r} of pyproject"
        assert _dist(dist) not in core, f"{dist} is a core dependency, not optional"
    assert "scipy" not in core | {d for dists in extras.values() for d in dists} - extras["test"]


def _not_installed(monkeypatch, top: str) -> None:
    """``top`` and its submodules read as not installed (None in sys.modules), also when an earlier
    test imported them."""
    for name in [m for m in sys.modules if m == top or m.startswith(top + ".")] + [top]:
        monkeypatch.setitem(sys.modules, name, None)


def test_require_names_what_needs_it_and_the_pip_install(monkeypatch):
    _not_installed(monkeypatch, "matplotlib")
    _not_installed(monkeypatch, "sklearn")
    with pytest.raises(MissingExtraError) as ei:
        require("matplotlib.pyplot", "the report's charts")
    assert str(ei.value) == "the report's charts needs matplotlib, which is not installed: pip install 'swav[report]'"
    with pytest.raises(MissingExtraError, match=r"^swav report needs matplotlib and scikit-learn, which are not "
                                                r"installed: pip install 'swav\[report\]'$"):
        require_extra("report", "swav report")
    assert missing_extra_message(ModuleNotFoundError("No module named 'sklearn'", name="sklearn")) == (
        "this command needs scikit-learn, which is not installed: pip install 'swav[report]'")
    assert missing_extra_message(ModuleNotFoundError("No module named 'foo'", name="foo")) is None  # a bug: traceback
    with pytest.raises(KeyError):
        require("numpy", "x")


# ---------------------------------------------------------------------------------------------
# every command, as on a core install
# ---------------------------------------------------------------------------------------------
TINY = ["--preset", "smoke", "--set", "data.subset=64", "--set", "train.batch_size=32", "--set", "train.epochs=1",
        "--set", "model.width_per_group=4", "--set", "model.hidden_mlp=16", "--set", "train.final_knn=false",
        "--set", "data.workers=0", "--device", "cpu"]  # (no --no-report: the missing report extra is hinted)
EVAL = ["--max-test", "32", "--no-compare-init", "--device", "cpu", "--workers", "0", "--quiet"]
# (id, argv with {run} {tmp} {fm} {imgs}, expected exit code, text expected in stdout + stderr)
CASES = [
    ("pretrain", ["pretrain", "--out", "{run}", *TINY, "--set", "data.root={fm}"], 0,
     "no report written: swav report needs matplotlib, scikit-learn and threadpoolctl, which are not installed: "
     "pip install 'swav[report]', then 'swav report {run}'"),
    ("report", ["report", "{run}", "--device", "cpu"], 2, "pip install 'swav[report]'"),
    ("eval knn", ["eval", "knn", "{run}", "--max-train", "64", "--k", "5", *EVAL], 0, "result written to"),
    ("eval linear", ["eval", "linear", "{run}", "--epochs", "1", "--no-augment", "--max-train", "64", *EVAL], 0,
     "result written to"),
    ("eval finetune", ["eval", "finetune", "{run}", "--percent", "10", "--epochs", "1", *EVAL], 0,
     "result written to"),
    ("eval clusters", ["eval", "clusters", "{run}", *EVAL], 0, "result written to"),
    ("cluster", ["cluster", "{run}", "--data", "{imgs}", "--out", "{tmp}/a.csv", "--quiet", "--device", "cpu"], 0,
     "assigned to"),
    ("embed", ["embed", "{run}", "--data", "{imgs}", "--out", "{tmp}/emb", "--quiet", "--device", "cpu"], 0,
     "features.npy"),
    ("export", ["export", "{run}", "--format", "torchvision", "--out", "{tmp}/w.pt"], 0, "torchvision"),
    ("export safetensors", ["export", "{run}", "--format", "safetensors", "--out", "{tmp}/w.safetensors"], 0,
     "torchvision"),
    ("bench", ["bench", "--preset", "smoke", "--steps", "1", "--warmup", "0", "--matmul-size", "64", "--threads", "1",
               "--json", "--device", "cpu", "--precision", "fp32"], 0, '"images_per_s"'),
    ("presets", ["presets"], 0, "smoke"),
    ("prepare", ["prepare", "{imgs}", "--out", "{tmp}/prepared", "--workers", "0"], 0, "image(s) in"),
]


def _registered_commands() -> set[str]:
    from swav.cli import build_parser

    def walk(parser, prefix):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield " ".join(prefix)
            return
        for name, p in subs[0].choices.items():
            yield from walk(p, (*prefix, name))

    return set(walk(build_parser(), ()))


@pytest.fixture(scope="module")
def core_install(tmp_path_factory, fake_fmnist):
    """Every case run in one process with matplotlib, scikit-learn, threadpoolctl, scipy and
    tensorboard unimportable (tests/plain_install.py)."""
    from PIL import Image

    tmp = tmp_path_factory.mktemp("core")
    imgs = tmp / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (28 + 4 * i, 30, 3), dtype=np.uint8)).save(imgs / f"{i}.png")
    paths = {"run": tmp / "run", "tmp": tmp, "fm": fake_fmnist, "imgs": imgs}
    cases = [{"id": cid, "argv": [a.format(**paths) for a in argv]} for cid, argv, _, _ in CASES]
    (tmp / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SWAV_DEBUG", None)
    proc = subprocess.run([sys.executable, str(DRIVER), str(tmp / "cases.json"), str(tmp / "results.json")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp / "results.json").read_text())
    return paths, results


def test_every_command_is_covered():
    missing = _registered_commands() - {cid.split(" ")[0] if cid.startswith("export") else cid
                                        for cid, _, _, _ in CASES}
    assert not missing, f"add a core-install case for: {sorted(missing)}"


def test_the_optional_libraries_were_unimportable(core_install):
    assert core_install[1]["blocked_ok"]


@pytest.mark.parametrize("cid", [c[0] for c in CASES])
def test_command_on_a_core_install(core_install, cid):
    paths, results = core_install
    _, _, code, text = next(c for c in CASES if c[0] == cid)
    res = results[cid]
    both = res["out"] + res["err"]
    assert res["code"] == code, f"exit {res['code']}, expected {code}:\n{both[-3000:]}"
    assert text.format(**paths) in both, both[-3000:]
    assert "Traceback" not in both, both[-3000:]
    hints = [line for line in res["err"].splitlines() if "pip install" in line]
    if code == 2:  # the error is one line, naming the pip install
        assert len(hints) == 1 and hints[0].startswith(f"swav {cid}: error: "), res["err"]
        assert hints[0] == res["err"].strip().splitlines()[-1]
    if cid == "pretrain":  # the report and TensorBoard, each with its install line
        assert any("pip install 'swav[tensorboard]'" in h for h in hints), res["err"]
        assert (paths["run"] / "checkpoint.pt").is_file() and not (paths["run"] / "report.html").exists()
    if cid == "eval clusters":  # computed without scipy
        record = json.loads((paths["run"] / "eval" / "clusters.json").read_text())
        assert 0 <= record["metrics"]["hungarian_acc"] <= 100
