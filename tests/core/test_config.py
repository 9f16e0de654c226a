"""Config machinery: YAML files, CLI overrides, validation errors, and every shipped config."""

import os
from pathlib import Path

import pytest
import yaml

from mvc.core.config import Config, build_parser, load_yaml, make_config, parse_args, save_config
from mvc.core.utils import MVCError
from tests.helpers import no_hang

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


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
    """Backbones (classifier and reference) are timm names, the project's own included (mvc.classifier.zoo,
    registered when a backbone is checked); pipeline runs name registered strategies and known augmentations."""
    from mvc.classifier.models import check_backbone
    from mvc.classifier.strategies import list_strategies

    cfg = make_config(load_yaml(path))
    check_backbone(cfg.classifier.backbone)
    check_backbone(cfg.evaluate.reference_backbone)
    from mvc.classifier.augment import AUGMENTATIONS
    allowed_aug = AUGMENTATIONS.names()
    for run in cfg.pipeline.runs:
        strategy, _, augment = run.partition("+")
        assert strategy in list_strategies(), run
        assert not augment or augment in allowed_aug, run


#################################################################################
#                    Values and files a config cannot slip past                  #
#################################################################################

def _float_keys() -> list[str]:
    """Every config key whose type admits a float (float, float | None, list[float])."""
    import dataclasses
    import typing

    keys = []
    for sf in dataclasses.fields(Config):
        section = typing.get_type_hints(Config)[sf.name]
        for f, tp in typing.get_type_hints(section).items():
            if "float" in str(tp):
                keys.append(f"{sf.name}.{f}")
    return keys


def test_every_float_key_refuses_nan_and_inf():
    keys = _float_keys()
    assert len(keys) > 30 and "train.max_grad_norm" in keys and "classifier.milestones" in keys
    for key in keys:
        list_key = key == "classifier.milestones"
        for bad in (float("nan"), float("inf"), float("-inf")):
            with pytest.raises(MVCError, match="not a finite number") as e:
                make_config(overrides={key: [bad] if list_key else bad})
            assert key in str(e.value)
    # as YAML spells them on the command line, too
    for text in (".nan", "nan", "inf", "-.inf", "1e400"):
        with pytest.raises(MVCError, match="train.lr: .* not a finite number"):
            parse_args(build_parser("t"), [f"--train.lr={text}"])


@pytest.mark.parametrize("key, value, words", [
    ("train.adam_beta1", 1.0, ["< 1"]),  # torch.optim.Adam refuses a beta of 1
    ("classifier.batch_size", 1, [">= 2"]),  # BatchNorm cannot train on one image
    ("train.adam_beta2", 1, ["< 1"]),
    ("train.ema_decay", 1.0, ["< 1"]),
    ("data.test_fraction", 1.0, ["< 1"]),
    ("classifier.milestones", [0.5, 2.0], ["<= 1"]),
    ("run.seed", -1, [">= 0"]),
    ("run.seed", 2**64, ["<= 9223372036854775807"]),
    ("pairs.seed", 10**20, ["pairs.seed"]),
    ("classifier.seeds", [0, -2], ["classifier.seeds", ">= 0"]),
    ("classifier.seeds", [], ["at least 1"]),
    ("classifier.seeds", [1, 1], ["repeats"]),
    ("pipeline.seeds", [], ["at least 1"]),
    ("pipeline.runs", [], ["at least 1"]),
    ("pipeline.runs", ["real", "real"], ["repeats"]),
    ("mixing.ops", [], ["at least 1"]),
    ("evaluate.real_curve", [], ["at least 1"]),
    ("tiny.unet_channels", [], ["at least 1"]),
    ("tiny.unet_channels", [4, 8], [">= 8"]),
    ("tiny.unet_channels", [16, 24], ["multiples of 16"]),
    ("tiny.vae_channels", [8, 12], ["multiples of 8"]),
    ("tiny.vae_channels", [8, 8, 8, 8, 8, 8], ["tiny.image_size"]),
    ("tiny.latent_channels", 3, ["choose one of 4"]),
    ("tiny.checkpoint_every", 0, [">= 1"]),
    ("mixing.window", [5, 2], ["mixing.window", "non-empty"]),
    ("mixing.window", [1, 2, 3], ["mixing.window"]),
    ("mixing.ops", ["fine+coarse"], ["mixing.ops", "after editing embeddings"]),
    ("mixing.ops", ["blend"], ["mixing.ops", "blend"]),
    # a template is checked once, when the config is built, not by the first stage that formats it
    ("captions.prompt_template", "{caption:>10}, {label}", ["captions.prompt_template", "spec or conversion"]),
    ("captions.prompt_template", "{caption}, {label!r}", ["spec or conversion"]),
    ("captions.prompt_template", "{caption}, {label}}", ["malformed"]),
    ("captions.prompt_template", "{caption}, {label} {", ["malformed"]),
    ("captions.prompt_template", "{caption}, {label} {0}", ["unknown placeholder"]),
])
def test_ranges_lists_and_templates_are_checked_when_the_config_is_built(key, value, words):
    with pytest.raises(MVCError) as e:
        make_config(overrides={key: value})
    msg = str(e.value)
    assert key.split(".")[0] in msg and "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)


def test_a_section_is_a_mapping_or_nothing(tmp_path):
    f = tmp_path / "c.yaml"
    for text in ("train: fast\n", "train: [1, 2]\n", "train: 3\n"):
        f.write_text(text)
        with pytest.raises(MVCError, match="config section train: expected a mapping"):
            parse_args(build_parser("t"), ["--config", str(f)])
    # a section whose keys are all commented out is null: its defaults, as for an absent section
    f.write_text("train:\n#  lr: 0.5\nrun:\n  seed: 3\n")
    cfg, _ = parse_args(build_parser("t"), ["--config", str(f)])
    assert cfg.train == Config().train and cfg.run.seed == 3
    with pytest.raises(MVCError, match="config section train"):
        make_config(overrides={"train": "fast"})


def test_config_files_that_are_not_a_page_of_yaml(tmp_path):
    def error(text: bytes | str | None = None, path=None) -> str:
        p = path or tmp_path / "c.yaml"
        if text is not None:
            p.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(MVCError) as e, no_hang():
            parse_args(build_parser("t"), ["--config", str(p)])
        msg = str(e.value)
        assert "\n" not in msg and len(msg) < 300, msg
        return msg

    assert "not UTF-8" in error(b"run:\n  output_dir: caf\xe9\n")
    assert "empty" in error("")
    assert "empty" in error("# only a comment\n")
    assert "duplicate key 'lr' on lines 2 and 3" in error("train:\n  lr: 0.1\n  lr: 0.2\n")
    assert "duplicate key 'train'" in error("train:\n  lr: 0.1\ntrain:\n  max_steps: 3\n")
    assert "bytes" in error("#" * (2 << 20))
    assert "too deeply" in error("run:\n  output_dir: " + "[" * 5000 + "]" * 5000 + "\n")  # not a RecursionError
    assert "line 2, column 1" in error("train:\n\tlr: 0.5\n")  # where the problem is, not only its context
    assert "not a regular file" in error(path=tmp_path)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    assert "not a regular file" in error(path=fifo)  # refused, not opened (it would block)
    # a few hundred bytes of aliases that expand to billions of values: refused, with a short line
    bomb = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcdefgh", "bcdefghi"):
        bomb.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    bomb.append("pipeline:\n  runs: *i")
    assert len("\n".join(bomb)) < 600
    assert "aliases" in error("\n".join(bomb) + "\n")
    # an alias used as YAML intends stays fine
    (tmp_path / "ok.yaml").write_text("train:\n  resolution: &r 16\ntiny:\n  image_size: *r\n")
    cfg, _ = parse_args(build_parser("t"), ["--config", str(tmp_path / "ok.yaml")])
    assert cfg.tiny.image_size == cfg.train.resolution == 16


def test_error_lines_name_values_briefly():
    with pytest.raises(MVCError) as e:
        make_config(overrides={"run.output_dir": ["x" * 1000] * 1000})
    assert len(str(e.value)) < 200 and "run.output_dir" in str(e.value)
