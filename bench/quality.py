"""Quality per unit of time: pretrain for a fixed wall-clock budget, then kNN and linear accuracy.

    python bench/quality.py --minutes 3                                   # the CPU demo preset
    python bench/quality.py --minutes 3 --variant base: \\
        --variant wide:model.width_per_group=32 --variant k300:model.nmb_prototypes=300
    python bench/quality.py --preset fashion-mnist --device cuda --minutes 10 --set train.batch_size=512
    python bench/quality.py --minutes 2.5,5,10,20,40 --no-linear          # a learning curve
    python bench/quality.py --minutes 0 --set train.epochs=6 --jobs 8 --device cuda \
        --variant base: --variant lr1.2:optim.lr=1.2                      # fixed steps, in parallel

Each variant is a list of ``key=value`` settings (comma-separated) on top of the preset and the
``--set`` options; variants run one after another (never in parallel: they would share the CPU),
each with the same budget (``train.time_budget_minutes``: the trainer times its first steps and
fits the number of steps to the budget). With ``--minutes 0`` every variant trains a fixed number
of steps (``train.epochs``), which does not depend on the speed of the machine: only then may
``--jobs N`` run N variants at once, each in its own process (a screen on a GPU). After training it reports the trainer's own final kNN
(weighted k=20 on the test split, the learned backbone next to the same backbone at
initialisation) and, unless ``--no-linear``, a linear probe: a linear classifier trained on frozen,
standardised pooled features of the train split (full-batch L-BFGS with a little weight decay),
tested on the test split. Prints a table, and with ``--json FILE`` writes every result.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from swav.config import make_config


def linear_probe(backbone, cfg, device, max_train: int = 0, epochs: int = 100, wd: float = 1e-4) -> dict:
    """Top-1 % of a linear classifier on frozen pooled features (train split -> test split), with the
    features of the evaluation commands (swav.eval.data: the same images, transform and crop size)."""
    from swav.eval.compare import standardise
    from swav.eval.data import EvalData, extract

    data = EvalData.from_config(cfg, batch_size=512)

    def feats(split, limit=0):
        f, y, _ = extract(backbone, data, data.labelled(split, limit), device, f"probe features ({split})",
                          progress=False)
        return f, y

    t0 = time.perf_counter()
    ftr, ytr = feats("train", max_train)
    fte, yte = feats("test")
    ftr, fte = standardise(ftr, fte)
    n_cls = int(max(ytr.max(), yte.max())) + 1
    lin = torch.nn.Linear(ftr.shape[1], n_cls)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=epochs, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(ftr), ytr) + wd * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        acc = (lin(fte).argmax(1) == yte).float().mean().item() * 100
        acc_tr = (lin(ftr).argmax(1) == ytr).float().mean().item() * 100
    return {"linear_top1": acc, "linear_train_top1": acc_tr, "linear_seconds": time.perf_counter() - t0}


def run_variant(name: str, settings: list[str], args) -> dict:
    from swav.trainer import build_model, train

    out = Path(args.out) / name
    if out.exists() and not args.resume:
        import shutil
        shutil.rmtree(out)
    overrides = list(args.set) + settings + [f"train.time_budget_minutes={args.minutes}", "train.final_knn=true",
                                             f"out={out}"]
    if args.device:
        overrides.append(f"train.device={args.device}")
    cfg = make_config(args.preset, overrides=overrides)
    print(f"== {name}: {args.preset} {' '.join(settings) or '(preset as is)'}, {args.minutes} min", flush=True)
    t0 = time.perf_counter()
    res = train(cfg)
    train_s = res.seconds
    row = {"name": name, "preset": args.preset, "settings": settings + list(args.set), "minutes": args.minutes,
           "epochs": res.epochs, "steps": res.global_step, "train_and_knn_seconds": train_s, "last_loss": res.last_loss,
           "threads": torch.get_num_threads()}
    if res.final is not None:
        row["knn_top1"] = res.final.knn["learned"]
        row["knn_init_top1"] = res.final.knn["init"]
        row["knn_pixels_top1"] = res.final.knn["pixels"]
        row.update({f"final_linear_{s}": v for s, v in res.final.linear.items()})
    if not args.no_linear:
        from swav.checkpoint import load_run_state
        state = load_run_state(out / "checkpoint.pt")
        model = build_model(cfg)
        model.load_state_dict(state["model"])
        dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        row.update(linear_probe(model.backbone.to(dev), cfg, dev, args.linear_max_train))
    row["wall_seconds"] = time.perf_counter() - t0
    print(json.dumps(row), flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="fashion-mnist")
    ap.add_argument("--minutes", default="3", metavar="M[,M...]",
                    help="training budget per variant (default 3); several (e.g. 2.5,5,10,20,40) give a "
                         "learning curve: one separate run per budget, each with its schedule fitted to it")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:K=V,K=V",
                    help="a named set of settings (repeatable); default: the preset as is")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="settings for every variant")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default="/tmp/swav-quality")
    ap.add_argument("--resume", action="store_true", help="keep existing run folders (resume them)")
    ap.add_argument("--no-linear", action="store_true")
    ap.add_argument("--linear-max-train", type=int, default=0, help="train the probe on at most N images")
    ap.add_argument("--json", metavar="FILE", help="append the results (one JSON object per line)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="with --minutes 0 (fixed steps) only: run this many variants at once, one process each")
    args = ap.parse_args(argv)
    variants = []
    for v in args.variant or ["base:"]:
        name, _, rest = v.partition(":")
        # split on the commas that start a new KEY=, not on those inside [0.5,0.2]
        variants.append((name, [s for s in re.split(r",(?=[A-Za-z_.]+=)", rest) if s]))
    budgets = [float(m) for m in str(args.minutes).split(",") if m.strip()]
    if not budgets or min(budgets) < 0:
        ap.error(f"--minutes: give budgets >= 0, comma-separated (got {args.minutes!r})")
    if args.jobs > 1:
        if budgets != [0.0]:
            ap.error("--jobs > 1 needs --minutes 0: variants that share the machine would distort a time budget")
        rows = run_parallel(args, argv if argv is not None else sys.argv[1:])
        print_table(rows)
        return 0
    rows = []
    for minutes in budgets:
        for name, settings in variants:
            label = name if len(budgets) == 1 else f"{name}@{minutes:g}min"
            row = run_variant(label, settings, argparse.Namespace(**{**vars(args), "minutes": minutes}))
            rows.append(row)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
    print_table(rows)
    return 0


def run_parallel(args, argv: list[str]) -> list[dict]:
    """Each ``--variant`` in a child process of this script (``--jobs`` at a time, each with its share
    of the CPU threads); their rows, in the order of the variants."""
    import os
    import subprocess
    import tempfile

    common, skip = [], False
    for i, a in enumerate(argv):  # drop --variant/--jobs/--json (and their values): set per child
        if skip:
            skip = False
            continue
        key = a.split("=", 1)[0]
        if key in ("--variant", "--jobs", "--json"):
            skip = "=" not in a
            continue
        common.append(a)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    tmp = Path(tempfile.mkdtemp(prefix="quality-jobs-"))
    pending, running, rows = list(enumerate(args.variant or ["base:"])), [], {}
    while pending or running:
        while pending and len(running) < args.jobs:
            i, v = pending.pop(0)
            log = open(tmp / f"{i}.log", "w")
            cmd = [sys.executable, __file__, *common, "--variant", v, "--json", str(tmp / f"{i}.jsonl")]
            running.append((i, v, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
            print(f"started {v} (log {tmp / f'{i}.log'})", flush=True)
        time.sleep(1.0)
        for job in [j for j in running if j[2].poll() is not None]:
            i, v, proc, log = job
            running.remove(job)
            log.close()
            out = tmp / f"{i}.jsonl"
            if proc.returncode != 0 or not out.exists():
                print(f"FAILED {v} (exit {proc.returncode}); its log: {tmp / f'{i}.log'}", flush=True)
                continue
            rows[i] = json.loads(out.read_text().splitlines()[-1])
            print(json.dumps(rows[i]), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(rows[i]) + "\n")
    return [rows[i] for i in sorted(rows)]


def print_table(rows: list[dict]) -> None:
    print(f"\n{'variant':18s} {'min':>5s} {'epochs':>6s} {'steps':>6s} {'kNN':>7s} {'init':>7s} {'pixels':>7s} "
          f"{'linear':>7s}  settings")
    for r in rows:
        print(f"{r['name']:18s} {r['minutes']:5g} {r['epochs']:6d} {r['steps']:6d} {r.get('knn_top1', float('nan')):7.2f} "
              f"{r.get('knn_init_top1', float('nan')):7.2f} {r.get('knn_pixels_top1', float('nan')):7.2f} "
              f"{r.get('linear_top1', r.get('final_linear_learned', float('nan'))):7.2f}  "
              f"{' '.join(r['settings'])}")


if __name__ == "__main__":
    sys.exit(main())
