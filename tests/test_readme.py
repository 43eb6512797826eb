"""The README's commands run as written.

The rule: a fenced ``sh`` or ``python`` block of README.md that follows a line ``<!-- tested -->``
is run here, exactly as written, in a fresh temporary folder that holds

* ``photos/``: a flat folder of 80 small PNG images (the folder recipe's example data), and
* ``$SWAV_DATA/fashion-mnist``: a small fake Fashion-MNIST (512 + 128 images), so built-in data
  sets are found without a download,

with ``.venv/bin`` (the interpreter running the tests) first on ``PATH``. ``sh`` blocks run with
``bash -e``; ``python`` blocks with this interpreter. A block that needs other hardware (GPUs,
SLURM, ImageNet) or takes long (``make demo``) is not marked: it must then be a recipe for other
hardware, or be exercised by ``make demo`` itself (``test_unmarked_commands_exist`` checks that
they name real commands). The blocks written for ``make demo``'s run folder find a smoke run at
``runs/fashion-mnist``.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from swav.config import PRESETS

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MARK = "<!-- tested -->"
FENCE = re.compile(r"^```(\w*)\s*$")


def readme_blocks() -> list[tuple[int, str, str, bool]]:
    """(line number, language, code, marked tested) of every fenced block of the README."""
    lines = README.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m and m.group(1):
            start, lang = i, m.group(1)
            j = i + 1
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            marked = any(lines[k].strip() == MARK for k in range(max(0, start - 2), start))
            blocks.append((start + 1, lang, "\n".join(lines[start + 1:j]) + "\n", marked))
            i = j + 1
        else:
            i += 1
    return blocks


TESTED = [(line, lang, code) for line, lang, code, marked in readme_blocks() if marked]


def test_readme_has_tested_blocks():
    langs = [lang for _, lang, _ in TESTED]
    assert langs.count("sh") >= 2 and "python" in langs
    for line, lang, _ in TESTED:
        assert lang in ("sh", "python"), f"README line {line}: a tested block must be sh or python, not {lang}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, fake_fmnist) -> Path:
    work = tmp_path_factory.mktemp("readme")
    shutil.copytree(fake_fmnist, work / "swav-data" / "fashion-mnist")
    photos = work / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(80):
        arr = rng.integers(0, 90, (36 + i % 3 * 4, 40, 3), dtype=np.uint8)
        arr[:, (i % 4) * 9:(i % 4) * 9 + 6] = 220
        Image.fromarray(arr).save(photos / f"photo{i:02d}.png")
    # the blocks after "After `make demo`" use its run folder; a smoke run stands in for it
    res = subprocess.run([sys.executable, "-m", "swav.cli", "pretrain", "--preset", "smoke", "--no-report",
                          "--out", "runs/fashion-mnist"], cwd=work, env=run_env(work), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return work


def run_env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["SWAV_DATA"] = str(work / "swav-data")
    env["OMP_NUM_THREADS"] = "1"  # small models on a small shared CPU: see the README's troubleshooting
    env["MPLBACKEND"] = "Agg"
    return env


@pytest.mark.parametrize("line,lang,code", TESTED, ids=[f"README-line-{b[0]}" for b in TESTED])
def test_readme_block_runs(line, lang, code, workdir):
    cmd = ["bash", "-e", "-c", code] if lang == "sh" else [sys.executable, "-c", code]
    res = subprocess.run(cmd, cwd=workdir, env=run_env(workdir), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (f"README block at line {line} failed ({res.returncode}):\n{code}\n"
                                 f"--- stdout\n{res.stdout[-3000:]}\n--- stderr\n{res.stderr[-3000:]}")
    if "swav report" in code:
        for out in re.findall(r"swav report (\S+)", code):
            assert (workdir / out / "report.html").stat().st_size > 10_000


def test_unmarked_commands_exist():
    """Commands in unmarked blocks are at least real sub-commands (or recipes for other launchers)."""
    from swav.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    known = set(sub.choices)
    for line, lang, code, _ in readme_blocks():
        if lang != "sh":
            continue
        for used in re.findall(r"(?:^|\s|/)swav(?:\.cli)? (\w+)", code):
            assert used in known, f"README line {line}: unknown command `swav {used}`"


def test_presets_table_lists_every_preset():
    text = README.read_text(encoding="utf-8")
    table = text[text.index("## Presets"):text.index("## Troubleshooting")]
    names = re.findall(r"^\| `([\w-]+)`", table, re.M)
    assert sorted(names) == sorted(PRESETS)


def test_presets_table_states_the_presets_values():
    """The README's presets table and docs/guide/presets.md say what the presets set: crops,
    global batch, prototypes, queue and optimiser/lr (a retuned preset must update its docs)."""
    from swav.config import make_config

    text = README.read_text(encoding="utf-8")
    table = text[text.index("## Presets"):text.index("## Troubleshooting")]
    guide = (REPO / "docs" / "guide" / "presets.md").read_text(encoding="utf-8")
    wrong = []
    for row in re.findall(r"^\| `([\w-]+)`.*$", table, re.M):
        line = next(ln for ln in table.splitlines() if ln.startswith(f"| `{row}`"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        cfg = make_config(row)
        crops = " + ".join(f"{n}x{s}" for n, s in zip(cfg.augment.nmb_crops, cfg.augment.size_crops))
        queue = "none" if cfg.swav.queue_length == 0 else f"{cfg.swav.queue_length} from epoch {cfg.swav.epoch_queue_starts}"
        expected = {3: crops, 4: str(cfg.train.batch_size), 5: str(cfg.model.nmb_prototypes), 6: queue,
                    7: f"{cfg.optim.optimizer.upper()} {cfg.optim.lr:g}"}
        for col, value in expected.items():
            if cells[col] != value:
                wrong.append(f"README presets table, {row}: column {col} says {cells[col]!r}, the preset {value!r}")
        gline = next((ln for ln in guide.splitlines() if ln.startswith(f"| `{row}`")), "")
        if not gline:
            wrong.append(f"docs/guide/presets.md has no row for {row}")
        for value in (crops, f"batch {cfg.train.batch_size}", f"{cfg.optim.optimizer.upper()} {cfg.optim.lr:g}"):
            if gline and value not in gline:
                wrong.append(f"docs/guide/presets.md, {row}: does not say {value!r}")
    assert not wrong, "\n".join(wrong)


DOCS = [README, *sorted((REPO / "docs").rglob("*.md"))]


def test_docs_name_real_code():
    """Every `swav.module.name` written in the README and docs/ can be imported / looked up
    (settings of the config's ``swav`` section, such as `swav.epsilon`, are settings, not code)."""
    import importlib

    from swav.config import ALL_KEYS

    missing = []
    for doc in DOCS:
        for ref in sorted(set(re.findall(r"`(swav(?:\.\w+)+)", doc.read_text(encoding="utf-8")))):
            if ref in ALL_KEYS:
                continue
            parts = ref.split(".")
            for cut in range(len(parts), 0, -1):  # the longest importable module, then attributes
                try:
                    obj = importlib.import_module(".".join(parts[:cut]))
                except ImportError:
                    continue
                try:
                    for attr in parts[cut:]:
                        obj = getattr(obj, attr)
                except AttributeError:
                    missing.append(f"{doc.relative_to(REPO)}: {ref}")
                break
            else:
                missing.append(f"{doc.relative_to(REPO)}: {ref}")
    assert not missing, missing


def test_docs_links_resolve():
    """Relative links and images of the README and docs/ point to files that exist."""
    optional = {REPO / "docs" / "benchmarks.md"}  # written by the benchmarks work, may come later
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8")):
            if re.match(r"\w+://", target):
                continue
            path = (doc.parent / target).resolve()
            if not path.exists() and path not in optional:
                broken.append(f"{doc.relative_to(REPO)} -> {target}")
    assert not broken, broken
