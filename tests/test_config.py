"""Tests for swav.config: presets, layering, coercion, YAML, validation, diff and help."""

import dataclasses

import pytest
import yaml

from swav.config import (
    ALL_KEYS,
    PRESETS,
    RESUME_FREE_FIELDS,
    Config,
    ConfigError,
    config_help,
    diff_configs,
    from_dict,
    list_presets,
    load_yaml,
    make_config,
    save_yaml,
    to_dict,
    validate,
)


# ---------------------------------------------------------------- presets and help

@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_validate(name):
    from swav.models import MissingExtraError, family_of

    cfg = make_config(name)
    assert cfg.preset == name
    family = family_of(cfg.model.arch)
    if family.missing_extra():  # the ViT preset without timm: one line with the install to run
        with pytest.raises(MissingExtraError, match=rf"pip install 'swav\[{family.extra}\]'"):
            validate(cfg, world_size=1)
        return
    validate(cfg, world_size=1)
    validate(cfg, world_size=2)


def test_preset_contents_follow_the_recipes():
    im = make_config("imagenet")
    assert (im.train.batch_size, im.optim.lr, im.optim.final_lr, im.train.precision) == (
        4096, 4.8, 0.0048, "fp16")
    assert im.augment.size_crops == [224, 96] and im.augment.nmb_crops == [2, 6]
    bs256 = make_config("imagenet-bs256")
    assert (bs256.train.batch_size, bs256.train.epochs, bs256.optim.lr) == (256, 200, 0.6)
    assert (bs256.swav.queue_length, bs256.swav.epoch_queue_starts) == (3840, 15)
    fm = make_config("fashion-mnist")
    assert fm.model.in_chans == 1 and fm.augment.mean == [0.2860] and fm.data.workers == 0
    assert fm.train.time_budget_minutes == 10.0
    smoke = make_config("smoke")
    assert smoke.data.subset == 512 and smoke.train.epochs == 2


def test_list_presets_has_descriptions():
    names = [n for n, _ in list_presets()]
    assert names == list(PRESETS)
    assert all(desc for _, desc in list_presets())


def test_presets_do_not_share_mutable_state():
    a = make_config("fashion-mnist")
    a.augment.mean.append(1.0)
    assert make_config("fashion-mnist").augment.mean == [0.2860]
    assert Config().augment.size_crops is not Config().augment.size_crops


def test_every_field_has_help():
    helps = config_help()
    assert set(helps) == set(ALL_KEYS)
    for key, (tp, default, text) in helps.items():
        assert tp and len(text) > 10, key
    assert helps["swav.epsilon"][1] == 0.05 and "0.03" in helps["swav.epsilon"][2]
    assert "15" in helps["swav.epoch_queue_starts"][2]
    assert config_help(make_config("smoke"))["train.epochs"][1] == 2


# ---------------------------------------------------------------- layering and coercion

def test_precedence_preset_file_flags_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 7\n  batch_size: 32\n  seed: 3\noptim: {lr: 0.1}\n")
    cfg = make_config("smoke", config_file=f, overrides=["train.seed=9"],
                      **{"train.batch_size": 16, "train.seed": 5, "optim.momentum": None})
    assert cfg.model.nmb_prototypes == 20  # preset
    assert cfg.train.epochs == 7 and cfg.optim.lr == 0.1  # file over preset
    assert cfg.train.batch_size == 16  # flag over file
    assert cfg.train.seed == 9  # --set over flag
    assert cfg.optim.momentum == 0.9  # None flags are ignored


def test_preset_named_in_file_and_dotted_keys(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: smoke\ntrain.epochs: 3\n")
    cfg = make_config("cifar", config_file=f)
    assert cfg.preset == "smoke" and cfg.model.nmb_prototypes == 20 and cfg.train.epochs == 3


def test_empty_preset_gives_defaults():
    assert to_dict(make_config("")) == to_dict(Config())
    with pytest.raises(ConfigError, match="unknown preset 'smok'; did you mean 'smoke'"):
        make_config("smok")


def test_set_coercion():
    cfg = make_config("smoke", overrides=[
        "optim.weight_decay=1e-4", "optim.lr=2", "augment.size_crops=[32, 16]",
        "augment.nmb_crops=3,4", "augment.mean=0.5", "model.sync_bn=false",
        "data.root=null", "train.device=cuda:1", "out='runs/x y'", "data.source=~/imgs",
        "swav.freeze_prototypes_epochs=0.5", "train.epochs=1e1"])
    assert cfg.optim.weight_decay == 1e-4 and isinstance(cfg.optim.weight_decay, float)
    assert cfg.optim.lr == 2.0 and isinstance(cfg.optim.lr, float)
    assert cfg.augment.size_crops == [32, 16] and cfg.augment.nmb_crops == [3, 4]
    assert cfg.augment.mean == [0.5]
    assert cfg.model.sync_bn is False and cfg.data.root is None
    assert cfg.train.device == "cuda:1" and cfg.out == "runs/x y" and cfg.data.source == "~/imgs"
    assert cfg.swav.freeze_prototypes_epochs == 0.5 and cfg.train.epochs == 10


@pytest.mark.parametrize("item, fragment", [
    ("train.epochs=abc", "train.epochs: cannot use 'abc' (str); expected int"),
    ("train.epochs=2.5", "expected int"),
    ("optim.lr=fast", "optim.lr: cannot use 'fast'"),
    ("optim.lr=nan", "expected float"),
    ("model.small_stem=maybe", "expected bool"),
    ("augment.size_crops=[32,x]", "expected list[int]"),
    ("train.batch_size=true", "expected int"),
    ("train.epochs", "expected section.key=value"),
])
def test_set_errors_name_key_value_and_type(item, fragment):
    with pytest.raises(ConfigError) as info:
        make_config("smoke", overrides=[item])
    assert fragment in str(info.value)


def test_unknown_keys_suggest_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr'; did you mean 'optim.lr'\?"):
        make_config("smoke", overrides=["optim.lrr=3"])
    with pytest.raises(ConfigError, match="did you mean 'train.epochs'"):
        make_config("smoke", **{"trian.epochs": 3})
    f = tmp_path / "c.yaml"
    f.write_text("swav:\n  epsilonn: 0.03\n  queue_lenght: 0\n")
    with pytest.raises(ConfigError) as info:
        make_config("smoke", config_file=f)
    msg = str(info.value)
    assert "did you mean 'swav.epsilon'" in msg and "did you mean 'swav.queue_length'" in msg
    assert str(f) in msg


# ---------------------------------------------------------------- YAML

def test_yaml_round_trip(tmp_path):
    cfg = make_config("cifar", overrides=["optim.weight_decay=1e-5", "data.root=/x"])
    path = tmp_path / "sub" / "config.yaml"
    save_yaml(cfg, path)
    assert load_yaml(path) == cfg
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temp file left
    assert make_config("smoke", config_file=path) == cfg  # a saved file fixes every field
    assert from_dict(to_dict(cfg)) == cfg


def test_yaml_refusals(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match="big.yaml.*refusing"):
        load_yaml(big)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml.*mapping"):
        load_yaml(lst)
    evil = tmp_path / "evil.yaml"
    evil.write_text("train: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="evil.yaml.*not valid YAML"):
        load_yaml(evil)
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_yaml(tmp_path / "missing.yaml")
    bad_section = tmp_path / "sec.yaml"
    bad_section.write_text("train: 5\n")
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        make_config("smoke", config_file=bad_section)


def test_from_dict_is_strict():
    with pytest.raises(ConfigError, match="did you mean 'model.arch'"):
        from_dict({"model": {"archh": "resnet18"}})
    with pytest.raises(ConfigError, match="train.epochs"):
        from_dict({"train": {"epochs": "many"}})
    assert from_dict({"train": {"epochs": 3}}).train.epochs == 3  # absent keys: defaults


# ---------------------------------------------------------------- validation

def _smoke(**changes):
    cfg = make_config("smoke")
    for key, value in changes.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section) if section else cfg, name, value)
    return cfg


@pytest.mark.parametrize("changes, fragment", [
    ({"swav__epsilon": 0.0}, "swav.epsilon"),
    ({"swav__temperature": -1.0}, "swav.temperature"),
    ({"swav__sinkhorn_iterations": 0}, "swav.sinkhorn_iterations"),
    ({"swav__crops_for_assign": [0, 4]}, "names crop 4"),
    ({"swav__crops_for_assign": [1, 1]}, "repeats crop"),
    ({"swav__crops_for_assign": []}, "swav.crops_for_assign is empty"),
    ({"augment__nmb_crops": [2]}, "one entry per crop group"),
    ({"augment__min_scale_crops": [0.0, 0.1]}, "augment.min_scale_crops[0]"),
    ({"augment__max_scale_crops": [1.5, 0.3]}, "augment.max_scale_crops[0]"),
    ({"augment__min_scale_crops": [0.5, 0.4]}, "augment.min_scale_crops[1] = 0.4 exceeds"),
    ({"augment__flip_prob": 1.5}, "augment.flip_prob"),
    ({"augment__blur_prob": -0.1}, "augment.blur_prob"),
    ({"augment__mean": [0.5, 0.5, 0.5]}, "augment.mean has 3"),
    ({"augment__std": [0.0]}, "augment.std[0]"),
    ({"augment__blur_sigma": [2.0, 0.1]}, "augment.blur_sigma"),
    ({"augment__erase_prob": -0.5}, "augment.erase_prob"),
    ({"augment__erase_scale": [0.2, 1.0]}, "augment.erase_scale"),
    ({"swav__queue_length": 32}, "shorter than the global batch"),
    ({"swav__queue_length": 100}, "nearest valid values: 64 or 128"),
    ({"swav__queue_length": -1}, "swav.queue_length"),
    ({"model__arch": "resnet51"}, "model.arch = 'resnet51' is not a known backbone (did you mean 'resnet50'?)"),
    ({"model__nmb_prototypes": 0}, "model.nmb_prototypes"),
    ({"model__in_chans": 0}, "model.in_chans"),
    ({"optim__optimizer": "adam"}, "optim.optimizer = 'adam'"),
    ({"optim__lr": 0.0}, "optim.lr"),
    ({"optim__momentum": 1.0}, "optim.momentum"),
    ({"optim__warmup_epochs": 5.0}, "optim.warmup_epochs"),
    ({"train__precision": "fp8"}, "train.precision"),
    ({"train__device": "gpu"}, "train.device = 'gpu'"),
    ({"train__epochs": 0}, "train.epochs"),
    ({"train__batch_size": 1024}, "data.subset = 512 is smaller than the global batch"),
    ({"train__log_every": 0}, "train.log_every"),
    ({"data__workers": -1}, "data.workers"),
    ({"data__source": " "}, "data.source is empty"),
])
def test_validate_names_the_field(changes, fragment):
    with pytest.raises(ConfigError) as info:
        validate(_smoke(**changes))
    assert fragment in str(info.value)


def test_validate_collects_all_problems_and_world_size():
    cfg = _smoke(swav__epsilon=-1.0, optim__lr=-1.0, train__batch_size=66)
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size=4)
    problems = info.value.problems
    assert len(problems) == 3
    assert any("does not divide evenly over 4 processes; use 64 or 68" in p for p in problems)
    validate(_smoke(train__batch_size=64), world_size=4)


def test_validate_warnings():
    assert any("epsilon" in w for w in validate(_smoke(swav__epsilon=0.005)))
    assert validate(make_config("smoke")) == []


# ---------------------------------------------------------------- diff

def test_diff_configs():
    a = make_config("smoke")
    b = make_config("smoke", overrides=["optim.lr=0.5", "train.device=cpu", "out=elsewhere",
                                        "data.workers=4"])
    assert diff_configs(a, b) == ["optim.lr: 0.3 != 0.5"]
    full = diff_configs(a, b, ignore=())
    assert "train.device: 'auto' != 'cpu'" in full and len(full) == 4
    assert diff_configs(a, dataclasses.replace(a)) == []
    assert {"out", "data.workers", "train.device"} <= RESUME_FREE_FIELDS


def test_saved_yaml_is_plain(tmp_path):
    path = tmp_path / "c.yaml"
    save_yaml(make_config("smoke"), path)
    data = yaml.safe_load(path.read_text())
    assert data["train"]["epochs"] == 2 and data["preset"] == "smoke"
