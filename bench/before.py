"""The code before issue 22's data path, checked out beside this one, for side-by-side figures.

``before_src()`` returns the ``src`` folder of a detached git worktree (under ``bench/.before/``,
ignored by git) of the commit just before the one that added ``src/swav/data/transfer.py``: the
same library with the old decode (full size by default), the old collate (padding to the largest
image) and the old step. Benchmarks run it in a subprocess with ``PYTHONPATH=before_src()``.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARKER = "src/swav/data/transfer.py"


def before_rev() -> str:
    out = subprocess.run(["git", "-C", str(REPO), "log", "--diff-filter=A", "--format=%H", "--", MARKER],
                         check=True, capture_output=True, text=True).stdout.split()
    if not out:
        raise RuntimeError(f"no commit adds {MARKER}: run from a clone with the history of issue 22")
    return out[-1] + "^"


def before_src() -> Path:
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", before_rev()], check=True, capture_output=True,
                         text=True).stdout.strip()
    tree = REPO / "bench" / ".before" / rev[:12]
    if not (tree / "src" / "swav").is_dir():
        tree.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(tree), rev], check=True,
                       capture_output=True)
    return tree / "src"
