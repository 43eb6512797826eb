"""The run report without a browser: page structure, images, evaluations, and runs that lack things."""
from __future__ import annotations

import json

import pytest

from swav.cli import main
from swav.report import SECTION_IDS, write_report
from swav.report.runinfo import merge_metrics, read_evaluations

from .conftest import EVAL_FILES, SMALL, copy_run
from .pageparse import ReportPage, decode_data_image


def page_of(path) -> ReportPage:
    return ReportPage(path.read_text(encoding="utf-8"))


def assert_self_contained(page: ReportPage):
    assert "script" not in page.tags and "iframe" not in page.tags
    for tag, attr, value in page.urls:
        assert value.startswith(("data:", "#")), f"<{tag} {attr}> points outside the page: {value[:80]}"
    for img in page.images:
        im = decode_data_image(img["src"])
        assert im.width > 0 and im.height > 0


def test_finished_run_report_has_every_section(finished_run, finished_report):
    assert finished_report == finished_run / "report.html"
    page = page_of(finished_report)
    assert page.section_ids == list(SECTION_IDS)
    assert_self_contained(page)
    # curves: loss (with ln K), lr, throughput, usage, entropy; no online kNN in this run
    for key in ("loss", "lr", "throughput", "prototype-usage", "entropy"):
        assert f"fig-{key}" in page.ids
    assert "ln K" in page.text("curves") or "ln K" in page.text("run")
    # gallery: rows of images with counts, plus the usage distribution
    rows = [i for i in page.ids if i.startswith("proto-row-")]
    assert len(rows) >= 3
    assert "fig-usage-distribution" in page.ids
    assert "images (" in page.text("prototypes")
    assert "fig-embedding-map" in page.ids
    assert "test images" in page.text("embedding-map") and "coloured by label" in page.text("embedding-map")
    run = page.text("run")
    assert "finished: 8 of 8 steps" in run and "0.1.0" in run and "wall time" in run and "torch" in run
    # evaluations: both files and the end-of-training kNN, with their commands; the broken file is named
    ev = page.text("evaluations")
    for content in EVAL_FILES.values():
        assert content["command"] in ev
    assert "74.5" in ev and "71.25" in ev and "60" in ev
    assert "train.final_knn" in ev and "broken.json" in ev
    assert "nmb_prototypes: 20" in page.text("config")


def test_gallery_images_are_training_images_of_the_most_used_prototypes(finished_report):
    page = page_of(finished_report)
    gallery = [im for im in page.images if im.get("alt", "").startswith("training image")]
    assert len(gallery) >= 10
    first = decode_data_image(gallery[0]["src"])
    assert first.size == (84, 84)  # 28 px images enlarged 3x
    counts = [int(t.split(" images (")[0].split()[-1]) for t in page.text("prototypes").split("prototype ")[1:]
              if " images (" in t]
    assert counts == sorted(counts, reverse=True) and counts[0] > 0


def test_unfinished_run(unfinished_run):
    page = page_of(write_report(unfinished_run, **SMALL))
    assert page.section_ids == list(SECTION_IDS)
    assert "unfinished: step 3 of 8" in page.text("run")
    assert any(i.startswith("proto-row-") for i in page.ids)
    assert "No evaluation results" in page.text("evaluations")
    assert_self_contained(page)


def test_run_without_checkpoint_or_metrics(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run", "checkpoint.pt", "metrics.jsonl", "report.html")
    for p in run.glob("checkpoint-epoch*.pt"):
        p.unlink()
    page = page_of(write_report(run, **SMALL))
    assert page.section_ids == list(SECTION_IDS)
    assert "no checkpoint.pt yet" in page.text("prototypes")
    assert "No metrics.jsonl records yet" in page.text("curves")
    assert "nmb_prototypes: 20" in page.text("config")  # from config.yaml
    assert_self_contained(page)


def test_folder_source_without_labels_or_test_split(folder_run):
    page = page_of(write_report(folder_run, **SMALL))
    assert page.section_ids == list(SECTION_IDS)
    assert any(i.startswith("proto-row-") for i in page.ids)
    text = page.text("embedding-map")
    assert "training images" in text and "uncoloured" in text and "No test split" in text
    assert "%" not in page.text("prototypes").split("Each row")[0]  # no label purity without labels
    assert_self_contained(page)


def test_missing_data_is_reported_in_the_page(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run", "report.html")
    page = page_of(write_report(run, data=str(tmp_path / "moved-away"), **SMALL))
    assert "could not be opened here" in page.text("prototypes")
    assert "fig-loss" in page.ids


def test_cli_writes_the_same_page_as_the_api(finished_run, finished_report, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(finished_run), "--out", str(out), "--max-images", str(SMALL["max_images"]),
                 "--map-points", str(SMALL["map_points"]), "--device", "cpu"]) == 0
    assert out.exists() and str(out) in capsys.readouterr().out
    # deterministic: the same samples, the same thumbnails and charts
    gallery = lambda p: [im["src"] for im in page_of(p).images if im.get("alt", "").startswith("training image")]
    assert gallery(out) == gallery(finished_report)
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "not a swav run folder" in capsys.readouterr().err


def test_merge_metrics_merges_steps_and_keeps_the_resumed_values():
    recs = [{"step": 2, "loss": 5.0}, {"step": 4, "loss": 4.0}, {"step": 4, "knn_top1@20": 50.0},
            {"step": 2, "loss": 4.9}, {"step": "x"}, {"loss": 1.0}]
    assert merge_metrics(recs) == [{"step": 2, "loss": 4.9}, {"step": 4, "loss": 4.0, "knn_top1@20": 50.0}]


def test_read_evaluations_tolerates_odd_files(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "a.json").write_text(json.dumps({"command": "c", "metrics": {"top1": 1, "x": "s", "n": None}}))
    (tmp_path / "eval" / "b.json").write_text(json.dumps([1, 2]))
    (tmp_path / "eval" / "c.json").write_text(json.dumps({"command": "c", "metrics": {}}))
    (tmp_path / "eval" / ".a.json.tmp-1.json").write_text("{")  # hidden: a writer's temporary file
    a, b, c = read_evaluations(tmp_path)
    assert a.metrics == {"top1": 1.0, "n": None} and not a.error
    assert "JSON object" in b.error and "no numeric" in c.error


def test_bad_arguments(finished_run):
    with pytest.raises(ValueError):
        write_report(finished_run, max_images=0)


def test_diagnostics_name_what_went_wrong(tmp_path):
    from swav.config import make_config
    from swav.report import _diagnostics
    from swav.report.runinfo import RunFacts
    from swav.runrecord import RunRecord

    # Pinned here (not taken from the preset, whose schedule is tuned over time).
    cfg = make_config("fashion-mnist", overrides=["optim.warmup_epochs=1",
                                                  "swav.freeze_prototypes_epochs=1"])
    facts = RunFacts(run_dir=tmp_path, checkpoint={"epochs": 1, "global_step": 10},
                     record=RunRecord(steps_per_epoch=10),
                     metrics=[{"step": s, "loss": 4.6} for s in range(1, 11)]
                     + [{"step": 10, "final_knn_top1@20": 70.0, "init_knn_top1@20": 78.0}])
    text = " ".join(_diagnostics(facts, cfg))
    assert "whole run (1 epoch(s)) was learning-rate warmup" in text
    assert "prototypes stayed frozen" in text
    assert "collapsed" in text  # 4.6 is ln 100
    assert "below its own initialisation" in text
    facts.checkpoint["epochs"] = 5
    facts.metrics = [{"step": s, "loss": 3.0} for s in range(1, 51)]
    assert _diagnostics(facts, cfg) == []
