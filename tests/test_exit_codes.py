"""One exit-code policy for every command (swav.commands.EXIT_CODES): 0 success, 1 the work started
and failed (a non-finite stop, an I/O error while running, out of memory), 2 a usage or
configuration error (bad flags or settings, a path given on the command line that does not exist or
cannot be used, a file that is not swav / official / torchvision weights, a resume mismatch).

Each command of the registry gets at least one usage error (2), a success (0) where it is cheap,
and a run failure (1) where one can be provoked cheaply. Most cases call ``swav.cli.main`` in this
process (what ``python -m swav.cli`` returns as its status); the ``PROC`` ones run
``python -m swav.cli`` in subprocesses, a few at a time in the background while the others run
(starting one costs seconds, most of it importing torch), and the I/O failures go through
tests/reliability/faultrun.py (RLIMIT_FSIZE: a write fails with EFBIG). Out of memory cannot be
provoked on a CPU: the last tests raise it (and a bug) inside the commands instead."""
from __future__ import annotations

import concurrent.futures
import errno
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from swav.cli import main

REPO = Path(__file__).resolve().parents[1]
FAULTRUN = REPO / "tests" / "reliability" / "faultrun.py"
PROC = "proc"  # run as `python -m swav.cli`; a dict: through faultrun.py with these faults

# a 2-step pretraining (64 images, batch 32) of a very narrow smoke model on fake Fashion-MNIST
TINY = ["--preset", "smoke", "--set", "data.subset=64", "--set", "train.batch_size=32", "--set", "train.epochs=1",
        "--set", "model.width_per_group=4", "--set", "model.hidden_mlp=16", "--set", "train.final_knn=false",
        "--set", "data.workers=0", "--device", "cpu", "--no-report"]
SMALL_EVAL = ["--max-test", "32", "--no-compare-init", "--device", "cpu", "--workers", "0", "--quiet"]

# (id, command words, arguments, expected exit code, text expected in stdout + stderr, how: None for
# in-process, PROC, or faults). {tmp} {fm} {run} {imgs} {bad_imgs} {other} {tv} are filled in: {run}
# is a finished tiny run (pretrained in-process: the pretrain success case), {tv} its torchvision export.
CASES = [
    # -- swav itself
    ("swav-help", [], "--help", 0, "exit codes (every command):", PROC),
    ("swav-no-command", [], "", 2, "usage: swav", None),
    ("swav-bad-flag", [], "--no-such-flag", 2, "unrecognized arguments", PROC),
    # -- pretrain
    ("pretrain-set-typo", ["pretrain"], "--out {tmp}/p1 --set optim.lrr=0.1", 2, "did you mean 'optim.lr'", None),
    ("pretrain-missing-config", ["pretrain"], "--out {tmp}/p2 --config {tmp}/none.yaml", 2,
     "cannot read config file", None),
    ("pretrain-missing-data", ["pretrain"], "--out {tmp}/p3 --data {tmp}/no_such_folder --preset smoke", 2,
     "data.source", None),
    ("pretrain-resume-without-checkpoint", ["pretrain"], "--out {tmp}/p4 --resume --preset smoke", 2,
     "--resume given", None),
    ("pretrain-not-a-checkpoint", ["pretrain"], "--out {tmp}/garbage_run --preset smoke", 2,
     "not a PyTorch checkpoint", PROC),
    ("pretrain-resume-mismatch", ["pretrain"], "--out {run} TINY --set data.root={fm} --set optim.lr=0.01", 2,
     "another configuration", None),
    ("pretrain-nonfinite-stop", ["pretrain"], "--out {tmp}/nan TINY --set data.root={fm} --set optim.lr=1e30 "
     "--set train.nan_patience=1", 1, "non-finite", PROC),
    # -- presets
    ("presets", ["presets"], "", 0, "smoke", None),
    ("presets-bad-flag", ["presets"], "--fast", 2, "unrecognized arguments", None),
    # -- report
    ("report-missing-folder", ["report"], "{tmp}/nowhere", 2, "does not exist", PROC),
    ("report-not-a-run", ["report"], "{tmp}", 2, "is not a swav run folder", None),
    ("report", ["report"], "{run} --out {tmp}/r.html --max-images 16 --map-points 8 --device cpu", 0,
     "report: ", None),
    # -- eval
    ("eval-no-evaluation", ["eval"], "", 2, "usage: swav eval", None),
    ("eval-knn-missing-checkpoint", ["eval", "knn"], "{tmp}/none.pt --data fashion-mnist", 2, "does not exist",
     None),
    ("eval-knn-not-weights", ["eval", "knn"], "{other} --data fashion-mnist", 2, "torchvision-layout ResNet", PROC),
    ("eval-knn", ["eval", "knn"], "{run} --max-train 64 --k 5 --out {tmp}/knn.json SMALL_EVAL", 0,
     "result written to", None),
    ("eval-knn-write-fails", ["eval", "knn"], "{run} --max-train 64 --k 5 --out {tmp}/knn2.json SMALL_EVAL", 1,
     "File too large", {"fsize": 64}),
    ("eval-linear-bad-flag", ["eval", "linear"], "{tmp}/none.pt --epochs 0", 2, "must be > 0", None),
    ("eval-linear", ["eval", "linear"], "{run} --epochs 1 --no-augment --max-train 64 --out {tmp}/lin.json "
     "SMALL_EVAL", 0, "result written to", None),
    ("eval-finetune-missing-subset-file", ["eval", "finetune"], "{run} --subset-file {tmp}/no_subset.txt "
     "--epochs 1 SMALL_EVAL", 2, "no_subset.txt", None),
    ("eval-finetune-nonfinite", ["eval", "finetune"], "{run} --percent 10 --epochs 2 --lr-trunk 1e30 "
     "--lr-head 1e30 --out {tmp}/ft.json SMALL_EVAL", 1, "lower --lr-trunk", None),
    ("eval-clusters-bad-flag", ["eval", "clusters"], "{tmp}/none.pt --assign kmeans", 2, "invalid choice", None),
    ("eval-clusters", ["eval", "clusters"], "{run} --out {tmp}/cl.json SMALL_EVAL", 0, "result written to", None),
    ("eval-clusters-backbone-only", ["eval", "clusters"], "{tv} --data fashion-mnist --data-root {fm} SMALL_EVAL",
     2, "no prototypes", None),
    # -- cluster, embed
    ("cluster-missing-checkpoint", ["cluster"], "{tmp}/none.pt --data {imgs} --out {tmp}/a0.csv", 2,
     "does not exist", None),
    ("cluster", ["cluster"], "{run} --data {imgs} --out {tmp}/a.csv --quiet --device cpu", 0, "assigned to", None),
    ("embed-missing-data", ["embed"], "{run} --data {tmp}/no_such_folder --out {tmp}/e0 --device cpu", 2,
     "no_such_folder", None),
    ("embed", ["embed"], "{run} --data {imgs} --out {tmp}/e1 --quiet --device cpu", 0, "features.npy", None),
    ("embed-no-usable-file", ["embed"], "{run} --data {bad_imgs} --out {tmp}/e2 --quiet --device cpu", 1,
     "none of the 2 file(s) could be used", None),
    # -- export
    ("export-not-weights", ["export"], "{other} --format torchvision", 2, "torchvision-layout ResNet", None),
    ("export-bad-format", ["export"], "{other} --format keras", 2, "invalid choice", None),
    ("export", ["export"], "{run} --format safetensors --out {tmp}/w.safetensors", 0, "torchvision ResNet key names",
     None),
    ("export-write-fails", ["export"], "{run} --format official --out {tmp}/big.pt", 1, "File too large",
     {"fsize": 4096}),
    # -- prepare
    ("prepare-missing-source", ["prepare"], "{tmp}/no_such_folder --out {tmp}/prep0", 2, "does not exist", None),
    ("prepare", ["prepare"], "{imgs} --out {tmp}/prep1 --workers 0", 0, "image(s) in", None),
    ("prepare-write-fails", ["prepare"], "{imgs} --out {tmp}/prep2 --workers 0", 1, "File too large",
     {"fsize": 64}),
    # -- bench
    ("bench-bad-steps", ["bench"], "--preset smoke --steps 0 --device cpu", 2, "steps must be >= 1", PROC),
    ("bench-set-typo", ["bench"], "--preset smoke --set train.epoch=1", 2, "did you mean 'train.epochs'", None),
    ("bench", ["bench"], "--preset smoke --steps 1 --warmup 0 --matmul-size 64 --threads 1 --json --device cpu "
     "--precision fp32", 0, '"images_per_s"', None),
]
BY_ID = {c[0]: c for c in CASES}
assert len(BY_ID) == len(CASES)


def _argv(words, tail: str, paths: dict) -> list[str]:
    out = list(words)
    for tok in tail.split():
        if tok == "TINY":
            out += TINY
        elif tok == "SMALL_EVAL":
            out += SMALL_EVAL
        else:
            out.append(tok.format(**paths))
    return out


def _run_process(argv: list[str], how) -> types.SimpleNamespace:
    faults = how if isinstance(how, dict) else None
    cmd = [sys.executable, str(FAULTRUN), *argv] if faults else [sys.executable, "-m", "swav.cli", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SWAV_FAULTS": json.dumps(faults or {})}
    env.pop("SWAV_DEBUG", None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return types.SimpleNamespace(code=proc.returncode, out=proc.stdout, err=proc.stderr)


def _run_here(argv: list[str], capsys) -> types.SimpleNamespace:
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return types.SimpleNamespace(code=code, out=out, err=err)


def _write_inputs(tmp: Path) -> dict:
    from PIL import Image

    rng = np.random.default_rng(0)
    imgs, bad = tmp / "imgs", tmp / "bad_imgs"
    imgs.mkdir()
    bad.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (28 + 4 * i, 30, 3), dtype=np.uint8)).save(imgs / f"{i}.png")
    (bad / "a.png").write_bytes(b"not a png")
    (bad / "b.jpg").write_bytes(b"")
    torch.save({"encoder.weight": torch.zeros(2)}, tmp / "other.pt")
    (tmp / "garbage_run").mkdir()
    (tmp / "garbage_run" / "checkpoint.pt").write_bytes(b"this is not a checkpoint\n" * 8)
    return {"imgs": imgs, "bad_imgs": bad, "other": tmp / "other.pt"}


@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks on a shared CPU
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, fake_fmnist, one_thread):
    """The inputs, the tiny run (``swav pretrain`` in-process: its success case) with its
    torchvision export, and the PROC cases started in the background, three at a time."""
    import contextlib
    import io

    tmp = tmp_path_factory.mktemp("exitcodes")
    paths = {"tmp": tmp, "fm": fake_fmnist, "run": tmp / "run", "tv": tmp / "tv.pt", **_write_inputs(tmp)}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=3)
    procs = {cid: pool.submit(_run_process, _argv(words, tail, paths), how)
             for cid, words, tail, _, _, how in CASES if how is not None and "{run}" not in tail}
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as out:
        pretrain = main(["pretrain", "--out", str(paths["run"]), *TINY, "--set", f"data.root={fake_fmnist}"])
        export = main(["export", str(paths["run"]), "--format", "torchvision", "--out", str(paths["tv"])])
    runs = types.SimpleNamespace(pretrain=(pretrain, out.getvalue(), err.getvalue()), export=export)
    procs.update({cid: pool.submit(_run_process, _argv(words, tail, paths), how)
                  for cid, words, tail, _, _, how in CASES if how is not None and "{run}" in tail})
    yield types.SimpleNamespace(paths=paths, procs=procs, runs=runs)
    pool.shutdown(wait=True, cancel_futures=True)


def _check(res, code: int, text: str) -> None:
    both = res.out + res.err
    assert res.code == code, f"exit {res.code}, expected {code}:\n{both[-3000:]}"
    assert text in both, both[-3000:]
    assert "Traceback" not in both, both[-3000:]


def test_pretrain_and_export_succeed(setup):
    code, out, err = setup.runs.pretrain
    assert code == 0 and "run folder:" in out, err[-3000:]
    assert setup.runs.export == 0 and setup.paths["tv"].is_file()


@pytest.mark.parametrize("cid", list(BY_ID))
def test_exit_code(setup, capsys, cid):
    _, words, tail, code, text, how = BY_ID[cid]
    if how is None:
        res = _run_here(_argv(words, tail, setup.paths), capsys)
    else:
        res = setup.procs[cid].result()
    _check(res, code, text)


def _registered_commands() -> set[str]:
    """Every command of the registry as its words: 'pretrain', 'eval knn', ..."""
    import argparse

    from swav.cli import build_parser

    def walk(parser, prefix):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield " ".join(prefix)
            return
        for name, p in subs[0].choices.items():
            yield from walk(p, (*prefix, name))

    return set(walk(build_parser(), ()))


def test_every_command_has_a_usage_error_and_a_success_or_failure_case():
    usage = {" ".join(w) for _, w, _, code, _, _ in CASES if code == 2}
    ran = {" ".join(w) for _, w, _, code, _, _ in CASES if code in (0, 1)} | {"pretrain"}
    commands = _registered_commands()
    assert {"pretrain", "presets", "report", "eval knn", "eval linear", "eval finetune", "eval clusters", "cluster",
            "embed", "export", "bench"} <= commands
    assert not commands - usage, f"commands without a usage-error (exit 2) case: {sorted(commands - usage)}"
    assert not commands - ran, f"commands never run to 0 or 1: {sorted(commands - ran)}"


def test_help_and_readme_state_the_policy(setup):
    from swav.commands import EXIT_CODES

    help_text = setup.procs["swav-help"].result().out
    for code, _ in EXIT_CODES:
        assert f"\n  {code} " in help_text, help_text
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "Exit codes" in readme and all(f"`{code}`" in readme for code, _ in EXIT_CODES)


# --------------------------------------------------------------------------------------------
# in-process: what cannot be provoked cheaply (out of memory) and what must not be swallowed (bugs)
# --------------------------------------------------------------------------------------------
def _oom(*_a, **_k):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 139 GiB total)")


@pytest.mark.parametrize("target, argv", [
    ("swav.eval.runner.run_evaluation", ["eval", "knn", "x.pt", "--data", "fashion-mnist"]),
    ("swav.eval.weights.load_weights", ["embed", "x.pt", "--data", "imgs", "--out", "e"]),
    ("swav.trainer.train", ["pretrain", "--preset", "smoke", "--out", "OUT"]),
    ("swav.benchmark.run_benchmark", ["bench", "--preset", "smoke"]),
    ("swav.report.write_report", ["report", "RUN"]),
])
def test_out_of_memory_is_a_run_failure(monkeypatch, capsys, tmp_path, target, argv):
    import importlib

    from swav.cli import main

    module, name = target.rsplit(".", 1)
    monkeypatch.setattr(importlib.import_module(module), name, _oom)
    monkeypatch.delenv("SWAV_DEBUG", raising=False)
    code = main([str(tmp_path / a) if a in ("OUT", "RUN") else a for a in argv])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "out of memory" in err and "smaller batch" in err and "Traceback" not in err, err


def test_interrupt_is_130_and_swav_debug_shows_the_traceback(monkeypatch, capsys, tmp_path):
    import swav.trainer

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(swav.trainer, "train", interrupted)
    monkeypatch.delenv("SWAV_DEBUG", raising=False)
    assert main(["pretrain", "--preset", "smoke", "--out", str(tmp_path / "run")]) == 130
    assert "swav pretrain: interrupted" in capsys.readouterr().err
    monkeypatch.setenv("SWAV_DEBUG", "1")
    with pytest.raises(FileNotFoundError):  # the one-line message and exit 2 without it
        main(["report", str(tmp_path / "nowhere")])


def test_a_bug_is_not_reported_as_a_usage_error(monkeypatch):
    """A RuntimeError or TypeError the command does not expect propagates with its traceback
    (exit 1 from the interpreter), instead of a one-line 'error' and exit 2."""
    import swav.eval.runner
    from swav.cli import main

    for kind in (RuntimeError, TypeError, KeyError):
        def boom(*_a, **_k):
            raise kind("a bug")

        monkeypatch.setattr(swav.eval.runner, "run_evaluation", boom)
        with pytest.raises(kind, match="a bug"):
            main(["eval", "knn", "x.pt", "--data", "fashion-mnist"])


def test_the_table():
    from swav.checkpoint import CheckpointError
    from swav.commands import exit_status
    from swav.config import ConfigError
    from swav.eval.weights import WeightsError
    from swav.monitor import NonFiniteError
    from swav.trainer import ResumeMismatchError

    def wrapped(outer, inner):
        try:
            raise outer from inner
        except type(outer) as e:
            return e

    table = [
        (ConfigError("x"), 2), (ResumeMismatchError("x"), 2), (CheckpointError("x"), 2), (WeightsError("x"), 2),
        (ValueError("x"), 2), (FileNotFoundError(errno.ENOENT, "x"), 2), (PermissionError(errno.EACCES, "x"), 2),
        (NotADirectoryError(errno.ENOTDIR, "x"), 2), (IsADirectoryError(errno.EISDIR, "x"), 2),
        (OSError(errno.ENOSPC, "x"), 1), (OSError(errno.EFBIG, "x"), 1), (OSError(errno.EIO, "x"), 1),
        (NonFiniteError("x"), 1), (FloatingPointError("x"), 1), (torch.OutOfMemoryError("x"), 1),
        (MemoryError(), 1), (wrapped(CheckpointError("out of memory while loading"), MemoryError()), 1),
        (RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), 1), (KeyboardInterrupt(), 130),
    ]
    for exc, code in table:
        assert exit_status(exc)[0] == code, (exc, exit_status(exc))
    for bug in (RuntimeError("x"), TypeError("x"), KeyError("x"), AttributeError("x"), AssertionError()):
        assert exit_status(bug) is None, bug


class _Exited(Exception):
    pass


@pytest.mark.parametrize("job", [False, True], ids=["single", "torchrun-rank"])
def test_the_program_exits_with_mains_code_a_job_rank_without_finalisation(monkeypatch, capsys, job):
    """``swav`` (swav.cli.entry): a single process exits through sys.exit; a rank of a multi-process
    job flushes its output and ends with os._exit, skipping the interpreter's finalisation (where
    gloo's threads, kept alive by DistributedDataParallel, can abort the process)."""
    import swav.cli

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    if job:
        for var, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "127.0.0.1"),
                           ("MASTER_PORT", "29500")):
            monkeypatch.setenv(var, value)

    def fake_main(argv):
        print("the command's last line", end="")  # no newline: only a flush writes it out
        return 3

    exits = []

    def fake_exit(code):
        exits.append(code)
        raise _Exited

    monkeypatch.setattr(swav.cli, "main", fake_main)
    monkeypatch.setattr(os, "_exit", fake_exit)
    # the log file is flushed and closed first (pytest's own handlers are left open here)
    monkeypatch.setattr(swav.cli.logging, "shutdown", lambda: exits.append("logging.shutdown"))
    if job:
        with pytest.raises(_Exited):
            swav.cli.entry([])
        assert exits == ["logging.shutdown", 3]
    else:
        with pytest.raises(SystemExit) as e:
            swav.cli.entry([])
        assert e.value.code == 3 and exits == []
    assert capsys.readouterr().out == "the command's last line"
