"""Untrusted files: checkpoints, configs and file lists are read without running code, and a
malformed or oversized file is refused with the reason.

A crafted checkpoint carries a pickled object whose unpickling would create a marker file; the
same file loaded with ``weights_only=False`` does create it (so the trap is armed), and every way
the product reads a checkpoint refuses it with the marker never appearing. The YAML refusals at
the function level are in tests/test_config.py, file-list limits in tests/data/test_datasets.py.
"""
from __future__ import annotations

import ast
import os
import random
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import swav.cli
from swav.checkpoint import CheckpointError, load_checkpoint_file, load_run_state
from swav.config import make_config
from swav.data import datasets as dsmod
from swav.data.datasets import FileListDataset, Skipped
from swav.trainer import train

from .conftest import REPO, cli_env, run_cli

SRC = REPO / "src" / "swav"


class _Trap:
    """Unpickling calls ``open(marker, "w")``: the side effect that must never happen."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _trap_checkpoint(path: Path, marker: Path, legacy: bool = False) -> Path:
    """A file shaped like a run checkpoint (every field resuming needs) with the trap inside."""
    cfg = make_config("smoke")
    from swav.config import to_dict

    state = {"format": "swav-run/1", "config": to_dict(cfg), "epochs": 2, "global_step": 1,
             "model": {"backbone.conv1.weight": torch.zeros(1), "trap": _Trap(marker)}, "optimizer": {}}
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.fixture
def trap(tmp_path):
    marker = tmp_path / "MARKER"
    control_marker = tmp_path / "CONTROL"
    control = _trap_checkpoint(tmp_path / "control.pt", control_marker)
    torch.load(control, weights_only=False)  # the trap is armed: a full unpickle runs it
    assert control_marker.exists()
    return marker, _trap_checkpoint(tmp_path / "evil.pt", marker), _trap_checkpoint(
        tmp_path / "evil_legacy.pt", marker, legacy=True)


def test_crafted_checkpoint_is_refused_by_the_loaders(trap):
    marker, evil, legacy = trap
    for path in (evil, legacy):
        for load in (load_checkpoint_file, load_run_state):
            with pytest.raises(CheckpointError) as err:
                load(path)
            msg = str(err.value)
            assert str(path) in msg and "refused" in msg and "run code" in msg and "io.open" in msg
    assert not marker.exists()


def test_crafted_checkpoint_is_refused_when_resuming(tmp_path, trap, fake_fmnist):
    marker, evil, _ = trap
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(evil.read_bytes())
    cfg = make_config("smoke", overrides=[f"out={out}", f"data.root={fake_fmnist}", "data.subset=64",
                                          "train.batch_size=32"])
    with pytest.raises(CheckpointError, match="refused"):
        train(cfg)
    assert not marker.exists()
    assert (out / "checkpoint.pt").read_bytes() == evil.read_bytes()  # left as it was: nothing overwritten


@pytest.mark.parametrize("command", ["pretrain", "embed", "cluster"])
def test_crafted_checkpoint_is_refused_by_the_commands(tmp_path, trap, fake_fmnist, corpus, command):
    marker, evil, _ = trap
    if command == "pretrain":
        out = tmp_path / "run"
        out.mkdir()
        (out / "checkpoint.pt").write_bytes(evil.read_bytes())
        args = ["pretrain", "--preset", "smoke", "--out", out, "--set", f"data.root={fake_fmnist}"]
    else:
        args = [command, evil, "--data", corpus.root, "--out", tmp_path / ("e" if command == "embed" else "c.csv")]
    proc = run_cli(*args, timeout=120)
    assert proc.returncode != 0
    assert "refused" in proc.stderr and "run code" in proc.stderr, proc.stderr[-2000:]
    assert not marker.exists()


def _files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.pt"
    torch.save({"a": torch.arange(3)}, good)
    data = good.read_bytes()
    files = {
        "empty": b"",
        "random bytes": random.Random(0).randbytes(4096),
        "truncated": data[: len(data) // 2],
        "text": b"this is a text file\n" * 10,
        "plain pickle": pickle.dumps({"a": 1}, protocol=2),
    }
    out = {}
    for name, content in files.items():
        p = tmp_path / (name.replace(" ", "_") + ".pt")
        p.write_bytes(content)
        out[name] = p
    (tmp_path / "folder.pt").mkdir()
    out["a folder"] = tmp_path / "folder.pt"
    os.mkfifo(tmp_path / "fifo.pt")  # opening it would block forever
    out["a FIFO"] = tmp_path / "fifo.pt"
    out["missing"] = tmp_path / "missing.pt"
    return out


@pytest.mark.parametrize("kind, reason", [
    ("empty", "empty (0 bytes)"), ("random bytes", "not a PyTorch checkpoint"), ("truncated", "truncated"),
    ("text", "corrupt"), ("a folder", "not a regular file"), ("a FIFO", "not a regular file"),
    ("missing", "cannot read"),
])
def test_malformed_checkpoint_is_refused_with_the_reason(tmp_path, kind, reason):
    path = _files(tmp_path)[kind]
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_file(path)
    assert str(path) in str(err.value) and reason in str(err.value)


def test_checkpoint_of_the_wrong_shape_or_size_is_refused(tmp_path):
    lst = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], lst)
    with pytest.raises(CheckpointError, match=r"list\.pt is not a swav run checkpoint .*found list"):
        load_run_state(lst)
    partial = tmp_path / "partial.pt"
    torch.save({"format": "swav-run/1", "model": {}}, partial)
    with pytest.raises(CheckpointError, match=r"needs .*'optimizer'.*found \['format', 'model'\]"):
        load_run_state(partial)
    big = tmp_path / "big.pt"
    torch.save({"w": torch.zeros(1000)}, big)
    size = big.stat().st_size
    with pytest.raises(CheckpointError, match=rf"big\.pt is {size} bytes, over the 1000-byte limit"):
        load_checkpoint_file(big, max_bytes=1000)
    with pytest.raises(CheckpointError, match="over the 1000-byte limit"):
        load_run_state(big, max_bytes=1000)
    assert torch.equal(load_checkpoint_file(big, max_bytes=size)["w"], torch.zeros(1000))


# --------------------------------------------------------------------------------------------
# configs and file lists, through the command
# --------------------------------------------------------------------------------------------
def _pretrain(capsys, *args) -> tuple[int, str]:
    code = swav.cli.main(["pretrain", "--preset", "smoke", *map(str, args)])
    return code, capsys.readouterr().err


def test_yaml_config_with_code_tags_oversized_or_not_a_mapping(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    cases = {
        "object.yaml": (f"train:\n  epochs: !!python/object/apply:os.system ['touch {marker}']\n", "not valid YAML"),
        "name.yaml": ("train:\n  epochs: !!python/name:os.system\n", "not valid YAML"),
        "new.yaml": (f"data: !!python/object/new:pathlib.Path ['{marker}']\n", "not valid YAML"),
        "big.yaml": ("train:\n  epochs: 3\n" + "# padding\n" * 110_000, "refusing files over 1048576 bytes"),
        "list.yaml": ("- train\n- data\n", "must hold a mapping"),
        "scalar.yaml": ("just a string\n", "must hold a mapping"),
        "binary.yaml": (None, "not valid YAML"),
    }
    for name, (text, reason) in cases.items():
        path = tmp_path / name
        if text is None:
            path.write_bytes(b"\xff\xfe\x00garbage\x00")
        else:
            path.write_text(text)
        out = tmp_path / f"run_{name}"
        code, err = _pretrain(capsys, "--config", path, "--out", out)
        assert code == 2, (name, err)
        assert str(path) in err and reason in err, (name, err)
        assert not out.exists(), name  # refused before anything was written
    assert not marker.exists()


def _config_in_subprocess(path: Path) -> subprocess.CompletedProcess:
    """make_config on ``path`` in a child allowed 256 MB more memory once imported, and 20 s."""
    code = ("import resource, sys\nfrom swav.config import ConfigError, make_config\n"
            "vm = int(open('/proc/self/status').read().split('VmSize:')[1].split()[0]) * 1024 + (256 << 20)\n"
            "resource.setrlimit(resource.RLIMIT_AS, (vm, vm))\n"
            "try:\n    make_config('smoke', config_file=sys.argv[1])\n"
            "except ConfigError as e:\n    print(str(e)[:2000], file=sys.stderr); sys.exit(2)\n")
    try:
        return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=20,
                              env=cli_env())
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess([], -1, "", "timed out after 20 s")


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    """'Billion laughs': 1 KB of YAML whose aliases expand to 9**9 strings."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(lines) + "\ndata:\n  source: *a8\n")
    proc = _config_in_subprocess(path)
    assert proc.returncode == 2 and "laughs.yaml" in proc.stderr, proc.stderr[-500:]


def test_deeply_nested_yaml_is_refused(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("data: " + "[" * 5_000 + "]" * 5_000 + "\n")
    proc = _config_in_subprocess(path)
    assert proc.returncode == 2 and "deep.yaml" in proc.stderr, proc.stderr[-500:]


def test_file_list_with_nul_bytes_or_oversized_is_refused_before_training(tmp_path, capsys, monkeypatch):
    nul = tmp_path / "nul.txt"
    nul.write_bytes(b"a.png\nb\x00.png\n")
    out = tmp_path / "run1"
    code, err = _pretrain(capsys, "--data", nul, "--out", out, "--set", "model.in_chans=3",
                          "--set", "augment.mean=[0.5,0.5,0.5]", "--set", "augment.std=[0.25,0.25,0.25]")
    assert code == 2 and "data.source" in err and "line 2: NUL byte" in err, err
    assert not (out / "checkpoint.pt").exists()
    big = tmp_path / "big.txt"
    big.write_text("a.png\n" * 200)
    monkeypatch.setattr(dsmod, "MAX_LIST_FILE_BYTES", 1000)
    out = tmp_path / "run2"
    code, err = _pretrain(capsys, "--data", big, "--out", out, "--set", "model.in_chans=3",
                          "--set", "augment.mean=[0.5,0.5,0.5]", "--set", "augment.std=[0.25,0.25,0.25]")
    assert code == 2 and "1200 bytes, over the 1000 byte limit" in err, err
    assert not (out / "checkpoint.pt").exists()


def test_file_list_entries_are_only_ever_opened_as_paths(tmp_path):
    marker = tmp_path / "MARKER"
    lst = tmp_path / "list.txt"
    lst.write_text(f"$(touch {marker})\n`touch {marker}`\n; touch {marker}\n|touch {marker}\n")
    ds = FileListDataset(lst)
    out = [ds[i] for i in range(len(ds))]
    assert all(isinstance(s, Skipped) and s.reason == "file not found" for s in out)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# no code path that could run code from a file
# --------------------------------------------------------------------------------------------
_FORBIDDEN = {("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("marshal", "loads"),
              ("marshal", "load"), ("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"),
              ("yaml", "load_all"), ("yaml", "unsafe_load_all"), ("dill", "load"), ("shelve", "open")}


def test_source_reads_files_only_in_safe_ways():
    """Every torch.load in src/swav passes weights_only=True; no pickle/marshal/yaml.load/eval/exec;
    np.load never with allow_pickle=True."""
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f, where = node.func, f"{path.relative_to(REPO)}:{node.lineno}"
            kw = {k.arg: k.value for k in node.keywords}
            if isinstance(f, ast.Name) and f.id in ("eval", "exec", "__import__"):
                problems.append(f"{where}: {f.id}()")
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                mod, name = f.value.id, f.attr
                if (mod, name) in _FORBIDDEN:
                    problems.append(f"{where}: {mod}.{name}()")
                if mod == "torch" and name == "load":
                    w = kw.get("weights_only")
                    if not (isinstance(w, ast.Constant) and w.value is True):
                        problems.append(f"{where}: torch.load without weights_only=True")
                if mod in ("np", "numpy") and name == "load":
                    a = kw.get("allow_pickle")
                    if a is not None and not (isinstance(a, ast.Constant) and a.value is False):
                        problems.append(f"{where}: np.load with allow_pickle")
    assert not problems, "\n".join(problems)
