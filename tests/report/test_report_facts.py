"""The report states a run's facts from run.json, the checkpoint and the metrics, never from log.txt.

The log lines are for people and free to change wording: rewriting every one of them must leave the
page as it was, while a value changed in run.json must show in the page.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from swav.report import write_report
from swav.report.runinfo import read_record
from swav.runrecord import RUN_RECORD_FORMAT, RUN_RECORD_NAME, RunRecord
from swav.trainer import train

from .conftest import smoke_config
from .pageparse import ReportPage

# enough images for a gallery and a map, few enough to render the page several times
LIGHT = {"max_images": 64, "map_points": 40, "device": "cpu"}
# the one thing two renderings of an unchanged folder differ in: when the page was made
_MADE_AT = re.compile(r"\) on \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\. Regenerate with")


def copy_of(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("report.html"))
    return dst


def render(run: Path, out: Path, **kw) -> str:
    return write_report(run, out=out, **{**LIGHT, **kw}).read_text(encoding="utf-8")


def comparable(page: str) -> str:
    assert len(_MADE_AT.findall(page)) == 1, "the footer's time stamp is not where this test expects it"
    return _MADE_AT.sub(") on (time). Regenerate with", page)


def run_text(page: str) -> str:
    return ReportPage(page).text("run")


@pytest.fixture
def no_gallery(monkeypatch):
    """Skip the gallery and map (embedding images): for tests that only read the run section."""
    monkeypatch.setattr("swav.report._learned_sections", lambda *a, **k: None)


def test_rewording_every_log_line_leaves_the_page_unchanged(finished_run, tmp_path):
    run = copy_of(finished_run, tmp_path / "run")
    first = render(run, tmp_path / "1.html")
    # what differs between two renderings of the same folder: only the footer's time stamp
    assert comparable(render(run, tmp_path / "2.html")) == comparable(first)
    text = run_text(first)
    assert "(from run.json)" in text and "process(es) on cpu (fp32)" in text and "8 steps per epoch" in text

    log = run / "log.txt"
    lines = log.read_text(encoding="utf-8").splitlines()
    assert len(lines) >= 2  # the start line and one line per epoch at least
    decoys = [  # the old start and budget line formats, with other values, and a warning
        "2031-01-01 00:00:00 INFO swav: swav 9.9.9 | decoyhost | 7 process(es) on cuda:3 (fp16) | decoy-data: "
        "99999 images, 3 steps/epoch of 5 (per process 1) | vit 99.9M parameters | crops 1x1",
        "2031-01-01 00:00:01 INFO swav: time budget 1.0 min at 9.000 s/step: training 9 epoch(s) "
        "(99 steps, 9.00 epochs)",
        "2031-01-01 00:00:02 WARNING swav: decoy warning from log.txt",
    ]
    reworded = []
    for i, line in enumerate(lines):
        reworded += [line[::-1].upper(), decoys[i % len(decoys)]]
    assert not set(lines) & set(reworded)  # every line rewritten
    log.write_text("\n".join(reworded) + "\n", encoding="utf-8")
    garbled = render(run, tmp_path / "3.html")
    assert "decoy" not in garbled
    assert comparable(garbled) == comparable(first)

    log.write_text("", encoding="utf-8")
    assert comparable(render(run, tmp_path / "4.html")) == comparable(first)
    log.unlink()
    assert comparable(render(run, tmp_path / "5.html")) == comparable(first)


def test_the_page_shows_what_run_json_says(finished_run, tmp_path, no_gallery):
    run = copy_of(finished_run, tmp_path / "run")
    before = run_text(render(run, tmp_path / "before.html"))
    path = run / RUN_RECORD_NAME
    record = json.loads(path.read_text(encoding="utf-8"))
    assert record["format"] == RUN_RECORD_FORMAT and record["steps_per_epoch"] == 8
    record.update(device="cuda:7", device_name="Imaginary GPU 9000", precision="bf16", host="farhost",
                  images=12345, parameters=11_200_000, starts=3, first_start=record["first_start"] - 3600,
                  budget_minutes=5.0, seconds_per_step=0.25, torch="9.8.7",
                  warnings=["config: a warning kept in run.json"])
    path.write_text(json.dumps(record), encoding="utf-8")
    after = run_text(render(run, tmp_path / "after.html"))
    expected = ["1 process(es) on cuda:7 (bf16), Imaginary GPU 9000, host farhost (from run.json)",
                "fashion-mnist: 12345 training images", "11.2M parameters", "2 resume(s)", "wall time 1 h 00 min",
                "torch 9.8.7", "5 min: fitted to 8 steps (1.00 epochs) at a measured 0.250 s/step",
                "Warnings of the run", "config: a warning kept in run.json"]
    for s in expected:
        assert s in after, s
        assert s not in before, s
    assert "run.json is missing" not in after


def test_warnings_of_a_real_run_come_from_run_json(fake_fmnist, tmp_path, no_gallery):
    out = tmp_path / "warned"
    torch.manual_seed(0)
    # final_lr above lr: a warning of the config check (the run goes on), logged and kept in run.json
    cfg = smoke_config(out, fake_fmnist, "optim.final_lr=0.5")
    train(cfg, max_steps=2)
    record = RunRecord.load(out)
    assert any("optim.final_lr = 0.5 exceeds optim.lr" in w for w in record.warnings), record.warnings
    (out / "log.txt").write_text("", encoding="utf-8")  # the page must not need the log's WARNING lines
    text = run_text(render(out, tmp_path / "r.html"))
    assert "Warnings of the run" in text and "optim.final_lr = 0.5 exceeds optim.lr = 0.3" in text
    assert "unfinished: step 2 of 8" in text and "resume(s)" not in text

    train(cfg, max_steps=1)  # a resume: its start is counted, its config warning recorded once more
    assert RunRecord.load(out).starts == 2
    (out / "log.txt").unlink()
    page = ReportPage(render(out, tmp_path / "resumed.html"))
    text = page.text("run")
    assert "unfinished: step 3 of 8" in text and "1 resume(s), downtime in between included" in text
    assert text.count("optim.final_lr = 0.5 exceeds optim.lr = 0.3") == 1 and " (2 times)" in text


def test_a_run_without_run_json_still_gets_a_page(finished_run, tmp_path):
    from swav.report import SECTION_IDS

    run = copy_of(finished_run, tmp_path / "run")
    (run / RUN_RECORD_NAME).unlink()
    page = ReportPage(render(run, tmp_path / "r.html"))
    assert page.section_ids == list(SECTION_IDS)
    text = page.text("run")
    assert "run.json is missing" in text
    # from the checkpoint and the metrics: steps, steps per epoch (step / epoch), wall time, world size
    assert "finished: 8 of 8 steps (epoch 1.00 of 1)" in text
    assert "global batch 64, 8 steps per epoch" in text
    assert "first metrics record" in text and "resumes not known without run.json" in text
    assert "1 process(es) (from checkpoint.pt; device, precision and host are not known" in text
    assert "Warnings of the run" not in text
    assert any(i.startswith("proto-row-") for i in page.ids)  # the gallery needs the checkpoint only

    # nothing but the config and the log: still a page, which says what is missing
    for name in ("checkpoint.pt", "metrics.jsonl"):
        (run / name).unlink()
    for p in run.glob("checkpoint-epoch*.pt"):
        p.unlink()
    page = ReportPage(render(run, tmp_path / "bare.html"))
    assert page.section_ids == list(SECTION_IDS)
    assert "run.json is missing" in page.text("run") and "no training step recorded yet" in page.text("run")


def test_an_unusable_run_json_is_named_and_the_rest_is_used(finished_run, tmp_path, no_gallery):
    run = copy_of(finished_run, tmp_path / "run")
    path = run / RUN_RECORD_NAME
    good = json.loads(path.read_text(encoding="utf-8"))

    path.write_text("{not json", encoding="utf-8")
    record, note = read_record(run)
    assert record is None and "run.json could not be used" in note and "not valid JSON" in note
    text = run_text(render(run, tmp_path / "a.html"))
    assert "run.json could not be used" in text and "finished: 8 of 8 steps" in text

    path.write_text(json.dumps({"format": "something-else/1", "device": "cpu"}), encoding="utf-8")
    assert "not a swav run record" in read_record(run)[1]

    # values of the wrong type are ignored one by one, the others kept
    path.write_text(json.dumps({**good, "images": "many", "device": 3, "warnings": "oops", "starts": True}),
                    encoding="utf-8")
    record, note = read_record(run)
    assert record is not None and record.host == good["host"] and record.steps_per_epoch == 8
    assert (record.images, record.device, record.warnings, record.starts) == (0, "", [], 0)
    assert note == "run.json: ignored value(s) of unexpected type: device, images, starts, warnings."
    text = run_text(render(run, tmp_path / "b.html"))
    assert note in text and f"host {good['host']}" in text and "finished: 8 of 8 steps" in text


def test_the_model_row_says_how_the_network_started(tmp_path):
    """The report's model row names the grid pooling and the zero-init residual branches, so the
    comparison with the network at initialisation says which initialisation that was."""
    from swav.config import make_config
    from swav.report import _run_rows
    from swav.report.runinfo import RunFacts

    def model_row(*overrides):
        rows, _ = _run_rows(RunFacts(run_dir=tmp_path), make_config("fashion-mnist", overrides=list(overrides)))
        return dict(rows)["model"]

    assert "4x4 grid" in model_row() and "residual branches zero at init" in model_row()
    assert "residual branches zero at init" not in model_row("model.zero_init_residual=false")
