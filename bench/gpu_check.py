"""Issue 22's one prepared GPU check: every figure the issue asks of a GPU, in one call, into one JSON.

    python bench/gpu_check.py --out gpu_check.json            # on a GPU machine (16 cores), < 8 minutes
    python bench/gpu_check.py --dry-run --out dry.json        # on a CPU, tiny sizes (the test suite runs it)
    python bench/gpu_check.py --fetch-official /work/.mirror/facebookresearch+swav/repo
                                                              # export the official code into bench/.official

Parts, in this order (each one's result is written into the JSON as soon as it is known; a part that
would not fit in the time left, ``--budget-s``, is recorded as skipped):

1. ``synthetic``: ``swav bench`` of ResNet-50, 2x224 + 6x96 crops, bf16, the imagenet-bs256 recipe
   (K 3000, a full queue of 3840), synthetic images already on the GPU: batch 64 with channels_last
   off and on (train.channels_last=auto turns it on for bf16), batch 128; torch.compile on for
   batches 64 and 128 at the end (train.compile=auto turns it on on CUDA): whether the defaults
   measure faster is read off these rows.
2. ``end_to_end``: the same recipe from a generated folder of 12-MP photo-like JPEGs (bench/photos.py)
   through the training loader (``--workers`` workers, decode at the crops' size, pinned batches
   copied on a side stream), raw and after ``swav prepare``; plus the time ``swav prepare`` took.
3. ``official``: the official code (bench/official_check.py in its own process: apex stubbed, bf16
   autocast) on the same GPU and config: its step on crops already on the GPU, its per-image
   pipeline (``MultiCropDataset`` with its DataLoader workers) and its train() fed by that
   pipeline, from the same two folders. ``{"present": false}`` when bench/.official is absent
   (it is never committed; CI has none).
4. ``demo``: ``swav bench`` of the default ``fashion-mnist`` preset.
5. ``summary``: the ratios the issue names (end to end from the prepared folder against the
   synthetic step; ours against the official step and the official pipeline end to end).

Run it on a lent GPU through the device tool, carrying the official code (the tool sends the work
tree; bench/.official is ignored, so name it in ``carry``)::

    run(command="PYTHONPATH=src PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out $OUT/gpu_check.json",
        carry=["bench/.official"], timeout_s=540)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from photos import write_photos  # noqa: E402

REPO = HERE.parent
OFFICIAL = HERE / ".official"
REPEAT = 8  # each generated file is read this many times an epoch (see _long_list)
RECIPE = ["train.precision=bf16", "swav.queue_length=3840"]  # imagenet-bs256: 2x224 + 6x96, K 3000
TINY = ["augment.size_crops=[32,16]", "augment.nmb_crops=[2,2]", "model.arch=resnet18", "model.width_per_group=8",
        "model.hidden_mlp=32", "model.nmb_prototypes=20", "swav.queue_length=32", "train.precision=fp32"]


class Check:
    """The JSON being written: ``record`` adds a part and writes the file at once."""

    def __init__(self, path: Path, budget_s: float):
        self.path, self.t0, self.budget_s = path, time.perf_counter(), budget_s
        self.data: dict = {"parts": {}}

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.t0)

    def record(self, part: str, key: str, value) -> None:
        self.data["parts"].setdefault(part, {})[key] = value
        self.data["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        self.path.write_text(json.dumps(self.data, indent=1, default=str))
        print(f"[{self.data['elapsed_s']:6.1f} s] {part} / {key}: {_short(value)}", flush=True)

    def fits(self, part: str, key: str, need_s: float) -> bool:
        if self.left() >= need_s:
            return True
        self.record(part, key, {"skipped": f"{self.left():.0f} s left of the budget, about {need_s:.0f} s needed"})
        return False


def _short(value) -> str:
    if isinstance(value, dict):
        keys = ("images_per_s", "step_ms", "skipped", "present", "error", "seconds")
        return ", ".join(f"{k} {value[k]:.1f}" if isinstance(value[k], float) else f"{k} {value[k]}"
                         for k in keys if k in value) or str(value)[:200]
    return str(value)[:200]


def _bench(cfg_overrides: list[str], preset: str, *, data: str | None = None, steps: int, warmup: int,
           workers: int | None = None, batch: int | None = None, device: str) -> dict:
    """``swav bench`` in this process; the figures that matter here, or the error."""
    import torch

    from swav.benchmark import run_benchmark
    from swav.config import make_config

    flags = {"train.device": device, "train.batch_size": batch, "data.workers": workers}
    cfg = make_config(preset, overrides=cfg_overrides, **flags)
    try:
        r = run_benchmark(cfg, steps=steps, warmup=warmup, data=data, matmul_n=None if device == "cuda" else 256,
                          free_run=device == "cuda")
    except Exception as e:  # a failing variant (say, compile) is a result too
        return {"error": f"{type(e).__name__}: {e}"[:500]}
    finally:
        if hasattr(torch, "_dynamo"):
            torch._dynamo.reset()
    keep = ("images_per_s", "images_per_s_phased", "step_ms", "phases_ms", "phase_fraction", "peak_memory_mib",
            "matmul_tflops", "fraction_of_matmul_same_dtype", "channels_last", "compile", "batch_size", "crops",
            "data", "device_name", "torch", "precision")
    return {k: r[k] for k in keep if k in r}


def _long_list(folder: Path, times: int) -> Path:
    """A file list naming every image of ``folder`` ``times`` times: one long epoch over files that
    stay in the page cache (a short epoch would time the loader's start at every epoch)."""
    files = sorted(str(p) for p in folder.rglob("*.jpg"))
    path = folder.parent / f"{folder.name}-x{times}.txt"
    path.write_text("".join(f + "\n" for _ in range(times) for f in files))
    return path


def _folders(root: Path, dry: bool, procs: int) -> tuple[Path, Path, float]:
    """The generated raw folder (12-MP photo-like JPEGs; tiny ones in a dry run), its ``swav
    prepare`` output, and the seconds that prepare took."""
    n, size = (8, (320, 240)) if dry else (384, (4000, 3000))
    raw = root / f"raw-{size[0]}x{size[1]}-{n}" / "photos"
    chunks = [(raw, k, size) for k in range(0, n, 8)]
    with Pool(max(1, procs)) as pool:
        pool.starmap(_write_chunk, chunks)
    prepared = root / f"prepared-{size[0]}x{size[1]}-{n}"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "swav.cli", "prepare", str(raw.parent), "--out", str(prepared),
                    "--workers", str(procs), "--preset", "smoke" if dry else "imagenet-bs256",
                    *sum((["--set", s] for s in (TINY[:2] if dry else [])), [])],
                   check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    return raw.parent, prepared, time.perf_counter() - t0


def _write_chunk(folder: Path, start: int, size: tuple[int, int]) -> None:
    write_photos(folder, 8, size, start=start)


def _official(check: Check, args, folders: list[Path], dry: bool) -> None:
    if not (Path(args.official) / "main_swav.py").exists():
        check.record("official", "result", {"present": False, "reason": f"no official checkout at {args.official} "
                                             "(never committed: see --fetch-official)"})
        return
    probe = subprocess.run([args.official_python, "-c", "import torchvision"], capture_output=True, text=True)
    if probe.returncode:
        check.record("official", "result", {"present": True, "skipped": f"{args.official_python} has no torchvision "
                                            "(give --official-python)"})
        return
    cmd = [args.official_python, str(HERE / "official_check.py"), "--official", str(args.official),
           "--workers", str(args.workers), "--device", "cuda" if not dry else "cpu", "--repeat", str(REPEAT)]
    cmd += sum((["--data", str(f)] for f in folders), [])
    if dry:
        cmd += ["--hidden-mlp", "32", "--prototypes", "20", "--queue", "32", "--batch", "4", "--size-crops", "32",
                "16", "--nmb-crops", "2", "2", "--steps", "1", "--warmup", "1", "--precision", "fp32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(30, check.left() - 60))
    if proc.returncode:
        check.record("official", "result", {"present": True, "error": proc.stderr.strip().splitlines()[-3:]})
        return
    check.record("official", "result", {"present": True, **json.loads(proc.stdout.strip().splitlines()[-1])})


def _synthetic(check: Check, device: str, dry: bool) -> None:
    over, preset = (TINY, "smoke") if dry else (RECIPE, "imagenet-bs256")
    steps, warmup = (1, 0) if dry else (20, 10)
    batches = (8, 16) if dry else (64, 128)
    for name, cl, bs in ((f"bs{batches[0]} channels_last=false", "false", batches[0]),
                         (f"bs{batches[0]} channels_last=auto", "auto", batches[0]),
                         (f"bs{batches[1]} channels_last=auto", "auto", batches[1])):
        if check.fits("synthetic", name, 40 if not dry else 1):
            check.record("synthetic", name, _bench(over + [f"train.channels_last={cl}", "train.compile=false"],
                                                   preset, steps=steps, warmup=warmup, batch=bs, device=device))


def _compiled(check: Check, device: str, dry: bool) -> None:
    if dry:  # compiling on a CPU takes minutes: the dry run checks only that the rows are written
        check.record("synthetic", "compile=true", {"skipped": "dry run"})
        return
    for bs in (64, 128):
        if check.fits("synthetic", f"bs{bs} compile=auto", 150):
            check.record("synthetic", f"bs{bs} compile=auto", _bench(RECIPE + ["train.compile=auto"], "imagenet-bs256",
                                                                  steps=20, warmup=10, batch=bs, device=device))


def _end_to_end(check: Check, args, raw: Path, prepared: Path, device: str, dry: bool) -> None:
    over, preset = (TINY, "smoke") if dry else (RECIPE, "imagenet-bs256")
    steps, warmup, bs = (1, 0, 8) if dry else (25, 5, 64)
    for name, folder in (("raw 12-MP JPEGs", raw), ("after swav prepare", prepared)):
        if check.fits("end_to_end", name, 60 if not dry else 1):
            res = _bench(over + ["data.subset=0"], preset, data=str(_long_list(folder, REPEAT)), steps=steps,
                         warmup=warmup, workers=args.workers if not dry else 1, batch=bs, device=device)
            check.record("end_to_end", name, res)


def _summary(check: Check) -> None:
    p = check.data["parts"]

    def ips(part, key):
        v = p.get(part, {}).get(key, {})
        return v.get("images_per_s") if isinstance(v, dict) else None

    syn = max((v.get("images_per_s") or 0 for k, v in p.get("synthetic", {}).items() if isinstance(v, dict)),
              default=0)
    e2e = ips("end_to_end", "after swav prepare")
    off = p.get("official", {}).get("result", {})
    off_e2e = max((v for k, v in off.items() if k.startswith("end_to_end")), default=None)
    out = {"best synthetic images/s": syn, "end to end (prepared) images/s": e2e,
           "end to end / synthetic": e2e / syn if e2e and syn else None,
           "synthetic / official step": syn / off["step_images_per_s"] if syn and off.get("step_images_per_s") else None,
           "end to end (prepared) / official end to end (best folder)": e2e / off_e2e if e2e and off_e2e else None}
    check.record("summary", "ratios", out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks that every part runs")
    ap.add_argument("--budget-s", type=float, default=450.0, help="stop starting parts after this (default 450)")
    ap.add_argument("--workers", type=int, default=min(12, max(1, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--data-dir", default="/tmp/swav-gpu-check")
    ap.add_argument("--official", default=str(OFFICIAL))
    ap.add_argument("--official-python", default=sys.executable, help="a Python with torchvision for the official code")
    ap.add_argument("--fetch-official", metavar="GITDIR", help="export the official repository into bench/.official")
    args = ap.parse_args()
    if args.fetch_official:
        OFFICIAL.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "--git-dir", args.fetch_official, "archive", "HEAD"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(OFFICIAL)], input=archive, check=True)
        print(f"official code exported into {OFFICIAL} (ignored by git; carry it to the GPU machine)")
        return
    _run(args)


def _run(args) -> None:
    import torch

    sys.path.insert(0, str(REPO / "src"))
    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    if not dry and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: run with --dry-run on a CPU")
    check = Check(Path(args.out), args.budget_s)
    check.data["meta"] = {"dry_run": dry, "torch": torch.__version__, "cpus": os.cpu_count(),
                          "gpu": torch.cuda.get_device_name(0) if not dry else None, "workers": args.workers,
                          "triton": _has("triton"), "torchvision": _has("torchvision")}
    _synthetic(check, device, dry)
    raw, prepared, prep_s = _folders(Path(args.data_dir), dry, args.workers)
    check.record("end_to_end", "swav prepare", {"seconds": prep_s, "folder": str(raw)})
    _end_to_end(check, args, raw, prepared, device, dry)
    if check.fits("official", "result", 90 if not dry else 1):
        _official(check, args, [raw, prepared], dry)
    if check.fits("demo", "fashion-mnist", 30 if not dry else 1):
        check.record("demo", "fashion-mnist", _bench(["train.channels_last=auto"] + (["data.subset=64"] if dry else []),
                                                     "fashion-mnist" if not dry else "smoke", steps=20 if not dry else 1,
                                                     warmup=5 if not dry else 0, device=device))
    _summary(check)
    _compiled(check, device, dry)
    _summary(check)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    main()
