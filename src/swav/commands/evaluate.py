"""``swav eval {knn,linear,finetune,clusters}``, ``swav cluster``, ``swav embed``, ``swav export``.

The functions here only read arguments, call :mod:`swav.eval` and print; the work is in the library.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import shlex
import sys

__all__ = ["register"]

CHECKPOINT_HELP = ("a run checkpoint (RUN_DIR/checkpoint.pt, or the run folder itself; any backbone: our "
                   "ResNets, timm/..., torchvision/...), an official SwAV release file (RN50 or wide, with or "
                   "without 'module.'), or a torchvision-layout ResNet state dict (.pt or .safetensors); the "
                   "kind is read off the keys")


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------

def _command_line(args) -> str:
    """The command as typed (from sys.argv when it is this command), else rebuilt from ``args``."""
    words = list(args._words)
    argv = sys.argv[1:]
    if argv[:len(words)] == words:
        return shlex.join(["swav", *argv])
    parts = ["swav", *words, args.checkpoint]
    skip = {"func", "_words", "checkpoint", "json", "quiet"}
    for key, value in sorted(vars(args).items()):
        if key in skip or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, (list, tuple)):
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def _with_logging(func):
    """Set up the console log (warnings only with --json or --quiet) before running the command.
    What the command raises is turned into an exit code and a one-line message by
    ``swav.commands.run`` (the policy of every command: swav.commands.EXIT_CODES)."""

    @functools.wraps(func)
    def wrapper(args) -> int:
        from swav.monitor import setup_logging

        logger = setup_logging(None, 0)
        if getattr(args, "json", False) or getattr(args, "quiet", False):
            logger.setLevel(logging.WARNING)
        return func(args)

    return wrapper


def _add_common(p: argparse.ArgumentParser, eval_command: bool = True) -> None:
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--data", metavar="SOURCE", default=None,
                   help="a built-in name (fashion-mnist, cifar10, cifar100, stl10), a folder or a file list; "
                        "default: the run's own source (needed for released files)")
    p.add_argument("--data-root", metavar="DIR", default=None, help="where built-in data sets live "
                                                                     "(default: the run's data.root, then the usual search)")
    p.add_argument("--size", type=int, default=None, metavar="PX",
                   help="input crop size; default: the whole image of fixed-size built-ins (native size), "
                        "else the run's large crops, else 224 (resize to size/0.875 + centre crop)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="image-decoding worker processes (default: the run's data.workers, else 2)")
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU when there is one), cpu, cuda, cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    if eval_command:
        p.add_argument("--feature-batch", type=int, default=256, metavar="N",
                       help="images per forward pass when extracting features (default 256)")
        p.add_argument("--compare-init", action=argparse.BooleanOptionalAction, default=None,
                       help="also evaluate the same architecture at initialisation, with the same recipe "
                            "(default: on for run checkpoints, which rebuild exactly the network the run "
                            "started from; off for released files, seed 0)")
        p.add_argument("--out", metavar="PATH", default=None,
                       help="result JSON file (or a folder for NAME.json); default RUN_DIR/eval/NAME.json for a "
                            "run checkpoint, else ./NAME.json")
        p.add_argument("--json", action="store_true",
                       help="print exactly one JSON object (the result record) on stdout; the table goes to stderr")


def _options(args):
    from swav.eval.runner import EvalOptions

    return EvalOptions(checkpoint=args.checkpoint, data=args.data, data_root=args.data_root, size=args.size,
                       workers=args.workers, feature_batch=args.feature_batch, device=args.device,
                       compare_init=args.compare_init, out=args.out,
                       progress=not (args.quiet or args.json))


def _report(args, name: str, record: dict, path) -> int:
    from swav.eval.results import format_table
    from swav.eval.runner import UNITS

    title = f"swav eval {name.replace('-', ' (', 1) + ')' if '-' in name else name} | {record['dataset']} | " \
            f"{record['checkpoint']}"
    table = format_table(title, record["metrics"], record.get("init_metrics"), UNITS)
    tail = f"{record['seconds']:.1f} s; result written to {path}"
    if args.json:
        print(table + "\n" + tail, file=sys.stderr)
        print(json.dumps(record))
    else:
        print(table)
        print(tail)
    sys.stdout.flush()
    return 0


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


# --------------------------------------------------------------------------------------
# eval sub-commands
# --------------------------------------------------------------------------------------

@_with_logging
def _cmd_knn(args) -> int:
    from swav.eval.runner import knn_task, run_evaluation

    task = knn_task(tuple(args.k), args.temperature, args.max_train, args.max_test)
    record, path = run_evaluation("knn", task, _options(args), _command_line(args))
    return _report(args, "knn", record, path)


@_with_logging
def _cmd_linear(args) -> int:
    from swav.eval.runner import linear_task, run_evaluation

    task = linear_task(args.epochs, args.lr, args.batch_size, args.weight_decay, args.cache_views,
                       not args.no_augment, args.min_scale, args.seed, args.max_train, args.max_test)
    record, path = run_evaluation("linear", task, _options(args), _command_line(args))
    return _report(args, "linear", record, path)


@_with_logging
def _cmd_finetune(args) -> int:
    from swav.eval.runner import percent_label, finetune_task, run_evaluation

    task = finetune_task(args.percent, args.subset_file, args.subset_seed, args.epochs, args.lr_trunk, args.lr_head,
                         args.batch_size, args.min_scale, args.seed, args.max_test)
    name = f"finetune-{percent_label(args.percent)}%"
    record, path = run_evaluation(name.replace("%", "pct"), task, _options(args), _command_line(args))
    return _report(args, name, record, path)


@_with_logging
def _cmd_clusters(args) -> int:
    from swav.eval.runner import clusters_task, run_evaluation

    task = clusters_task(args.assign, args.head, args.epsilon, args.sinkhorn_iterations, args.max_test)
    record, path = run_evaluation("clusters", task, _options(args), _command_line(args))
    return _report(args, "clusters", record, path)


# --------------------------------------------------------------------------------------
# cluster / embed / export
# --------------------------------------------------------------------------------------

def _folder_inputs(args):
    from swav.device import resolve_device
    from swav.eval.data import eval_data_for, files_dataset
    from swav.eval.weights import load_weights

    loaded = load_weights(args.checkpoint)
    data = eval_data_for(loaded, args.data, args.data_root, args.size, args.workers, args.batch_size)
    dataset = files_dataset(data.source, data.in_chans, root=data.root, split=args.split,
                            min_size=data.min_size, max_side=data.max_side)
    return loaded, data, dataset, resolve_device(args.device)


def _skip_summary(command: str, n_ok: int, n_skipped: int, total: int) -> int:
    from swav.commands import EXIT_FAILURE, EXIT_OK

    if n_skipped:
        print(f"swav {command}: {n_skipped} of {total} file(s) skipped as unusable (see the warnings above)",
              file=sys.stderr)
    if n_ok == 0:
        print(f"swav {command}: error: none of the {total} file(s) could be used", file=sys.stderr)
        return EXIT_FAILURE  # the folder was read and the work done: every file failed to decode
    return EXIT_OK


@_with_logging
def _cmd_cluster(args) -> int:
    from swav.eval.embed import cluster_images

    loaded, data, dataset, device = _folder_inputs(args)
    res = cluster_images(loaded, dataset, data, args.out, device, method=args.assign, head=args.head,
                         epsilon=args.epsilon, iterations=args.sinkhorn_iterations, progress=not args.quiet)
    print(f"{res['images']} image(s) assigned to {res['prototypes_used']} of {res['prototypes']} prototypes "
          f"in {res['seconds']:.1f} s; written to {args.out}")
    return _skip_summary("cluster", res["images"], res["skipped"], len(dataset))


@_with_logging
def _cmd_embed(args) -> int:
    from swav.eval.embed import embed_images

    loaded, data, dataset, device = _folder_inputs(args)
    res = embed_images(loaded, dataset, data, args.out, device, features=args.features, progress=not args.quiet)
    print(f"{res['images']} image(s) -> {args.out}/features.npy ({res['images']} x {res['dim']} float32, "
          f"{res['features']} features) and files.txt, in {res['seconds']:.1f} s")
    return _skip_summary("embed", res["images"], res["skipped"], len(dataset))


_EXPORT_WHAT = {"official": "whole model, official SwAV layout with 'module.' prefixes",
                "onnx": "backbone as ONNX, dynamic batch axis"}


@_with_logging
def _cmd_export(args) -> int:
    from swav.eval.weights import export_weights, load_weights

    loaded = load_weights(args.checkpoint)
    path = export_weights(loaded, args.format, args.out, size=args.size)
    what = _EXPORT_WHAT.get(args.format, f"backbone, {loaded.family.layout} key names, no classifier")
    removed = getattr(loaded.backbone, "classifier", "")
    hint = f"; in {loaded.family.name}'s own model replace {removed} by torch.nn.Identity() first" if removed \
        and args.format != "onnx" else ""
    print(f"{loaded.info} -> {path} ({what}{hint})")
    return 0


def _folder_parser(sub, name: str, help_text: str, out_help: str, out_required: bool = False):
    p = sub.add_parser(name, help=help_text, description=help_text)
    _add_common(p, eval_command=False)
    p.add_argument("--out", required=out_required, default=None if out_required else "assignments.csv",
                   metavar="PATH", help=out_help)
    p.add_argument("--split", default="train", choices=("train", "test", "unlabeled"),
                   help="split of a built-in data set (folders and file lists are used whole)")
    p.add_argument("--batch-size", type=_positive(int), default=256, metavar="N", help="images per forward pass")
    return p


def register(sub) -> None:
    """Add ``eval``, ``cluster``, ``embed`` and ``export`` to ``sub`` (an argparse subparsers object)."""
    ev = sub.add_parser("eval", help="evaluate a backbone: knn, linear, finetune, clusters",
                        description="Evaluate a run checkpoint, an official SwAV file or a torchvision ResNet. "
                                    "Each command prints a table (pretrained vs the same network at "
                                    "initialisation), writes a JSON result file and with --json prints it.")
    esub = ev.add_subparsers(dest="eval_command", metavar="EVALUATION")
    ev.set_defaults(func=lambda a: (ev.print_help(), 2)[1])

    p = esub.add_parser("knn", help="weighted k-nearest-neighbour classification on frozen features",
                        description="Weighted kNN (InstDisc/DINO vote: cosine similarity, weights exp(sim/T)) on "
                                    "frozen pooled features: train split as memory, test split as queries.")
    _add_common(p)
    p.add_argument("--k", type=_positive(int), nargs="+", default=[20, 200], help="neighbours (default 20 200)")
    p.add_argument("--temperature", type=_positive(float), default=0.07, help="vote temperature T (default 0.07)")
    p.add_argument("--max-train", type=int, default=0, metavar="N",
                   help="use the first N training images as memory (0 = all; 10000 keeps it to seconds on a CPU)")
    p.add_argument("--max-test", type=int, default=0, metavar="N", help="score the first N test images (0 = all)")
    p.set_defaults(func=_cmd_knn, _words=("eval", "knn"))

    p = esub.add_parser("linear", help="linear probe on the frozen backbone (official recipe)",
                        description="Linear probe: frozen backbone in eval mode, linear layer N(0, 0.01), SGD "
                                    "momentum 0.9, weight decay 1e-6, cosine schedule, RandomResizedCrop + flip "
                                    "on the training split only. Reports last and best top-1/top-5.")
    _add_common(p)
    p.add_argument("--epochs", type=_positive(int), default=100, help="epochs (official 100)")
    p.add_argument("--lr", type=_positive(float), default=0.3, help="peak learning rate (official 0.3)")
    p.add_argument("--batch-size", type=_positive(int), default=256, help="batch size (official 256)")
    p.add_argument("--weight-decay", type=float, default=1e-6, help="weight decay (official 1e-6)")
    p.add_argument("--cache-views", type=int, default=0, metavar="V",
                   help="precompute V augmented views of every training image and cycle through them (epoch e "
                        "uses view e mod V): 100 epochs then cost V forward passes instead of 100; 0 = fresh "
                        "augmentation every epoch (official, slow on a CPU); 4-10 is usually as good")
    p.add_argument("--no-augment", action="store_true",
                   help="train on un-augmented features, computed once (fastest; usually a point or two lower)")
    p.add_argument("--min-scale", type=_positive(float), default=None,
                   help="RandomResizedCrop lower area bound (default 0.08, or 0.3 below 64 px)")
    p.add_argument("--seed", type=int, default=0, help="seed of the classifier init, order and augmentation")
    p.add_argument("--max-train", type=int, default=0, metavar="N", help="train on the first N images (0 = all)")
    p.add_argument("--max-test", type=int, default=0, metavar="N", help="score the first N test images (0 = all)")
    p.set_defaults(func=_cmd_linear, _words=("eval", "linear"))

    p = esub.add_parser("finetune", help="few-label fine-tuning of the whole network vs random initialisation",
                        description="Fine-tune the whole network with a new linear head on a class-balanced 1%% or "
                                    "10%% of the training labels (seeded, saved as a file list), and the same "
                                    "network from its initialisation on the same labels: the gain is what "
                                    "pretraining is worth with few labels.")
    _add_common(p)
    p.add_argument("--percent", type=_positive(float), default=1.0,
                   help="percent of the training labels, per class (1 or 10 in the paper; default 1)")
    p.add_argument("--subset-file", metavar="FILE", default=None,
                   help="reuse a subset file written by an earlier run instead of drawing one")
    p.add_argument("--subset-seed", type=int, default=0, help="seed of the subset draw (default 0)")
    p.add_argument("--epochs", type=_positive(int), default=20, help="epochs (official 20; lr x0.2 at 60%% and 80%%)")
    p.add_argument("--lr-trunk", type=_positive(float), default=None,
                   help="backbone learning rate (default and official: 0.02 below 5%% of the labels, else 0.01)")
    p.add_argument("--lr-head", type=_positive(float), default=None,
                   help="head learning rate (default 0.2; the paper uses 5 at 1%%, which leaves small networks "
                        "near chance)")
    p.add_argument("--batch-size", type=_positive(int), default=None,
                   help="batch size (default min(256, max(32, labelled images // 16)); the paper uses 256 on "
                        "12,800+ images)")
    p.add_argument("--min-scale", type=_positive(float), default=None,
                   help="RandomResizedCrop lower area bound (default 0.08, or 0.3 below 64 px)")
    p.add_argument("--seed", type=int, default=0, help="seed of the head init, order and augmentation")
    p.add_argument("--max-test", type=int, default=0, metavar="N", help="score the first N test images (0 = all)")
    p.set_defaults(func=_cmd_finetune, _words=("eval", "finetune"))

    p = esub.add_parser("clusters", help="the prototypes as an unsupervised classifier: NMI, ARI, purity, accuracy",
                        description="Assign each test image to a prototype (argmax, or Sinkhorn over the whole set) "
                                    "and score the assignment against the labels: NMI, ARI, purity, Hungarian "
                                    "accuracy, and the number of prototypes in use.")
    _add_common(p)
    _cluster_options(p)
    p.add_argument("--max-test", type=int, default=0, metavar="N", help="use the first N test images (0 = all)")
    p.set_defaults(func=_cmd_clusters, _words=("eval", "clusters"))

    p = _folder_parser(sub, "cluster", "assign each image of a folder to a prototype: PATH,prototype,score rows",
                       "CSV file to write (default assignments.csv)")
    _cluster_options(p)
    p.set_defaults(func=_cmd_cluster, _words=("cluster",))

    p = _folder_parser(sub, "embed", "write features of every image of a folder: features.npy + files.txt",
                       "folder to write features.npy, files.txt, skipped.txt and embed.json into", out_required=True)
    p.add_argument("--features", choices=("backbone", "projection"), default="backbone",
                   help="pooled backbone features (default) or the L2-normalised projection the prototypes score")
    p.set_defaults(func=_cmd_embed, _words=("embed",))

    _export_parser(sub)


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="write the weights as torchvision, timm, safetensors, official SwAV or ONNX files",
                       description="Export a checkpoint. 'torchvision' (our ResNets, torchvision networks) and "
                                   "'timm' (timm networks) write the backbone's state dict under its library's own "
                                   "key names (the library's model loads it with strict=True once its classifier "
                                   "is removed: timm num_classes=0; torchvision: the layer printed replaced by "
                                   "Identity); 'safetensors' the same tensors with the architecture in its "
                                   "metadata; 'official' the whole model in the layout of the SwAV releases (our "
                                   "ResNets, with 'module.' prefixes); 'onnx' the backbone as an ONNX graph "
                                   "(input 'images' N x C x SIZE x SIZE, normalised; output 'features'; N dynamic; "
                                   "pip install 'swav[onnx]').")
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--format", required=True, choices=("torchvision", "timm", "safetensors", "official", "onnx"))
    p.add_argument("--out", metavar="FILE", default=None,
                   help="file to write (default: next to the checkpoint, NAME-FORMAT.pt / .safetensors / .onnx)")
    p.add_argument("--size", type=_positive(int), default=None, metavar="PX",
                   help="onnx: the input side in pixels (default: the run's large crops, else 224)")
    p.set_defaults(func=_cmd_export, _words=("export",))


def _cluster_options(p) -> None:
    p.add_argument("--assign", choices=("argmax", "sinkhorn"), default="argmax",
                   help="argmax prototype per image (default), or Sinkhorn codes over the whole set (spreads the "
                        "images evenly over the prototypes, as in training)")
    p.add_argument("--head", type=int, default=0, help="prototype head to use when there are several (default 0)")
    p.add_argument("--epsilon", type=_positive(float), default=0.05, help="Sinkhorn epsilon (default 0.05)")
    p.add_argument("--sinkhorn-iterations", type=_positive(int), default=3, help="Sinkhorn iterations (default 3)")
