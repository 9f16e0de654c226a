"""DreamBooth on the micro profile: its set has the common format; class images are made once; a resumed
training equals an uninterrupted one; identifiers are rare, distinct and tokenize; LoRA trains adapters only;
bad settings are one line; other training settings never mix into a finished model or an existing set."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import generate_mvc
from mvc.core.config import make_config, parse_args
from mvc.core.utils import MVCError, read_jsonl
from tests.helpers import max_weight_diff, micro_argv, torchrun_two, unet_weights, write_fashion_idx

ROOT = Path(__file__).resolve().parents[2]

PER_CLASS = 2


@pytest.fixture(scope="module")
def micro(tmp_path_factory, one_thread):
    """Fixture data and caches, and one run folder in which generate_mvc.py trained DreamBooth and made its set."""
    base = tmp_path_factory.mktemp("dreambooth")
    data = write_fashion_idx(base / "data")
    cache, out = base / "cache", base / "run"
    argv = lambda out, *extra: micro_argv(data, out, cache, "--generate.method=dreambooth",  # noqa: E731
                                          f"--generate.per_class={PER_CLASS}", *extra)
    summary = generate_mvc.cli(argv(out))
    cfg = parse_args(generate_mvc.build_parser("x"), argv(out))[0]
    from mvc.data import load_splits

    return SimpleNamespace(base=base, data=data, cache=cache, out=out, argv=argv, summary=summary, cfg=cfg,
                           labelled=load_splits(cfg.data)[0])


def config(micro, out, **over):
    """The micro DreamBooth config writing to `out`, with overrides."""
    return parse_args(generate_mvc.build_parser("x"), micro.argv(out, *[f"--{k}={json.dumps(v)}"
                                                                         for k, v in over.items()]))[0]


def train(cfg, labelled):
    """Train (or reuse) the DreamBooth model of `cfg`: its final folder."""
    from mvc.generation.generators import make_generator

    return Path(make_generator(cfg).model_path(labelled, progress=False))


def class_image_stamps(out: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in sorted((out / "dreambooth" / "class_images").rglob("*.png"))}


#################################################################################
#                                The common format                              #
#################################################################################

def test_the_set_is_read_without_special_cases(micro):
    from mvc.classifier.data import prepare_data
    from mvc.classifier.outputs import describe_run
    from mvc.core.paths import RunPaths
    from mvc.data.synthetic import load_synthetic_set, read_records

    where = RunPaths.of(micro.cfg).synthetic
    assert where.name == "synthetic_dreambooth"
    planned = PER_CLASS * len(micro.labelled.classes)
    assert micro.summary["method"] == "dreambooth" and micro.summary["images"] == micro.summary["made"] == planned
    recs = read_records(where, micro.labelled.classes)
    ds = load_synthetic_set(where, micro.labelled.classes)
    assert len(recs) == len(ds) == planned and ds.load_image(0).size == (16, 16)
    assert sorted(np.bincount(ds.targets).tolist()) == [PER_CLASS] * 10
    cfg = config(micro, micro.out, **{"classifier.strategy": "concat"})
    assert len(prepare_data(describe_run(cfg, 0))["synthetic"]) == planned  # the classifier's default set is this one


def test_records_name_method_parameters_concept_and_no_single_source(micro):
    from mvc.core.paths import RunPaths

    where = RunPaths.of(micro.cfg).synthetic
    settings = json.loads((where / "generation.json").read_text())["settings"]
    final = micro.out / "dreambooth" / "final"
    info = json.loads((final / "mvc_training.json").read_text())
    assert settings["method"] == "dreambooth" and settings["model_dir"] == str(final.resolve())
    assert settings["dreambooth"] == info["settings"]  # every training setting changes the set's identity
    assert info["kind"] == "dreambooth" and info["steps"] == 4 and len(info["concepts"]) == 10
    by_label = {c["label"]: c for c in info["concepts"]}
    for r in read_jsonl(where / "metadata.jsonl"):
        c = by_label[r["label"]]
        assert r["method"] == "dreambooth" and r["seed"] == 0 and isinstance(r["generator_seed"], int)
        assert r["source_id"] is None and r["source_index"] is None  # made from the concept, not from one image
        assert r["identifier"] == c["identifier"] and r["concept_size"] == c["size"] == 2
        assert r["prompt"] == f"a photo of {c['identifier']} {r['class_name']}"
        assert r["resolution"] == 16 and r["num_inference_steps"] == 2 and r["model_dir"] == str(final)
        assert r["training_steps"] == 4 and r["lora_rank"] == 0 and r["prior_loss_weight"] == 1.0
    idents = [c["identifier"] for c in info["concepts"]]
    assert len(set(idents)) == 10 and idents[:2] == ["zqx", "zqj"]


def test_final_folder_is_a_plain_diffusers_pipeline(micro):
    from diffusers import StableDiffusionPipeline

    final = micro.out / "dreambooth" / "final"
    assert list((final / "unet").glob("*.safetensors")) and list((final / "text_encoder").glob("*.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(final, safety_checker=None, requires_safety_checker=False)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 16
    im = pipe("a photo of zqx Bag", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert im.size == (16, 16)


#################################################################################
#                          Class images, reuse, settings                        #
#################################################################################

def test_class_images_are_made_once_and_a_finished_model_is_reused(micro):
    from mvc.generation.generate import generate_synthetic

    stamps = class_image_stamps(micro.out)
    assert len(stamps) == 10 * micro.cfg.dreambooth.num_class_images
    final = micro.out / "dreambooth" / "final"
    before = final.stat().st_mtime_ns
    assert generate_synthetic(micro.cfg, progress=False)["made"] == 0
    assert final.stat().st_mtime_ns == before and class_image_stamps(micro.out) == stamps


def test_other_training_settings_are_refused_and_never_mix_into_the_set(micro, tmp_path):
    """A finished model trained otherwise is refused (naming the key); trained anew, it reuses the class images
    but its set cannot join the existing one."""
    from mvc.generation.generate import generate_synthetic

    out = tmp_path / "run"
    shutil.copytree(micro.out, out, symlinks=True)
    cfg = config(micro, out, **{"dreambooth.lr": 2e-3})
    with pytest.raises(MVCError, match=r"trained with other settings \(differ: dreambooth.lr\)") as e:
        generate_synthetic(cfg, progress=False)
    assert "\n" not in str(e.value)
    stamps = class_image_stamps(out)
    shutil.rmtree(out / "dreambooth" / "final")
    with pytest.raises(MVCError, match="cannot resume from .*dreambooth.lr.*delete .*checkpoints"):
        generate_synthetic(cfg, progress=False)  # this run's checkpoints were trained otherwise too
    shutil.rmtree(out / "dreambooth" / "checkpoints")
    with pytest.raises(MVCError, match=r"other settings \(differ: dreambooth\b"):
        generate_synthetic(cfg, progress=False)  # trained anew: the set made by the other model refuses it
    assert class_image_stamps(out) == stamps  # the class images were reused, none remade
    assert json.loads((out / "dreambooth" / "final" / "mvc_training.json").read_text())["settings"][
        "dreambooth.lr"] == 2e-3


def test_missing_class_images_are_made_on_the_next_run(micro, tmp_path):
    from mvc.diffusion.dreambooth import class_images, prior_settings

    cfg = config(micro, tmp_path / "run")
    folder = tmp_path / "priors"
    comps = _base_components(micro)
    files = class_images(cfg, comps, [3, 5], micro.labelled.classes, folder, 16, seed=0, progress=False)
    assert all(f.is_file() for fs in files.values() for f in fs) and len(files[3]) == 2
    first = files[5][1].read_bytes()
    files[5][1].unlink()
    stamp = files[3][0].stat().st_mtime_ns
    again = class_images(cfg, comps, [3, 5], micro.labelled.classes, folder, 16, seed=0, progress=False)
    assert again[5][1].read_bytes() == first and files[3][0].stat().st_mtime_ns == stamp  # same image, others kept
    assert prior_settings(cfg, "x", 16, 0) != prior_settings(config(micro, tmp_path, **{"dreambooth.prior_steps": 3}),
                                                             "x", 16, 0)


def test_processes_that_look_for_missing_class_images_at_different_times_make_every_one(micro, tmp_path):
    """Each process's share of the class images is fixed by the files, not by what is missing when it looks: one
    process done before the other starts (a late rank) still leaves every file made."""
    from mvc.diffusion.dreambooth import class_images

    cfg = config(micro, tmp_path / "run", **{"dreambooth.num_class_images": 4})
    comps = _base_components(micro)
    for rank in (0, 1):  # rank 1 looks after rank 0 wrote its share
        files = class_images(cfg, comps, [3, 5], micro.labelled.classes, tmp_path / "priors", 16, seed=0,
                             progress=False, rank=rank, world=2)
    assert [f.is_file() for fs in files.values() for f in fs] == [True] * 8


def _base_components(micro):
    from mvc.diffusion.inputs import load_base

    base = json.loads((micro.out / "dreambooth" / "final" / "mvc_training.json").read_text())["base_source"]
    return load_base(micro.cfg, None, micro.out, source=base)


#################################################################################
#                                 Resume, LoRA                                  #
#################################################################################

class Interrupted(Exception):
    pass


def test_resume_equals_uninterrupted(micro, tmp_path, monkeypatch):
    """Killed after the step-2 checkpoint, the next run resumes it and ends with the uninterrupted run's weights
    (U-Net and text encoder)."""
    from safetensors.torch import load_file

    import mvc.diffusion.engine as engine

    over = {"dreambooth.train_text_encoder": True, "dreambooth.lr_warmup_steps": 2}
    straight = train(config(micro, tmp_path / "a", **over), micro.labelled)
    real = engine.save_checkpoint

    def save_then_die(ckpt_dir, step, *a, **k):
        path = real(ckpt_dir, step, *a, **k)
        if step == 2:
            raise Interrupted
        return path

    cfg = config(micro, tmp_path / "b", **over)
    monkeypatch.setattr(engine, "save_checkpoint", save_then_die)
    with pytest.raises(Interrupted):
        train(cfg, micro.labelled)
    monkeypatch.setattr(engine, "save_checkpoint", real)
    assert not (tmp_path / "b" / "dreambooth" / "final").exists()
    resumed = train(cfg, micro.labelled)
    assert max_weight_diff(unet_weights(straight), unet_weights(resumed)) == 0.0
    te = [load_file(f / "text_encoder" / "model.safetensors") for f in (straight, resumed)]
    assert max_weight_diff(*te) == 0.0
    base = _base_components(micro)["text_encoder"].state_dict()
    assert any(not torch.equal(te[0][k], base[k]) for k in te[0])  # the text encoder did train
    steps = [r["step"] for r in read_jsonl(tmp_path / "b" / "dreambooth" / "log.jsonl")]
    assert steps == [1, 2, 3, 4]  # the log holds each step once


def test_lora_trains_only_the_adapters_and_saves_them_merged(micro, tmp_path):
    from mvc.core.checkpoint import list_checkpoints, load_checkpoint

    cfg = config(micro, tmp_path / "run", **{"dreambooth.lora_rank": 2, "dreambooth.train_text_encoder": True,
                                             "dreambooth.max_steps": 2, "dreambooth.lr": 1e-2})
    final = train(cfg, micro.labelled)
    ckpt = load_checkpoint(list_checkpoints(tmp_path / "run" / "dreambooth" / "checkpoints")[-1], "dreambooth")
    for part in ("unet", "text_encoder"):
        assert ckpt[part] and all("lora_" in n for n in ckpt[part]), part  # adapters only: no conv_in, no base
    saved, base = unet_weights(final), _base_components(micro)["unet"].state_dict()
    assert set(saved) == set(base)  # merged: a plain U-Net
    changed = {k for k in base if not torch.equal(saved[k], base[k])}
    assert changed and all(any(t in k for t in ("to_q", "to_k", "to_v", "to_out.0")) for k in changed)


#################################################################################
#                          Identifiers, concepts, loss                          #
#################################################################################

def test_default_identifiers_are_rare_distinct_deterministic_and_tokenize(micro):
    from itertools import islice

    from mvc.data.prompts import rare_identifiers
    from mvc.diffusion.dreambooth import check_prompt_tokens, make_concepts
    from mvc.diffusion.tokenizer import build_tiny_tokenizer

    first = list(islice(rare_identifiers(), 600))
    assert first == list(islice(rare_identifiers(), 600)) and len(set(first)) == 600
    assert all(s.isascii() and s.islower() and s.isalpha() for s in first) and len(first[-1]) == 4
    # the tiny tokenizer is a CLIPTokenizer (CLIP's normalizer and byte-level pre-tokenizer): no unknown token
    tok = build_tiny_tokenizer(micro.labelled.classes, max_length=77)
    for s in first:
        assert tok.unk_token_id not in tok(s, add_special_tokens=False)["input_ids"]
    concepts = make_concepts(micro.labelled)
    check_prompt_tokens(tok, concepts, micro.cfg.dreambooth.instance_prompt, micro.labelled.classes)
    assert [c.identifier for c in concepts] == first[:10] and [c.label for c in concepts] == list(range(10))
    with pytest.raises(MVCError, match="more than the tokenizer's 4"):
        check_prompt_tokens(build_tiny_tokenizer(max_length=4), concepts, "a photo of {identifier} {label}",
                            micro.labelled.classes)


def test_concepts_from_a_caller_several_per_class(micro, tmp_path):
    """A pre-step's groups (here: each labelled image its own concept) train one model with one identifier per
    group; each source is generated from its own concept's prompt."""
    from mvc.diffusion.dreambooth import make_concepts
    from mvc.generation.generate import generate_synthetic
    from mvc.generation.generators import DreamBoothGenerator

    targets = np.asarray(micro.labelled.targets)
    groups = [(int(targets[i]), [i]) for i in range(len(targets))]
    cfg = config(micro, tmp_path / "run", **{"dreambooth.max_steps": 1, "generate.per_class": 2})
    s = generate_synthetic(cfg, progress=False, method=DreamBoothGenerator(cfg, groups))
    assert s["images"] == 20
    recs = read_jsonl(tmp_path / "run" / "synthetic_dreambooth" / "metadata.jsonl")
    concepts = make_concepts(micro.labelled, groups)
    for r in recs:  # each file is named after its source: its identifier is that source's own
        k = next(k for k, c in enumerate(concepts) if c.indices == (int(r["file"].split("/")[1][:5]),))
        assert r["concept"] == k and r["identifier"] == concepts[k].identifier and r["concept_size"] == 1
    assert len({r["identifier"] for r in recs}) == 20
    with pytest.raises(MVCError, match="not a labelled image of that class"):
        make_concepts(micro.labelled, [(0, [int(np.flatnonzero(targets == 1)[0])])])
    with pytest.raises(MVCError, match="2 identifier.*for 10 concepts"):
        make_concepts(micro.labelled, identifiers=["aa", "bb"])
    with pytest.raises(MVCError, match="no DreamBooth concept for class 'Trouser'"):
        DreamBoothGenerator(cfg, [g for g in groups if g[0] != 1]).check(micro.labelled)


def test_prior_preservation_loss_contract():
    from mvc.diffusion.dreambooth import prior_preservation_loss

    per = torch.tensor([1.0, 3.0, 10.0, 20.0, 30.0])  # 2 instance rows, 3 class rows
    loss, inst, prior = prior_preservation_loss(per, 2, 0.5)
    assert inst.item() == 2.0 and prior.item() == 20.0 and loss.item() == 12.0
    assert prior_preservation_loss(per, 2, 0.0)[0].item() == 2.0  # weight 0: the instance loss alone
    loss, inst, prior = prior_preservation_loss(per[:2], 2, 1.0)  # no class rows: no prior term
    assert loss.item() == inst.item() == 2.0 and prior.item() == 0.0


@pytest.mark.parametrize("key,value,match", [
    ("dreambooth.lr", 0, "dreambooth.lr: 0.0 is out of range"),
    ("dreambooth.max_steps", 0, "dreambooth.max_steps"),
    ("dreambooth.prior_loss_weight", math.nan, "dreambooth.prior_loss_weight: nan is not a finite number"),
    ("dreambooth.num_class_images", -1, "dreambooth.num_class_images"),
    ("dreambooth.lora_rank", -2, "dreambooth.lora_rank"),
    ("dreambooth.prior_scheduler", "plms", "dreambooth.prior_scheduler: unknown value"),
    ("dreambooth.instance_prompt", "a photo of {label}", r"dreambooth.instance_prompt.*lacks \{identifier\}"),
    ("dreambooth.instance_prompt", "a {identifier} {label} {caption}", r"unknown placeholder\(s\) \{caption\}"),
    ("dreambooth.identifiers", ["zqx", "zqx"], "repeats a value"),
    ("dreambooth.identifiers", ["zqx", "ZQX"], "lower-casing"),
    ("dreambooth.identifiers", ["two words"], "one word without spaces"),
    ("dreambooth.train_text_encoder", "yes", "expected bool"),
])
def test_bad_settings_are_one_line(key, value, match):
    with pytest.raises(MVCError, match=match) as e:
        make_config(overrides={"generate.method": "dreambooth", key: value})
    assert "\n" not in str(e.value)


def test_trains_and_samples_an_sd15_structured_base(micro, tmp_path):
    """The full profile's path: model.base a StableDiffusion folder with SD-1.5's classes and config keys (PNDM
    scheduler, 77-token CLIP tokenizer), trained and sampled at its native size (here 64 px)."""
    from mvc.diffusion.standins import save_sd15_structured
    from mvc.generation.generate import generate_synthetic

    base = save_sd15_structured(tmp_path / "sd15")
    cfg = config(micro, tmp_path / "run", **{"model.base": str(base), "generate.per_class": 1,
                                             "dreambooth.max_steps": 1, "dreambooth.batch_size": 2})
    s = generate_synthetic(cfg, labelled=micro.labelled, progress=False)
    assert s["made"] == 10 and s["resolution"] == 64
    info = json.loads((tmp_path / "run" / "dreambooth" / "final" / "mvc_training.json").read_text())
    assert info["resolution"] == 64 and info["settings"]["base"] == str(base.resolve())


def test_clustering_based_sampling_trains_one_identifier_per_kept_cluster(micro, tmp_path):
    """sampling.method=clusters: one concept (identifier) per kept cluster with its kept images, in its own
    dreambooth_clusters/ folder; each image's record names the concept of a kept source."""
    from mvc.data.synthetic import read_records
    from mvc.diffusion.models import training_info

    summary = generate_mvc.cli(micro.argv(tmp_path, "--sampling.method=clusters", "--sampling.clusters_per_class=2",
                                          "--dreambooth.max_steps=2"))
    assert not (tmp_path / "dreambooth").exists()
    concepts = training_info(tmp_path / "dreambooth_clusters" / "final")["concepts"]
    images = json.loads(next((tmp_path / "clusters").glob("*.json")).read_text())["images"]
    ids = [str(i) for i in micro.labelled.ids]
    kept = {ids[im["index"]] for im in images if im["kept"]}
    idents = [c["identifier"] for c in concepts]
    assert len(set(idents)) == len(idents) and len(concepts) >= len(micro.labelled.classes)
    assert {i for c in concepts for i in c["source_ids"]} == kept  # the kept images only, each in one concept
    recs = read_records(tmp_path / "synthetic_dreambooth_clusters", micro.labelled.classes)
    assert summary["images"] == len(recs) == PER_CLASS * len(micro.labelled.classes)
    assert {r["identifier"] for r in recs} <= set(idents)


#################################################################################
#                              Several processes                                #
#################################################################################

def _close(a: dict, b: dict) -> None:
    """Two state dicts equal up to float summation order: Adam divides by sqrt(v), so a gradient that is ~0 up to
    rounding may flip its update's sign (a few lr-sized outliers); everything else agrees closely."""
    assert set(a) == set(b)
    d = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])
    assert d.mean().item() < 1e-5 and (d > 1e-5).float().mean().item() < 0.03 and d.max().item() < 5e-3, d.max()


@pytest.mark.slow
def test_two_processes_train_what_one_does_and_resume_it(micro, tmp_path):
    """generate_mvc.py under torchrun (2 CPU processes, gloo): DDP over the U-Net and the text encoder, each
    process its rows of every global batch; interrupted after the step-2 checkpoint and resumed, the 2-process run
    ends with the one-process uninterrupted weights; so does LoRA (adapters only, merged)."""

    from safetensors.torch import load_file

    from mvc.core.checkpoint import list_checkpoints, load_checkpoint

    r = torchrun_two(Path(__file__).resolve(), str(micro.data), str(micro.cache), str(tmp_path), timeout=400)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    ref, got = micro.out / "dreambooth" / "final", tmp_path / "full" / "dreambooth" / "final"
    _close(unet_weights(ref), unet_weights(got))
    _close(*[load_file(f / "text_encoder" / "model.safetensors") for f in (ref, got)])
    ckpts = list_checkpoints(tmp_path / "full" / "dreambooth" / "checkpoints")
    assert [load_checkpoint(p)["world_size"] for p in ckpts] == [2, 2]
    steps = [r["step"] for r in read_jsonl(tmp_path / "full" / "dreambooth" / "log.jsonl")]
    assert steps == [1, 2, 3, 4]  # resumed: each step logged once
    assert len(read_jsonl(tmp_path / "full" / "synthetic_dreambooth" / "metadata.jsonl")) == PER_CLASS * 10
    lora = train(config(micro, tmp_path / "lora_one", **LORA), micro.labelled)
    _close(unet_weights(lora), unet_weights(tmp_path / "lora" / "dreambooth" / "final"))


LORA = {"dreambooth.lora_rank": 2, "dreambooth.lr": 1e-2}


def _worker(data: str, cache: str, out: str) -> None:
    """torchrun worker of the test above: 2 steps, the final folder removed (a run killed after its step-2
    checkpoint), then generate_mvc.py with 4 steps, which resumes and makes the set; then 4 LoRA steps."""
    from mvc.core.distributed import make_accelerator
    from mvc.data import load_splits
    from mvc.generation.generators import make_generator

    argv = lambda run, *extra: micro_argv(Path(data), Path(out) / run, Path(cache),  # noqa: E731
                                          "--generate.method=dreambooth", f"--generate.per_class={PER_CLASS}", *extra)
    parse = lambda *a: parse_args(generate_mvc.build_parser("x"), argv(*a))[0]  # noqa: E731
    acc = make_accelerator()
    labelled = load_splits(parse("full").data)[0]
    for cfg in (parse("full", "--dreambooth.max_steps=2"), parse("lora", *[f"--{k}={v}" for k, v in LORA.items()])):
        final = make_generator(cfg).shared_model_path(labelled, None, False, acc.device, acc.is_main_process,
                                                 acc.wait_for_everyone)
        if cfg.dreambooth.max_steps == 2 and acc.is_main_process:
            shutil.rmtree(final)
        acc.wait_for_everyone()
    generate_mvc.cli(argv("full"))


if __name__ == "__main__":
    _worker(*sys.argv[1:4])
