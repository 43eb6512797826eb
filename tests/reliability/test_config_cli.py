"""Every option is validated before any work starts: a bad value of any setting makes
``swav pretrain`` exit with code 2 and a message naming the key, and the run folder is not even
created; a typo in ``--set`` names the closest valid key. tests/test_config.py checks ``validate``
message by message; this goes through the command, for every key of the schema."""
from __future__ import annotations

import pytest
import torch

import swav.cli
from swav.config import ALL_KEYS, FIELD_TYPES

from .conftest import run_cli

# A value that is out of range (or inconsistent) for each key, on top of the smoke preset (1 channel,
# batch 64, subset 512, crops 2x28 + 2x16).
BAD_VALUES = {
    "data.source": ["", "/no/such/folder/of/images"],
    "data.download": ["maybe"],
    "data.subset": ["-1", "10"],
    "data.workers": ["-1"],
    "data.min_size": ["-5"],
    "data.max_side": ["-1", "big"],
    "augment.size_crops": ["[0,16]", "[28]"],
    "augment.nmb_crops": ["[0,2]", "[1]"],
    "augment.min_scale_crops": ["[0,0.1]", "[0.3,0.5]"],
    "augment.max_scale_crops": ["[1.5,0.3]"],
    "augment.flip_prob": ["1.5"],
    "augment.jitter_strength": ["-1"],
    "augment.jitter_prob": ["2"],
    "augment.grayscale_prob": ["-0.5"],
    "augment.blur_prob": ["7"],
    "augment.blur_sigma": ["[2.0,0.1]", "[1.0]"],
    "augment.erase_prob": ["1.5"],
    "augment.erase_scale": ["[0.3,0.1]", "[0.1]", "[0.1,1.0]"],
    "augment.mean": ["[0.5,0.5,0.5]"],
    "augment.std": ["[0]"],
    "model.arch": ["resnet51", "convnext_tiny", "timm/", "module/MyNet"],
    "model.kwargs": ["3", "{patch_size: 4}", "[1, 2]"],
    "model.init_from": ["/no/such/weights.pt"],
    "model.width_per_group": ["0"],
    "model.widen": ["0"],
    "model.in_chans": ["0", "2"],
    "model.pool_size": ["0", "-1"],
    "model.small_stem": ["maybe"],
    "model.zero_init_residual": ["perhaps"],
    "model.hidden_mlp": ["-1"],
    "model.feat_dim": ["0"],
    "model.nmb_prototypes": ["0"],
    "model.sync_bn": ["sometimes"],
    "swav.temperature": ["0"],
    "swav.epsilon": ["0", "-0.05"],
    "swav.sinkhorn_iterations": ["0"],
    "swav.crops_for_assign": ["[0,9]", "[1,1]", "[]"],
    "swav.queue_length": ["33", "-64"],
    "swav.epoch_queue_starts": ["-1"],
    "swav.freeze_prototypes_epochs": ["-1"],
    "optim.optimizer": ["adam"],
    "optim.lr": ["0"],
    "optim.final_lr": ["-1"],
    "optim.warmup_epochs": ["-1", "50"],
    "optim.start_warmup": ["-1"],
    "optim.weight_decay": ["-1"],
    "optim.momentum": ["1.0"],
    "optim.lars_eta": ["0"],
    "optim.exclude_bias_and_bn": ["perhaps"],
    "train.epochs": ["0"],
    "train.batch_size": ["0"],
    "train.time_budget_minutes": ["-1"],
    "train.precision": ["fp8"],
    "train.device": ["gpu", "cuda:x"],
    "train.seed": ["-1"],
    "train.checkpoint_every": ["0"],
    "train.save_every_steps": ["-1"],
    "train.log_every": ["0"],
    "train.nan_patience": ["0"],
    "train.channels_last": ["2"],
    "train.compile": ["yes please"],
    "train.knn_every": ["-1"],
    "train.knn_k": ["0"],
    "train.final_linear_epochs": ["-1"],
    "train.recompute_bn_images": ["-1", "many"],
    "train.final_knn": ["maybe"],
}
if not torch.cuda.is_available():
    BAD_VALUES["train.device"].append("cuda")
# keys for which no value is wrong (labels, paths created on demand); knn_max_train <= 0 means "all"
FREE_FORM = {"data.root", "preset", "out", "train.knn_max_train"}
NOT_A_NUMBER = "not-a-number"


def _cases():
    for key in ALL_KEYS:
        for value in BAD_VALUES.get(key, []):
            yield key, value
        if FIELD_TYPES[key] in (int, float) or str(FIELD_TYPES[key]).startswith("list["):
            yield key, NOT_A_NUMBER if not str(FIELD_TYPES[key]).startswith("list[") else f"[{NOT_A_NUMBER}]"


def test_every_key_has_a_bad_value_or_is_free_form():
    missing = [k for k in ALL_KEYS if k not in BAD_VALUES and k not in FREE_FORM]
    assert not missing, f"add an invalid value for these new settings to BAD_VALUES: {missing}"


@pytest.mark.parametrize("key, value", list(_cases()))
def test_bad_value_exits_2_naming_the_key_before_any_work(tmp_path, capsys, key, value):
    out = tmp_path / "run"
    # (--max-steps 1: a value that is wrongly accepted costs one step, not a run)
    code = swav.cli.main(["pretrain", "--preset", "smoke", "--out", str(out), "--max-steps", "1",
                          "--set", f"{key}={value}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert key in err, err
    assert not out.exists(), "the run folder was created before the settings were checked"


def test_bad_flag_values_and_max_steps(tmp_path, capsys):
    out = tmp_path / "run"
    for argv in (["--epochs", "many"], ["--lr", "-1"], ["--batch-size", "0"], ["--max-steps", "0"],
                 ["--precision", "float8"], ["--device", "tpu"]):
        code = swav.cli.main(["pretrain", "--preset", "smoke", "--out", str(out), *argv,
                              *([] if "--max-steps" in argv else ["--max-steps", "1"])])
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert not out.exists(), argv


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    out = tmp_path / "a_file"
    out.write_text("keep me")
    assert swav.cli.main(["pretrain", "--preset", "smoke", "--out", str(out)]) == 2
    assert "out = " in capsys.readouterr().err and out.read_text() == "keep me"


@pytest.mark.parametrize("typo, closest", [
    ("optim.lrr", "optim.lr"), ("train.epoch", "train.epochs"), ("swav.epsilonn", "swav.epsilon"),
    ("model.arc", "model.arch"), ("data.worker", "data.workers"), ("augment.size_crop", "augment.size_crops"),
    ("train.batchsize", "train.batch_size"), ("optim.lr_final", "optim.final_lr"), ("swav.queue_len", "swav.queue_length"),
])
def test_set_typo_names_the_closest_key(tmp_path, capsys, typo, closest):
    out = tmp_path / "run"
    assert swav.cli.main(["pretrain", "--preset", "smoke", "--out", str(out), "--set", f"{typo}=1"]) == 2
    err = capsys.readouterr().err
    assert f"unknown key {typo!r}; did you mean {closest!r}?" in err, err
    assert not out.exists()


def test_set_typo_through_the_installed_command(tmp_path):
    proc = run_cli("pretrain", "--preset", "smoke", "--out", tmp_path / "run", "--set", "optim.lrr=0.1",
                   "--set", "swav.epsilonn=0", timeout=120)
    assert proc.returncode == 2
    assert "did you mean 'optim.lr'?" in proc.stderr and "did you mean 'swav.epsilon'?" in proc.stderr  # both
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_knn_monitor_on_unlabelled_folder_is_refused_before_training(tmp_path, capsys, corpus):
    """The kNN monitor needs labelled train/test splits; a flat folder has none: refused before the
    first step, not after the whole run."""
    out = tmp_path / "run"
    code = swav.cli.main(["pretrain", "--preset", "smoke", "--data", corpus.root, "--out", str(out),
                          "--set", "model.in_chans=3", "--set", "augment.mean=[0.5,0.5,0.5]",
                          "--set", "augment.std=[0.25,0.25,0.25]", "--set", "train.batch_size=16",
                          "--set", "data.subset=0", "--set", "train.final_knn=true"])
    err = capsys.readouterr().err
    assert code == 2 and "train.final_knn=false" in err, err
    assert not (out / "checkpoint.pt").exists()
