"""Config machinery: YAML files, CLI overrides, validation errors, and every shipped config."""

from pathlib import Path

import pytest
import yaml

from mvc.config import Config, build_parser, load_yaml, make_config, parse_args, save_config
from mvc.utils import MVCError

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = make_config(load_yaml(path))
    assert isinstance(cfg, Config)
    # every key in the file really reached the config (nothing silently dropped)
    for section, values in load_yaml(path).items():
        for key, value in values.items():
            got = getattr(getattr(cfg, section), key)
            assert got == value or (isinstance(value, (int, float)) and float(got) == float(value)), f"{section}.{key}"


def test_cli_overrides_parse_yaml_values(tmp_path):
    p = build_parser("t")
    cfg, _ = parse_args(p, ["--train.lr=3e-4", "--mixing.window", "[1, 8]", "--run.seed=null", "--data.k_per_class=5"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.mixing.window == [1, 8]
    assert cfg.run.seed is None
    assert cfg.data.k_per_class == 5


def test_overrides_beat_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"train": {"lr": 0.5, "batch_size": 7}}))
    cfg, _ = parse_args(build_parser("t"), ["--config", str(f), "--train.lr=0.25"])
    assert cfg.train.lr == 0.25 and cfg.train.batch_size == 7


@pytest.mark.parametrize("argv, words", [
    (["--train.lrr=1"], ["unknown config key", "train.lrr"]),
    (["--nosuch.lr=1"], ["unknown config key", "nosuch.lr"]),
    (["--train.lr=abc"], ["train.lr", "expected float"]),
    (["--train.batch_size=1.5"], ["train.batch_size", "expected int"]),
    (["--train.lr=-1"], ["train.lr", "out of range"]),
    (["--generate.guidance_scale=0"], ["generate.guidance_scale", "out of range"]),
    (["--train.drop_text_prob=1.5"], ["train.drop_text_prob", "out of range"]),
    (["--data.name=nosuch"], ["data.name", "fashion_mnist"]),
    (["--train.use_ema=yes please"], ["train.use_ema", "expected bool"]),
    (["--lr=1"], ["unknown option --lr"]),
])
def test_bad_values_are_one_line_errors_naming_the_key(argv, words):
    with pytest.raises(MVCError) as e:
        parse_args(build_parser("t"), argv)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_bad_yaml_files(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(MVCError, match="not found"):
        parse_args(build_parser("t"), ["--config", str(missing)])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(MVCError, match="not valid YAML"):
        parse_args(build_parser("t"), ["--config", str(bad)])
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump({"train": {"nope": 1}}))
    with pytest.raises(MVCError, match="train.nope"):
        parse_args(build_parser("t"), ["--config", str(wrong)])


def test_resolved_config_round_trips(tmp_path):
    cfg = make_config({"train": {"lr": 0.001}}, {"run.seed": 7})
    save_config(cfg, tmp_path / "config.yaml")
    again = make_config(load_yaml(tmp_path / "config.yaml"))
    assert again == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_name_only_known_things(path):
    """Backbones are timm names; pipeline runs name registered strategies and known augmentations."""
    import timm

    from mvc.classifier.strategies import list_strategies

    cfg = make_config(load_yaml(path))
    assert timm.is_model(cfg.classifier.backbone), cfg.classifier.backbone
    from mvc.classifier.augment import AUGMENTATIONS
    allowed_aug = AUGMENTATIONS.names()
    for run in cfg.pipeline.runs:
        strategy, _, augment = run.partition("+")
        assert strategy in list_strategies(), run
        assert not augment or augment in allowed_aug, run
