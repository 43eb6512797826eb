"""Run ``swav`` commands as on a core install (``pip install swav``, no extras), for
tests/test_extras.py (not a test module).

    python tests/plain_install.py CASES.json RESULTS.json

The optional libraries named in ``SWAV_BLOCK`` (comma-separated top-level modules; default those
of the ``report`` and ``tensorboard`` extras and scipy) are made unimportable before swav is
imported: Python's path finder is replaced by one that does not see them (:class:`NotInstalled`).
``CASES.json`` is ``[{"id": ..., "argv": [...]}, ...]``; each runs in
this process through ``swav.cli.main`` (one torch import for all), with its stdout and stderr
captured; an exception that escapes ``main`` is recorded with its traceback, as Python would
print it. ``RESULTS.json`` gets ``{id: {"code", "out", "err"}}`` and ``"blocked_ok"`` (True when
every blocked module failed to import and none of them got loaded).
"""
import contextlib
import importlib.machinery
import io
import json
import os
import sys
import traceback

BLOCKED = set(os.environ.get("SWAV_BLOCK", "matplotlib,sklearn,scipy,tensorboard,threadpoolctl").split(","))


class NotInstalled(importlib.machinery.PathFinder):
    """The path finder, blind to the blocked modules: every finder then answers None for them,
    so ``import`` raises ModuleNotFoundError and ``importlib.util.find_spec`` returns None, as for
    a module that is not installed (torch asks find_spec about optional libraries: a finder that
    raised instead would break torch itself)."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            return None
        return super().find_spec(name, path, target)


sys.meta_path[:] = [NotInstalled if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
assert NotInstalled in sys.meta_path


def run_case(argv: list[str]) -> dict:
    from swav.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: B902 - what the interpreter would print, then exit 1
            traceback.print_exc()
            code = 1
    return {"code": code, "out": out.getvalue(), "err": err.getvalue()}


def blocked_ok() -> bool:
    for name in BLOCKED:
        try:
            __import__(name)
            return False
        except ModuleNotFoundError:
            pass
    return not any(m.partition(".")[0] in BLOCKED for m in sys.modules)


def main() -> None:
    cases_file, results_file = sys.argv[1:3]
    with open(cases_file, encoding="utf-8") as f:
        cases = json.load(f)
    results = {c["id"]: run_case(c["argv"]) for c in cases}
    results["blocked_ok"] = blocked_ok()
    with open(results_file, "w", encoding="utf-8") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
