"""The evaluations as tasks, and the one function that runs a task on a checkpoint (and on the same
architecture at initialisation), times it and writes the result file.

A task is ``task(weights, data, device, ctx) -> {metric: value}``; ``ctx.tag`` is ``"pretrained"``
or ``"init"`` and ``ctx.result_path`` is where the JSON result will go (tasks may put side files,
like the few-label subset, next to it).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from swav.device import resolve_device
from swav.eval.data import BatchStream, eval_data_for, extract, num_classes_of, progress_printer
from swav.eval.results import Timer, make_record, result_path, write_result
from swav.eval.weights import LoadedWeights, load_weights

__all__ = ["EvalOptions", "TaskContext", "run_evaluation", "knn_task", "linear_task", "finetune_task",
           "clusters_task", "UNITS"]

log = logging.getLogger("swav")

#: units shown next to metric names in tables
UNITS = {"nmi": "0-1", "ari": "0-1", "purity": "%", "hungarian_acc": "%", "prototypes_used": "count"}


@dataclass
class EvalOptions:
    checkpoint: str
    data: str | None = None
    data_root: str | None = None
    size: int | None = None
    workers: int | None = None
    feature_batch: int = 256
    device: str = "auto"
    compare_init: bool | None = None  # None: on for run checkpoints, off for released files
    out: str | None = None
    progress: bool = True


@dataclass
class TaskContext:
    tag: str
    result_path: Path
    progress: bool = True


Task = Callable[[LoadedWeights, object, torch.device, TaskContext], dict]


def run_evaluation(name: str, task: Task, opts: EvalOptions, command: str) -> tuple[dict, Path]:
    """Run ``task`` on the checkpoint (and at initialisation when asked); write and return the
    result record and its path."""
    timer = Timer()
    loaded = load_weights(opts.checkpoint)
    log.info("%s: %s", loaded.path, loaded.info)
    data = eval_data_for(loaded, opts.data, opts.data_root, opts.size, opts.workers, opts.feature_batch)
    device = resolve_device(opts.device)
    compare = opts.compare_init if opts.compare_init is not None else loaded.kind == "run"
    path = result_path(loaded, name, opts.out)
    metrics = task(loaded, data, device, TaskContext("pretrained", path, opts.progress))
    init_metrics = None
    if compare:
        log.info("%s: the same network at initialisation", name)
        init_metrics = task(loaded.fresh(), data, device, TaskContext("init", path, opts.progress))
    record = make_record(command, metrics, init_metrics, data.source, loaded.path, timer.seconds)
    write_result(record, path)
    return record, path


def _clean_metrics(d: dict) -> dict:
    return {k: float(v) for k, v in d.items() if not isinstance(v, str)}


# --------------------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------------------

def knn_task(ks=(20, 200), temperature: float = 0.07, max_train: int = 0, max_test: int = 0) -> Task:
    """Weighted kNN (cosine, exp(sim / T) votes) with the train split as memory."""
    from swav.eval.knn import knn_accuracy

    def run(w, data, device, ctx):
        tr, te = data.labelled("train", max_train), data.labelled("test", max_test)
        ftr, ltr, _ = extract(w.backbone, data, tr, device, f"kNN ({ctx.tag}): train features", ctx.progress)
        fte, lte, _ = extract(w.backbone, data, te, device, f"kNN ({ctx.tag}): test features", ctx.progress)
        res = knn_accuracy(ftr, ltr, fte, lte, num_classes_of(ltr, lte, dataset=tr), ks=tuple(ks),
                           temperature=temperature)
        if "note" in res:
            log.warning("kNN: %s", res["note"])
        return _clean_metrics(res)

    return run


def linear_task(epochs: int = 100, lr: float = 0.3, batch_size: int = 256, weight_decay: float = 1e-6,
                cache_views: int = 0, augment: bool = True, min_scale: float | None = None, seed: int = 0,
                max_train: int = 0, max_test: int = 0) -> Task:
    """The linear probe; ``cache_views > 0`` precomputes that many augmented views, ``augment=False``
    trains on the plain (eval-transform) features, computed once."""
    from swav.eval.linear import (AugmentedFeatures, CachedFeatures, cache_augmented_views,
                                  probe_augmentation, train_linear_classifier)

    def run(w, data, device, ctx):
        tr, te = data.labelled("train", max_train), data.labelled("test", max_test)
        backbone = w.backbone.to(device)
        fte, lte, _ = extract(backbone, data, te, device, f"linear ({ctx.tag}): test features", ctx.progress)
        size = data.crop_size(tr)
        scale = min_scale if min_scale is not None else (0.08 if size >= 64 else 0.3)
        aug = probe_augmentation(size, data.mean, data.std, data.in_chans, scale)
        if not augment:
            ftr, ltr, _ = extract(backbone, data, tr, device, f"linear ({ctx.tag}): train features", ctx.progress)
            source = CachedFeatures(ftr, ltr)
        elif cache_views > 0:
            feats, ltr = cache_augmented_views(
                backbone, lambda: BatchStream(data.loader(tr), progress_printer(
                    f"linear ({ctx.tag}): augmented train features", ctx.progress)), aug, device, cache_views, seed)
            source = CachedFeatures(feats, ltr)
        else:
            ltr = tr.labels
            source = AugmentedFeatures(backbone, tr, aug, device, backbone.num_features, seed, data.workers,
                                       stream=BatchStream)
        n_cls = num_classes_of(ltr, lte, dataset=tr)
        return train_linear_classifier(source, fte, lte, n_cls, epochs=epochs, lr=lr, batch_size=batch_size,
                                       weight_decay=weight_decay, seed=seed, device=device,
                                       prefix="linear")

    return run


def finetune_task(percent: float = 1.0, subset_file: str | None = None, subset_seed: int = 0, epochs: int = 20,
                  lr_trunk: float | None = None, lr_head: float | None = None, batch_size: int | None = None,
                  min_scale: float | None = None, seed: int = 0, max_test: int = 0) -> Task:
    """Few-label fine-tuning of the whole network on a class-balanced subset (the same subset for
    the pretrained and the initial network)."""
    from swav.eval.finetune import (balanced_subset, default_lrs, finetune, read_subset_file,
                                    subset_dataset, write_subset_file)

    d_trunk, d_head = default_lrs(percent)
    lr_t = d_trunk if lr_trunk is None else lr_trunk
    lr_h = d_head if lr_head is None else lr_head
    state: dict = {}

    def run(w, data, device, ctx):
        tr, te = data.labelled("train"), data.labelled("test", max_test)
        if "subset" not in state:
            if subset_file:
                idx = read_subset_file(subset_file, tr)
                log.info("finetune: %d labelled images from %s", len(idx), subset_file)
            else:
                idx = balanced_subset(tr.labels, percent / 100.0, subset_seed)
                f = ctx.result_path.parent / f"finetune-subset-{percent_label(percent)}pct-seed{subset_seed}.txt"
                write_subset_file(f, tr, idx, f"source={data.source} split=train percent={percent_label(percent)} "
                                              f"seed={subset_seed} images={len(idx)}")
                log.info("finetune: %d labelled images (%s %% of %d, class-balanced, seed %d), listed in %s "
                         "(reuse it with --subset-file)", len(idx), percent_label(percent), len(tr), subset_seed, f)
            state["subset"] = subset_dataset(tr, idx)
        sub = state["subset"]
        size = data.crop_size(tr)
        scale = min_scale if min_scale is not None else (0.08 if size >= 64 else 0.3)
        n_cls = num_classes_of(tr.labels, dataset=tr)
        return finetune(w.backbone, sub, te, data, device, n_cls, epochs=epochs, lr_trunk=lr_t, lr_head=lr_h,
                        batch_size=batch_size, min_scale=scale, seed=seed, stream=BatchStream,
                        prefix=f"finetune_{percent_label(percent)}pct")

    return run


def percent_label(p: float) -> str:
    return f"{p:g}"


def clusters_task(method: str = "argmax", head: int = 0, epsilon: float = 0.05, iterations: int = 3,
                  max_test: int = 0) -> Task:
    """Prototype assignments of the test split scored against its labels."""
    from swav.eval.clusters import PrototypeScores, assign, cluster_metrics

    def run(w, data, device, ctx):
        if w.model is None:
            raise ValueError(f"{w.path} has no prototypes (a backbone-only file): eval clusters needs a run "
                             "checkpoint or an official SwAV file")
        te = data.labelled("test", max_test)
        scores, labels, _ = extract(PrototypeScores(w.model, head), data, te, device,
                                    f"clusters ({ctx.tag}): prototype scores", ctx.progress)
        pred, _ = assign(scores, method, epsilon, iterations)
        return cluster_metrics(pred.numpy(), labels.numpy())

    return run
