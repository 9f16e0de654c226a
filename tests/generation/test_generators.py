"""The generator registry on the micro profile: every method writes one format that the classifier and the
evaluation read; records name method, parameters, seed and source; img2img follows its strength; the
baselines need no fine-tuned model; reruns resume; a wrong method is one line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import generate_mvc
from mvc.core.config import load_yaml, make_config, parse_args
from mvc.core.paths import RunPaths
from mvc.core.utils import MVCError, read_jsonl, run_cli
from mvc.generation.generators import GENERATORS
from tests.helpers import micro_argv, write_fashion_idx, write_random_ip2p

ROOT = Path(__file__).resolve().parents[2]

METHODS = ["mvc", "mvc_nomix", "txt2img", "img2img"]
PER_CLASS = 2


@pytest.fixture(scope="module")
def micro(tmp_path_factory, one_thread):
    """Fixture data, caches, a random tiny IP2P folder standing in for the fine-tuned model (mvc and
    mvc_nomix), and one run folder in which each method generated its set through generate_mvc.py."""
    base = tmp_path_factory.mktemp("generators")
    data = write_fashion_idx(base / "data")
    cache, out = base / "cache", base / "run"
    argv = lambda *extra: micro_argv(data, out, cache, f"--generate.per_class={PER_CLASS}", *extra)  # noqa: E731
    cfg, _ = parse_args(generate_mvc.build_parser("x"), argv())
    from mvc.data import load_splits

    labelled = load_splits(cfg.data)[0]
    model = write_random_ip2p(base / "finetuned", cfg.tiny, [c.lower() for c in labelled.classes])
    summaries = {}
    for m in METHODS:
        extra = [f"--generate.method={m}"] + ([f"--generate.model_dir={model}"] if m.startswith("mvc") else [])
        summaries[m] = generate_mvc.cli(argv(*extra))
    return SimpleNamespace(base=base, data=data, cache=cache, out=out, argv=argv, model=model, labelled=labelled,
                           summaries=summaries)


def config(micro, method, **over):
    """The micro config of `method` in the fixture's run folder (through the scripts' own parser)."""
    argv = micro.argv(f"--generate.method={method}", *[f"--{k}={json.dumps(v)}" for k, v in over.items()])
    return parse_args(generate_mvc.build_parser("x"), argv)[0]


def set_dir(micro, method) -> Path:
    return RunPaths.of(config(micro, method)).synthetic


#################################################################################
#                       One format for every generator                          #
#################################################################################

def test_the_registry_is_what_the_config_offers():
    assert GENERATORS.names()[:4] == METHODS
    assert [GENERATORS.get(m).finetuned for m in METHODS] == [True, True, False, False]
    for m in METHODS:
        assert make_config(overrides={"generate.method": m}).generate.method == m


def test_class_prompt_is_the_template_without_its_caption():
    from mvc.data.prompts import class_prompt

    assert class_prompt("{caption}, a photo of class type {label}", "Bag") == "a photo of class type Bag"
    assert class_prompt("a photo of {label}: {caption}", "Bag") == "a photo of Bag"
    assert class_prompt("a {caption} photo of a {label}", "Bag") == "a photo of a Bag"


@pytest.mark.parametrize("method", METHODS)
def test_each_set_is_read_by_the_classifier_loader_and_the_evaluation(micro, method):
    from accelerate import Accelerator

    from mvc.classifier.data import prepare_data
    from mvc.classifier.outputs import describe_run
    from mvc.evaluation.evaluate import evaluate_set

    planned = PER_CLASS * len(micro.labelled.classes)
    s = micro.summaries[method]
    assert s["method"] == method and s["images"] == s["made"] == planned
    where = set_dir(micro, method)
    assert where.name == ("synthetic" if method == "mvc" else f"synthetic_{method}")
    # the classifier's default synthetic_dir is the set the method wrote: no special case anywhere
    cfg = config(micro, method, **{"classifier.strategy": "concat"})
    data = prepare_data(describe_run(cfg, 0))
    assert len(data["synthetic"]) == planned
    x = data["synthetic"].load_image(0)
    assert x.size == (16, 16)
    assert sorted(np.bincount(data["synthetic"].targets).tolist()) == [PER_CLASS] * 10
    record = evaluate_set(cfg, where, Accelerator(cpu=True), cas=False, progress=False)
    assert record["images"] == planned and 0.0 <= record["fidelity"]["overall"] <= 1.0
    assert np.isfinite(record["frechet"]["synthetic_vs_test"])


def test_each_set_keeps_the_config_it_was_made_with(micro):
    from mvc.core.config import load_yaml

    for m in METHODS:  # one generate_mvc.py run per method in one run folder: none overwrote another's record
        assert load_yaml(micro.out / f"config-generate_{set_dir(micro, m).name}.yaml")["generate"]["method"] == m


@pytest.mark.parametrize("method", METHODS)
def test_records_name_method_parameters_seed_and_source(micro, method):
    where = set_dir(micro, method)
    settings = json.loads((where / "generation.json").read_text())["settings"]
    recs = read_jsonl(where / "metadata.jsonl")
    assert len(recs) == PER_CLASS * 10 and settings["method"] == method
    ids = list(micro.labelled.ids)
    for r in recs:
        assert r["method"] == method and r["seed"] == settings["seed"] == 0
        assert isinstance(r["generator_seed"], int)
        assert {"guidance_scale", "num_inference_steps", "scheduler", "resolution"} <= set(r)
        assert r["resolution"] == 16 and r["num_inference_steps"] == 2
        if method == "txt2img":  # the class prompt only: no real image went in
            assert r["source_id"] is None and r["source_index"] is None and r["use_caption"] is False
            assert r["prompt"] == f"a photo of class type {r['class_name']}"
        else:
            assert r["source_id"] == ids[r["source_index"]]
        if method == "img2img":
            assert r["strength"] == 0.5 and r["denoising_steps"] == 1 and r["prompt"].startswith("a photo of class type")
        if method.startswith("mvc"):
            assert r["model_dir"] == str(micro.model) and "image_guidance_scale" in r and r["caption"]
    gens = [r["generator_seed"] for r in recs]
    assert len(set(gens)) == len(gens)  # one noise stream per image
    if method == "mvc_nomix":
        assert {r["op"] for r in recs} == {"none"} and settings["mixing"] == {"ops": ["none"]}
    if method == "mvc":  # one variant per source here: variant 0 takes mixing.ops[0]
        assert {r["op"] for r in recs} == {"coarse"} and all("coarse_k" in r["op_params"] for r in recs)
    if method in ("txt2img", "img2img"):  # the tiny base folder, not a fine-tuned one
        assert Path(settings["base"]).is_dir() and all("model_dir" not in r for r in recs)
        assert all(r["base"] == settings["base"] for r in recs)


def test_nomix_differs_from_mvc_by_the_mixing(micro):
    """Same model, sources, files and noise: what differs between an mvc image and its mvc_nomix twin is
    the mixing alone."""
    from PIL import Image

    a, b = set_dir(micro, "mvc"), set_dir(micro, "mvc_nomix")
    f = sorted(r["file"] for r in read_jsonl(b / "metadata.jsonl"))
    mixed = np.stack([np.asarray(Image.open(a / x), np.int16) for x in f])
    plain = np.stack([np.asarray(Image.open(b / x), np.int16) for x in f])
    changed = np.abs(mixed - plain).reshape(len(f), -1).max(1) > 0
    assert changed.mean() >= 0.8, changed  # (a shuffle may draw back the same order for a short caption)


def test_caption_from_target_prompts_each_source_with_another_images_caption(micro, tmp_path):
    """generate.caption_from: 'source' (default, the paper's generation) prompts each source with its own
    caption; 'target' with the caption of another labelled image of its class, as a training pair's target."""
    from mvc.generation.generate import generate_synthetic
    from mvc.generation.generators import caption_partners

    own = {r["source_id"]: r["caption"] for r in read_jsonl(set_dir(micro, "mvc") / "metadata.jsonl")}
    assert all("caption_id" not in r for r in read_jsonl(set_dir(micro, "mvc") / "metadata.jsonl"))
    cfg = config(micro, "mvc", **{"generate.caption_from": "target", "generate.model_dir": str(micro.model),
                                  "generate.out_dir": str(tmp_path / "t"), "generate.per_class": 1})
    assert generate_synthetic(cfg, progress=False)["made"] == 10
    recs = read_jsonl(tmp_path / "t" / "metadata.jsonl")
    ids = [str(i) for i in micro.labelled.ids]
    for r in recs:
        assert r["caption_id"] != r["source_id"] and r["caption"] == own[r["caption_id"]], r
        assert micro.labelled.targets[ids.index(r["caption_id"])] == r["label"]  # same class
    assert caption_partners([4, 7, 9], "source", 0) == [0, 1, 2] and caption_partners([5], "target", 0) == [0]
    drawn = caption_partners(list(range(20)), "target", 0)
    assert all(k != p for p, k in enumerate(drawn)) and drawn == caption_partners(list(range(20)), "target", 0)


#################################################################################
#                           Without a fine-tuned model                          #
#################################################################################

def test_baselines_need_no_finetuned_model_and_mvc_does(micro, tmp_path, capsys):
    assert not (micro.out / "mvc").exists()  # nothing was fine-tuned in this run folder
    with pytest.raises(SystemExit):
        run_cli(generate_mvc.cli, micro_argv(micro.data, tmp_path / "run", micro.cache, "--generate.method=mvc"))
    err = capsys.readouterr().err.strip()
    assert "no fine-tuned pipeline" in err and "\n" not in err


def test_txt2img_with_captions_uses_the_caption_and_keeps_the_source(micro, tmp_path):
    from mvc.generation.generate import generate_synthetic

    cfg = config(micro, "txt2img", **{"generate.caption": True, "generate.out_dir": str(tmp_path / "cap"),
                                      "generate.per_class": 1})
    assert generate_synthetic(cfg, progress=False)["made"] == 10
    recs = read_jsonl(tmp_path / "cap" / "metadata.jsonl")
    for r in recs:
        assert r["use_caption"] is True and r["source_id"] == micro.labelled.ids[r["source_index"]]
        assert r["prompt"] == f"{r['caption']}, a photo of class type {r['class_name']}"


#################################################################################
#                                   img2img                                     #
#################################################################################

def _starting_points(base: Path, labelled, recs: list[dict], res: int = 16) -> list[np.ndarray]:
    """Each image's source as img2img starts from it: its VAE posterior drawn with the image's own generator,
    decoded (the micro VAE is a poor one, so this, not the source, is what a tiny strength stays near)."""
    from diffusers import AutoencoderKL

    from mvc.diffusion import sd_io

    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    mean, std = sd_io.encode_posteriors(vae, [labelled.load_image(r["source_index"]) for r in recs], res)
    gens = [torch.Generator().manual_seed(r["generator_seed"]) for r in recs]
    with torch.no_grad():
        z = sd_io.sample_init_latents(vae, mean, std, gens) / vae.config.scaling_factor
        return [np.asarray(im, np.float64) for im in sd_io.tensor_to_pil(vae.decode(z).sample)]


def test_img2img_strength_controls_the_distance_to_the_source(micro, tmp_path):
    """SDEdit with a tiny strength stays near its source (one small denoising step from a lightly noised
    latent); larger strengths move further, the largest furthest (from pure noise)."""
    from PIL import Image

    from mvc.generation.generate import generate_synthetic

    dist = {}
    for strength in (0.05, 0.5, 1.0):
        where = tmp_path / f"s{strength}"
        cfg = config(micro, "img2img", **{"generate.strength": strength, "generate.num_inference_steps": 20,
                                          "generate.out_dir": str(where), "generate.per_class": 1})
        generate_synthetic(cfg, progress=False)
        recs = read_jsonl(where / "metadata.jsonl")
        assert {r["strength"] for r in recs} == {strength}
        start = _starting_points(Path(recs[0]["base"]), micro.labelled, recs)
        dist[strength] = float(np.mean([np.abs(np.asarray(Image.open(where / r["file"]).convert("RGB"), np.float64)
                                               - x).mean() for r, x in zip(recs, start)]))
    assert dist[0.05] < dist[0.5] < dist[1.0], dist
    assert dist[0.05] < 0.1 * dist[1.0], dist  # measured: ~0.4 vs ~17 vs ~36 (of 255)


def test_img2img_batches_equal_the_plain_diffusers_pipeline(micro):
    """Our path (each source encoded once, posterior drawn with the image's generator, latents handed to the
    pipeline) == StableDiffusionImg2ImgPipeline called on the PIL image with the same generator."""
    from mvc.data.synthetic import plan_jobs
    from mvc.diffusion import sd_io
    from mvc.diffusion.inputs import load_base
    from mvc.diffusion.models import base_pipeline
    from mvc.generation.generators import make_generator

    cfg = config(micro, "img2img", **{"generate.num_inference_steps": 4})
    gen = make_generator(cfg)
    model = gen.model_path(micro.labelled)
    pipe = base_pipeline(load_base(cfg, None, micro.out, source=model), "img2img", cfg.generate.scheduler)
    gen.begin(pipe, model, 16)
    jobs = [j for j in plan_jobs(micro.labelled, ["none"], None, 2) if j.label == 3]
    state = gen.start_class(pipe, micro.labelled, 3, jobs, None, 16)
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(len(jobs))]  # noqa: E731
    ours, _ = gen.render(pipe, state, jobs, 0, gens())
    for i, (j, g) in enumerate(zip(jobs, gens())):
        ref = pipe(prompt=state["prompts"][j.source], image=sd_io.resize(micro.labelled.load_image(j.source), 16),
                   strength=0.5, num_inference_steps=4, guidance_scale=cfg.generate.guidance_scale,
                   generator=[g]).images[0]
        assert np.abs(np.asarray(ours[i], np.int16) - np.asarray(ref, np.int16)).max() <= 1


def test_img2img_without_a_denoising_step_is_refused():
    with pytest.raises(MVCError, match="generate.strength.*no img2img denoising step"):
        make_config(overrides={"generate.method": "img2img", "generate.strength": 0.05,
                               "generate.num_inference_steps": 10})
    with pytest.raises(MVCError, match="generate.strength"):
        make_config(overrides={"generate.method": "img2img", "generate.strength": 0.0})
    make_config(overrides={"generate.method": "txt2img", "generate.strength": 0.05, "generate.num_inference_steps": 10})


#################################################################################
#                       Resume, errors, every shipped config                    #
#################################################################################

def test_rerun_makes_only_the_missing_images(micro):
    where = set_dir(micro, "img2img")
    files = sorted(where.glob("*/*.png"))
    before = {f: f.stat().st_mtime_ns for f in files}
    assert generate_mvc.cli(micro.argv("--generate.method=img2img"))["made"] == 0
    assert {f: f.stat().st_mtime_ns for f in files} == before  # nothing rewritten
    files[3].unlink()
    again = generate_mvc.cli(micro.argv("--generate.method=img2img"))
    assert again["made"] == 1 and again["images"] == len(files) and files[3].is_file()
    # other settings in the same folder are refused, naming what differs
    with pytest.raises(MVCError, match="other settings.*strength"):
        generate_mvc.cli(micro.argv("--generate.method=img2img", "--generate.strength=1.0"))


def test_unknown_method_is_one_line_listing_the_choices(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(generate_mvc.cli, ["--generate.method=dreambooth2"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "generate.method" in err
    assert all(m in err for m in METHODS)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_selects_every_generator(path):
    tree = load_yaml(path)
    for m in METHODS:
        cfg = make_config(tree, {"generate.method": m})
        assert cfg.generate.method == m
        assert RunPaths.of(cfg).synthetic.name == ("synthetic" if m == "mvc" else f"synthetic_{m}")


@pytest.mark.parametrize("method", ["txt2img", "img2img"])
def test_baselines_sample_an_sd15_structured_base(micro, tmp_path, method):
    """The full profile's path: model.base a StableDiffusion folder with SD-1.5's classes and config keys (what
    the hub id loads), sampled at its native size read from its config files (here 64 px)."""
    from PIL import Image

    from mvc.diffusion.standins import save_sd15_structured
    from mvc.generation.generate import generate_synthetic

    base = save_sd15_structured(tmp_path / "sd15")
    cfg = config(micro, method, **{"model.base": str(base), "generate.out_dir": str(tmp_path / "set"),
                                   "generate.per_class": 1})
    s = generate_synthetic(cfg, labelled=micro.labelled, progress=False)
    assert s["made"] == 10 and s["resolution"] == 64
    recs = read_jsonl(tmp_path / "set" / "metadata.jsonl")
    assert {r["base"] for r in recs} == {str(base)} and {r["method"] for r in recs} == {method}
    assert all(Image.open(tmp_path / "set" / r["file"]).size == (64, 64) for r in recs)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None
                    or importlib.util.find_spec("datasets").origin is None, reason="the `datasets` library is not installed")
@pytest.mark.parametrize("method", ["txt2img", "img2img"])
def test_datasets_imagefolder_loader_reads_a_baseline_set(micro, method, monkeypatch, tmp_path):
    """The `datasets` loader reads every method's set as it is, null source ids included."""
    from datasets import load_dataset

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    where = set_dir(micro, method)
    ds = load_dataset("imagefolder", data_files={"train": f"{where}/**"}, split="train", cache_dir=str(tmp_path / "hf"))
    recs = read_jsonl(where / "metadata.jsonl")
    assert len(ds) == len(recs) and sorted(ds["label"]) == sorted(r["label"] for r in recs)
    assert set(ds["method"]) == {method}


@pytest.mark.parametrize("method", ["txt2img", "img2img"])
def test_baseline_shards_and_batches_do_not_change_the_set(micro, tmp_path, method):
    """Two processes' shards (rank 1 alone, then rank 0 merging) at batch 1 == one process at batch 8: each
    image's noise (and img2img's posterior draw) comes from its own generator."""
    from PIL import Image

    from mvc.generation.generate import generate_synthetic

    small = {"generate.per_class": 1, "generate.num_inference_steps": 4}
    one = config(micro, method, **small, **{"generate.out_dir": str(tmp_path / "one"), "generate.batch_size": 8})
    two = config(micro, method, **small, **{"generate.out_dir": str(tmp_path / "two"), "generate.batch_size": 1})
    generate_synthetic(one, progress=False)
    assert generate_synthetic(two, rank=1, world=2, progress=False)["made"] == 5
    assert generate_synthetic(two, rank=0, world=2, progress=False)["images"] == 10
    a, b = (read_jsonl(tmp_path / d / "metadata.jsonl") for d in ("one", "two"))
    assert [json.dumps(r, sort_keys=True) for r in a] == [json.dumps(r, sort_keys=True) for r in b]
    for r in a:
        x, y = (np.asarray(Image.open(tmp_path / d / r["file"]), np.int16) for d in ("one", "two"))
        assert np.abs(x - y).max() <= 1
