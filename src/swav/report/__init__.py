"""The run report: one self-contained HTML page that shows what a SwAV run did and what it learned.

``write_report(run_dir)`` reads a run folder (``run.json``, ``config.yaml``, ``checkpoint.pt``,
``metrics.jsonl``, ``eval/*.json``; never the human log ``log.txt``, whose wording may change) and
writes ``run_dir/report.html`` with these sections (element ids in brackets):

* run [run]: status, steps, wall time, resumes, version, processes, device and precision of the
  training machine, time budget (from ``run.json`` and the checkpoint), the run's warnings (from
  ``run.json``), and the machine the report was made on;
* training curves [curves]: loss with the ln K collapse line, learning rate, images/s with the
  data-wait fraction, prototype usage, code entropies, online kNN when it ran;
* prototypes [prototypes]: the most used prototypes, each with the training images that score
  highest against it, and how all sampled images spread over the prototypes;
* embedding map [embedding-map]: t-SNE of backbone features of test images, coloured by label,
  with a few thumbnails;
* evaluations [evaluations]: every ``eval/*.json`` and the end-of-training kNN, with commands;
* configuration [config]: the run's settings as YAML.

Each section says what is missing instead of failing: a run without a checkpoint yet gets curves
only, a data source without labels an uncoloured map, a source without a test split a map of
training images. Images are PNGs inside the file (base64); the page needs no network and no script.
"""
from __future__ import annotations

import contextlib

import logging
import math
import os
import time
from pathlib import Path
from typing import Any


from swav.atomic import write_text_atomic
from swav.report.html import SECTION_IDS, GalleryRowView, Page, render
from swav.report.runinfo import RunFacts, format_seconds, read_run, report_environment

__all__ = ["write_report", "build_page", "SECTION_IDS", "REPORT_NAME"]

log = logging.getLogger("swav")

REPORT_NAME = "report.html"


def _pick_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _first_k(nmb) -> int | None:
    if isinstance(nmb, (list, tuple)):
        return int(nmb[0]) if nmb else None
    return int(nmb) if nmb else None


def _stamp(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "?"


def _millions(n: int) -> str:
    return f"{n / 1e6:.3g}M parameters"


def _budget_row(facts: RunFacts, cfg) -> str | None:
    """The time budget and what it was fitted to (run.json, else the config and the checkpoint)."""
    rec, ckpt = facts.record, facts.checkpoint or {}
    minutes = rec.budget_minutes if rec is not None else (cfg.train.time_budget_minutes if cfg is not None else 0)
    if not minutes or minutes <= 0:
        return None
    fitted = ckpt.get("budget_fitted", rec.budget_fitted if rec is not None else None)
    text = f"{minutes:g} min"
    if fitted is False:
        return text + ": not fitted yet (the run stopped during its first, timed steps; a resume fits it)"
    total, spe = facts.total_steps, facts.steps_per_epoch
    if total and fitted:
        text += f": fitted to {total} steps"
        if spe:
            text += f" ({total / spe:.2f} epochs)"
    if rec is not None and rec.seconds_per_step is not None:
        text += f" at a measured {rec.seconds_per_step:.3f} s/step"
    return text + (" (from run.json)" if rec is not None else " (from the config; run.json is missing)")


def _run_rows(facts: RunFacts, cfg) -> tuple[list[tuple[str, str]], str]:
    rows: list[tuple[str, str]] = []
    rec = facts.record
    spe = facts.steps_per_epoch
    step, total = facts.global_step, facts.total_steps
    if facts.finished is True:
        status = f"finished: {step} of {total} steps"
    elif facts.finished is False:
        signal = (" (stopped by a signal, e.g. pre-emption)"
                  if rec is not None and rec.stopped_by_signal and rec.global_step == step else "")
        status = f"unfinished: step {step} of {total}{signal}; rerun the same `swav pretrain` command to resume"
    else:
        status = f"at step {step}" if step is not None else "no training step recorded yet"
    if spe and step is not None:
        epochs_total = f" of {total // spe}" if total else ""
        status += f" (epoch {step / spe:.2f}{epochs_total})"
    rows.append(("status", status))
    rows.append(("run folder", str(facts.run_dir.resolve())))

    times = [r["time"] for r in facts.metrics if isinstance(r.get("time"), (int, float))]
    first_start = rec.first_start if rec is not None and rec.first_start > 0 else None
    t0 = first_start or (min(times) if times else None)
    t1 = max(times) if times else None
    if t0 and t1:
        restarts = max(0, rec.starts - 1) if rec is not None else 0
        extra = f"; {restarts} resume(s), downtime in between included" if restarts else ""
        if rec is None:
            extra += "; resumes not known without run.json"
        since = "first start" if first_start else "first metrics record"
        rows.append(("wall time", f"{format_seconds(t1 - t0)} ({since} {_stamp(t0)} to last metrics "
                                  f"record {_stamp(t1)}{extra})"))
    elif first_start:
        rows.append(("started", f"{_stamp(first_start)} (no metrics record yet)"))
    version = (facts.checkpoint or {}).get("version") or (rec.version if rec is not None else "")
    if version:
        text = f"{version} (from {'checkpoint.pt' if (facts.checkpoint or {}).get('version') else 'run.json'})"
        if rec is not None and (rec.torch or rec.python):
            text += f"; trained with torch {rec.torch or '?'}, python {rec.python or '?'} (run.json)"
        rows.append(("swav version", text))
    world = (facts.checkpoint or {}).get("world_size") or (rec.world_size if rec is not None else None)
    if rec is not None and (rec.device or rec.host):
        hw = f"{world or '?'} process(es)"
        if rec.device:
            hw += f" on {rec.device} ({rec.precision or '?'})"
            if rec.device_name:
                hw += f", {rec.device_name}"
        if rec.host:
            hw += f", host {rec.host}"
        rows.append(("training hardware", hw + " (from run.json)"))
    elif world:
        rows.append(("training hardware", f"{world} process(es) (from checkpoint.pt; device, precision and host "
                                          "are not known without run.json)"))
    source = cfg.data.source if cfg is not None else (rec.data_source if rec is not None else "")
    if source:
        data = f"{source}"
        if rec is not None and rec.images:
            data += f": {rec.images} training images"
        batch = cfg.train.batch_size if cfg is not None else (rec.global_batch if rec is not None else 0)
        if batch:
            data += f", global batch {batch}"
        if spe:
            data += f", {spe} steps per epoch"
        rows.append(("data", data))
    if cfg is not None:
        k = _first_k(cfg.model.nmb_prototypes)
        model = _model_text(cfg, rec)
        rows.append(("model", model))
        crops = " + ".join(f"{n}x{s}" for n, s in zip(cfg.augment.nmb_crops, cfg.augment.size_crops))
        rows.append(("recipe", f"preset {cfg.preset or '(none)'}; crops {crops}; {cfg.optim.optimizer} lr "
                               f"{cfg.optim.lr}; epsilon {cfg.swav.epsilon}; queue {cfg.swav.queue_length}"))
        losses = [r["loss"] for r in facts.metrics if isinstance(r.get("loss"), (int, float))]
        if losses and k:
            rows.append(("last logged loss", f"{losses[-1]:.4f} (ln K = {math.log(k):.4f})"))
    elif rec is not None and rec.arch:
        model = rec.arch + (f" ({_millions(rec.parameters)})" if rec.parameters else "")
        rows.append(("model", model + (f"; crops {rec.crops}" if rec.crops else "") + " (from run.json)"))
    budget = _budget_row(facts, cfg)
    if budget:
        rows.append(("time budget", budget))
    if facts.metrics:
        last = next((r for r in reversed(facts.metrics) if "skipped_files" in r), None)
        if last is not None:
            rows.append(("health", f"{int(last.get('skipped_files', 0))} unusable file(s) skipped, "
                                   f"{int(last.get('nonfinite_steps', 0))} non-finite step(s) skipped"))
    return rows, status


def _model_text(cfg, rec) -> str:
    """The model row: the network in its family's words (swav.models), its size, the prototypes."""
    import dataclasses

    from swav.models import family_of

    try:
        parts = family_of(cfg.model.arch).describe(cfg.model.arch, dataclasses.asdict(cfg.model))
    except ValueError:  # an arch this swav does not know (a newer or older version's run)
        parts = []
    if cfg.model.init_from:
        parts.append(f"started from {cfg.model.init_from}")
    if rec is not None and rec.parameters:
        parts.append(_millions(rec.parameters))
    text = cfg.model.arch + (f" ({', '.join(parts)})" if parts else "")
    return text + f", {cfg.model.nmb_prototypes} prototypes of dimension {cfg.model.feat_dim}"


def _distinct(warnings: list[str]) -> list[str]:
    """Each warning once, in order of first appearance, with how often it was recorded (a resumed
    run records its config warnings again at every start)."""
    counts: dict[str, int] = {}
    for w in warnings:
        counts[w] = counts.get(w, 0) + 1
    return [w if n == 1 else f"{w} ({n} times)" for w, n in counts.items()]


def _diagnostics(facts: RunFacts, cfg) -> list[str]:
    """Plain-words warnings about a run that the numbers show (shown at the top of the page)."""
    notes: list[str] = []
    spe, total = facts.steps_per_epoch, facts.total_steps
    if cfg is not None and spe and total:
        epochs = total / spe
        warm = round(min(cfg.optim.warmup_epochs, epochs) * spe)
        if cfg.optim.warmup_epochs > 0 and warm >= total:
            notes.append(f"The whole run ({epochs:g} epoch(s)) was learning-rate warmup (optim.warmup_epochs = "
                         f"{cfg.optim.warmup_epochs:g}): the rate rose to its peak and never decayed. Train for more "
                         "epochs (a longer --time-budget) or shorten the warmup (--set optim.warmup_epochs=...).")
        freeze = round(cfg.swav.freeze_prototypes_epochs * spe)
        if freeze >= total:
            notes.append(f"The prototypes stayed frozen for the whole run (swav.freeze_prototypes_epochs = "
                         f"{cfg.swav.freeze_prototypes_epochs:g} >= {epochs:g} epoch(s)): they kept their random "
                         "initial directions, and only the network learned to use them.")
    k = _first_k(cfg.model.nmb_prototypes) if cfg is not None else None
    losses = [r["loss"] for r in facts.metrics if isinstance(r.get("loss"), (int, float))]
    if k and k > 1 and len(losses) >= 5 and facts.finished and abs(losses[-1] - math.log(k)) < 0.02 * math.log(k):
        notes.append(f"The loss ended at ln K = {math.log(k):.3f}: the run looks collapsed (every image gets the same "
                     "prediction). See the README's troubleshooting section.")
    final = next((r for r in reversed(facts.metrics) if any(x.startswith("final_knn_top1") for x in r)), None)
    if final is not None:
        key = next(x for x in final if x.startswith("final_knn_top1"))
        init = final.get("init_" + key[len("final_"):])
        if isinstance(init, (int, float)) and final[key] < init:
            notes.append(f"The learned backbone scores below its own initialisation on the final kNN "
                         f"({final[key]:.2f} % against {init:.2f} %): features this early are not yet better than "
                         "random ones. Train longer.")
    return notes


def _eval_rows(facts: RunFacts, cfg) -> tuple[list[dict[str, Any]], list[str]]:
    rows, notes = [], []
    final = next((r for r in reversed(facts.metrics) if any(k.startswith("final_") for k in r)), None)
    if final is not None and not any(ev.baseline_metrics for ev in facts.evaluations):  # older runs: no eval/final.json
        names = [k[len("final_"):] for k in final if k.startswith("final_")]
        rows.append({
            "command": "swav pretrain (train.final_knn: kNN at the end of training)",
            "dataset": f"{cfg.data.source} test split" if cfg is not None else "",
            "metrics": [(n, final.get(f"final_{n}"), final.get(f"init_{n}"), final.get(f"pixels_{n}")) for n in names],
            "time": "", "source": "metrics.jsonl"})
    for ev in facts.evaluations:
        if ev.error:
            notes.append(f"eval/{ev.file}: {ev.error}")
            if not ev.metrics:
                continue
        names = list(ev.metrics) + [n for n in ev.init_metrics if n not in ev.metrics]
        rows.append({
            "command": ev.command or f"(command not recorded in eval/{ev.file})",
            "dataset": ev.dataset, "baseline": ev.baseline, "verdict": ev.verdict,
            "metrics": [(n, ev.metrics.get(n), ev.init_metrics.get(n), ev.baseline_metrics.get(n)) for n in names],
            "time": format_seconds(ev.seconds) if ev.seconds is not None else "",
            "source": f"eval/{ev.file}" + (f" (swav {ev.version})" if ev.version else "")})
    return rows, notes


def _thumb_views(dataset, row, size: int, class_names, labels_of) -> list[tuple[bytes, str]]:
    from swav.report.gallery import thumbnail, thumbnail_png

    out = []
    for idx, score in zip(row.indices, row.scores):
        arr = thumbnail(dataset, idx, size)
        if arr is None:
            continue
        alt = f"training image {idx}, score {score:.3f}"
        lab = labels_of(idx)
        if lab is not None:
            alt += f", label {class_names[lab] if class_names and lab < len(class_names) else lab}"
        out.append((thumbnail_png(arr), alt))
    return out


def _labels_lookup(dataset):
    labels = getattr(dataset, "labels", None)
    if labels is None:
        return lambda i: None
    return lambda i: int(labels[int(i)])


def _learned_sections(page: Page, facts: RunFacts, cfg, *, data, max_images: int, map_points: int,
                      gallery_rows: int, per_row: int, seed: int, device: str) -> None:
    """Fill the prototype gallery and the embedding map from the checkpoint (or say why not)."""
    from swav.report import embedmap, gallery, plots

    if facts.checkpoint is None:
        why = facts.checkpoint_note or "no checkpoint"
        page.gallery_notes.append(f"No prototype gallery: {why}.")
        page.map_notes.append(f"No embedding map: {why}.")
        return
    dev = _pick_device(device)
    model, run_cfg = gallery.load_model(facts.checkpoint)
    try:
        train_set = gallery.open_split(run_cfg, "train", data)
    except Exception as e:  # a missing data set, a moved folder: report it, keep the page
        msg = (f"the training data ({data or run_cfg.data.source}) could not be opened here: {e}. "
               "Give its location with `swav report RUN_DIR --data SOURCE`.")
        page.gallery_notes.append("No prototype gallery: " + msg)
        page.map_notes.append("No embedding map: " + msg)
        return
    classes = getattr(train_set, "classes", None)

    t = time.perf_counter()
    idx = gallery.sample_indices(len(train_set), max_images, seed)
    emb = gallery.embed(model, run_cfg, train_set, idx, dev)
    protos = gallery.prototype_matrix(model)
    gal = gallery.build_gallery(emb, protos, rows=gallery_rows, per_row=per_row, class_names=classes)
    k = protos.shape[0]
    page.gallery_intro = (
        f"{gal.n_images} training images (a random sample, seed {seed}) were embedded with the checkpoint of "
        f"step {facts.global_step} and assigned to their nearest of the {k} prototypes (highest cosine score "
        f"z·c). Each row is one of the {len(gal.rows)} most used prototypes, with the images that score highest "
        "against it, best first. Coherent rows mean the prototypes have become visual clusters.")
    if emb.skipped:
        page.gallery_notes.append(f"{emb.skipped} sampled file(s) could not be decoded and were left out.")
    if gal.purity is not None:
        page.gallery_intro += (f" With labels (never seen in training): {100 * gal.purity:.1f} % of the sampled "
                               "images carry the most common label of their prototype.")
    if isinstance(run_cfg.model.nmb_prototypes, list):
        page.gallery_notes.append("This model has several prototype heads; the gallery shows the first.")
    size = 84
    labels_of = _labels_lookup(train_set)
    for row in gal.rows:
        details = [f"{row.count} images ({100 * row.count / max(gal.n_images, 1):.1f} %)"]
        if row.label_share is not None:
            details.append(f"{100 * row.label_share[1]:.0f} % {row.label_share[0]}")
        if row.scores:
            details.append(f"scores {row.scores[0]:.2f} … {row.scores[-1]:.2f}")
        page.gallery_rows.append(GalleryRowView(f"prototype {row.prototype}", details,
                                                _thumb_views(train_set, row, size, classes, labels_of), size))
    page.gallery_figures.append(plots.usage_distribution(gal.counts, gal.n_images))
    log.info("report: gallery of %d images in %.1f s", gal.n_images, time.perf_counter() - t)

    # ---- embedding map: test split when there is one, else the training sample ----------------
    t = time.perf_counter()
    map_set, split_name, map_emb = None, "test", None
    try:
        map_set = gallery.open_split(run_cfg, "test", data)
    except Exception as e:
        page.map_notes.append(f"No test split ({e}); the map shows the sampled training images instead.")
    if map_set is not None and len(map_set) >= 5:
        midx = gallery.sample_indices(len(map_set), map_points, seed)
        map_emb = gallery.embed(model, run_cfg, map_set, midx, dev)
    else:
        map_set, split_name = train_set, "training"
        keep = gallery.sample_indices(len(emb.indices), map_points, seed)
        map_emb = gallery.Embeddings(emb.indices[keep], emb.features[keep], emb.z[keep],
                                     emb.labels[keep] if emb.labels is not None else None)
    if len(map_emb.indices) < 5:
        page.map_notes.append(f"Only {len(map_emb.indices)} usable image(s): too few for a map.")
        return
    xy = embedmap.tsne_2d(map_emb.features, seed=seed)
    thumbs = []
    for row in embedmap.spread_points(xy, 20, seed):
        arr = gallery.thumbnail(map_set, int(map_emb.indices[row]), 48)
        if arr is not None:
            thumbs.append((row, arr))
    labels = map_emb.labels
    coloured = "coloured by label" if labels is not None else "uncoloured (this data has no labels)"
    caption = (f"t-SNE (scikit-learn, perplexity {min(30, (len(xy) - 1) // 3)}, after PCA to 50 dimensions) of "
               f"the L2-normalised backbone features of {len(xy)} {split_name} images, {coloured}; "
               f"{len(thumbs)} images are shown at their points. Labels were not used to train or to place "
               "the points: classes that form separate islands are what the features learned without them.")
    map_classes = getattr(map_set, "classes", None)
    page.map_figure = plots.embedding_map(xy, labels, map_classes, thumbs,
                                          f"Backbone features of {split_name} images (t-SNE)", caption)
    log.info("report: embedding map of %d images in %.1f s", len(xy), time.perf_counter() - t)


def _config_text(config: dict) -> str:
    """The config as YAML, one setting per line (lists inline), readable and valid for --config."""
    import yaml

    def one(key, value) -> str:
        return yaml.safe_dump({key: value}, default_flow_style=True, width=10**6).strip()[1:-1]

    lines = []
    for key, value in config.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines.extend("  " + one(k, v) for k, v in value.items())
        else:
            lines.append(one(key, value))
    return "\n".join(lines) + "\n"


def build_page(run_dir: str | os.PathLike, *, data: str | os.PathLike | None = None, max_images: int = 5000,
               map_points: int = 2000, gallery_rows: int = 12, per_row: int = 10, seed: int = 0,
               device: str = "auto") -> Page:
    """Gather everything the report shows into a :class:`~swav.report.html.Page` (see ``write_report``)."""
    from swav.config import ConfigError, from_dict
    from swav.extras import require_extra
    from swav.models.families import MissingModuleError
    from swav.report import plots

    require_extra("report", "swav report")  # matplotlib, scikit-learn, threadpoolctl: before any work
    facts = read_run(run_dir)
    cfg = None
    if facts.config is not None:
        try:
            cfg = from_dict(facts.config)
        except ConfigError as e:
            facts.notes.append(f"the run's config could not be read: {e}")
    name = Path(run_dir).resolve().name
    page = Page(title=f"SwAV run report: {name}", subtitle="")
    rows, status = _run_rows(facts, cfg)
    page.run_facts = rows
    page.run_notes = _diagnostics(facts, cfg) + list(facts.notes)
    if facts.record_note:
        page.run_notes.append(facts.record_note)
    if facts.checkpoint_note:
        page.run_notes.append(facts.checkpoint_note)
    page.run_warnings = _distinct(facts.warnings)
    env = report_environment()
    page.environment = list(env.items())
    preset = f"preset {cfg.preset}" if cfg is not None and cfg.preset else "custom config"
    source = cfg.data.source if cfg is not None else "?"
    page.subtitle = f"{preset} · {source} · {status}"

    k = _first_k(cfg.model.nmb_prototypes) if cfg is not None else None
    if facts.metrics:
        page.curves = plots.training_curves(facts.metrics, k, facts.steps_per_epoch)
        if not any(f.key == "knn" for f in page.curves):
            page.curves_notes.append("The online kNN monitor did not run (turn it on with --set train.knn_every=N "
                                     "on a labelled data source).")
    else:
        page.curves_notes.append("No metrics.jsonl records yet: the run has not reached its first logged step.")

    try:
        _learned_sections(page, facts, cfg, data=None if data is None else os.fspath(data), max_images=max_images,
                          map_points=map_points, gallery_rows=gallery_rows, per_row=per_row, seed=seed,
                          device=device)
    except MissingModuleError as e:  # a run of a module given in Python: write_report(run, backbone=module)
        page.gallery_notes.append(f"No prototype gallery: {e}; in Python: swav.report.write_report(RUN, "
                                  "backbone=module).")
        page.map_notes.append("No embedding map: the run's network is a module given in Python (see above).")
    except Exception as e:  # the rest of the report is still worth writing
        log.exception("report: the prototype gallery / embedding map failed")
        page.gallery_notes.append(f"The gallery and map could not be made: {type(e).__name__}: {e}")
        if page.map_figure is None:
            page.map_notes.append(f"The map could not be made: {type(e).__name__}: {e}")

    page.eval_rows, page.eval_notes = _eval_rows(facts, cfg)
    if facts.config is not None:
        page.config_yaml = _config_text(facts.config)
        page.config_source = facts.config_source
    page.footer = (f"Made by swav {env['swav']} (torch {env['torch']}) on {time.strftime('%Y-%m-%d %H:%M:%S')}. "
                   "Regenerate with: swav report " + str(run_dir))
    return page


def write_report(run_dir: str | os.PathLike, *, out: str | os.PathLike | None = None,
                 data: str | os.PathLike | None = None, max_images: int = 5000, map_points: int = 2000,
                 seed: int = 0, device: str = "auto", backbone=None) -> Path:
    """Write the HTML report of the run in ``run_dir``; return its path (default ``run_dir/report.html``).

    Args:
        out: where to write the page instead of ``run_dir/report.html``.
        data: the training data source to draw gallery and map images from, when the run's own
            ``data.source`` has moved or lives elsewhere on this machine (never downloaded).
        max_images: training images embedded for the prototype gallery (a random sample).
        map_points: test images placed on the t-SNE map (t-SNE takes ~10 s per 2000 on a CPU core).
        seed: seed of the samples and of t-SNE: the same run gives the same page.
        device: ``auto`` (a GPU when visible), ``cpu``, ``cuda`` or ``cuda:N``, for embedding images.
        backbone: for a run of a module given in Python (``model.arch = module/...``), the module
            again, so the gallery and the map can rebuild the network.

    Raises FileNotFoundError when ``run_dir`` is not a run folder and
    :class:`swav.extras.MissingExtraError` when the ``report`` extra (matplotlib, scikit-learn,
    threadpoolctl) is not installed; anything else that goes wrong (no checkpoint yet, data not found, ...) is stated
    in the page instead.
    """
    if max_images < 1 or map_points < 1:
        raise ValueError(f"max_images ({max_images}) and map_points ({map_points}) must be >= 1")
    t = time.perf_counter()
    given = contextlib.nullcontext()
    if backbone is not None:
        from swav.config import read_yaml
        from swav.models import MODULES

        given = MODULES.given(read_yaml(Path(run_dir) / "config.yaml")["model"]["arch"], backbone)
    with given:
        page = build_page(run_dir, data=data, max_images=max_images, map_points=map_points, seed=seed,
                          device=device)
    text = render(page)
    path = Path(out) if out is not None else Path(run_dir) / REPORT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text, durable=False)
    log.info("report written to %s (%.0f kB, %.1f s)", path, len(text) / 1024, time.perf_counter() - t)
    return path
