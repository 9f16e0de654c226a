"""generate_synthetic on a tiny random InstructPix2Pix folder: files, metadata, resume, shards, batching."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mvc.generation.generate as gen
from mvc.core.config import TinyBaseConfig, make_config
from mvc.core.utils import MVCError, read_jsonl
from mvc.data import ArraySource, ImageDataset
from mvc.data.synthetic import Job, SyntheticSet, class_folder, plan_jobs, shard_jobs, variants_per_source
from mvc.diffusion import sd_io
from mvc.diffusion.models import SAMPLERS, build_sampler, load_ip2p_pipeline
from mvc.generation.generators import render
from tests.helpers import write_random_ip2p

try:
    from tests.data.test_synthetic import _has_datasets_library
except ImportError:  # run from elsewhere
    _has_datasets_library = lambda: False  # noqa: E731

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(image_size=16, vae_channels=[16, 32], unet_channels=[32, 64], text_hidden=32, text_layers=1, max_length=16)
CAPTIONS = {"train/0": "dark small round", "train/1": "bright large", "train/2": "thin tall dark",
            "train/3": "pale wide flat shape", "train/4": "soft plain"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random tiny IP2P pipeline saved as a folder, as train_mvc.py writes it."""
    return write_random_ip2p(tmp_path_factory.mktemp("model") / "final", TinyBaseConfig(**TINY), ["trouser"])


@pytest.fixture(scope="module")
def pipe(model_dir):
    return load_ip2p_pipeline(model_dir, "euler_ancestral")


def make_labelled():
    """Five random 20x20 grey images in two classes."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (5, 20, 20), dtype=np.uint8)
    # a class name with a slash: folder names go through safe_name
    return ImageDataset("toy", "train", ["t-shirt/top", "trouser"], [0, 0, 0, 1, 1],
                        [f"train/{i}" for i in range(5)], ArraySource(images))


@pytest.fixture(scope="module")
def labelled():
    return make_labelled()


def make_cfg(tmp, model_dir, out="out", **over):
    base = {"generate.out_dir": str(tmp / out), "generate.model_dir": str(model_dir), "run.output_dir": str(tmp),
            "generate.num_inference_steps": 1, "generate.per_class": 4, "generate.batch_size": 4,
            "mixing.ops": ["coarse", "fine"], "mixing.fine_s": 2, "mixing.coarse_k": 2, "mixing.fine_m": 2}
    base.update(over)
    return make_config(overrides=base)


def run(cfg, labelled, pipe, **kw):
    return gen.generate_synthetic(cfg, labelled=labelled, captions=CAPTIONS, pipe=pipe, progress=False, **kw)


def pngs(out):
    return sorted(p.relative_to(out).as_posix() for p in Path(out).rglob("*.png"))


def torch_generator(seed, *index):
    """A torch.Generator per (seed, index): the tests only need distinct, repeatable streams."""
    return torch.Generator().manual_seed(hash((seed, *index)) & 0xFFFFFFFF)


def encode(pipe, prompts):
    return sd_io.encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts)


FOLDERS = [class_folder(0, "t-shirt/top", 2), class_folder(1, "trouser", 2)]  # '000_t-shirt_top', '001_trouser'


def pixels(out, f):
    return np.asarray(Image.open(Path(out) / f), dtype=np.int16)


@pytest.fixture
def count_saves(monkeypatch):
    calls = []
    real = SyntheticSet.save_image

    def counting(self, image, job):
        calls.append(job.file)
        real(self, image, job)

    monkeypatch.setattr(SyntheticSet, "save_image", counting)
    return calls


#################################################################################
#                                    plan                                       #
#################################################################################

def test_plan_sizes_and_spread(labelled):
    assert variants_per_source(3, 7) == [3, 2, 2]
    jobs = plan_jobs(labelled, ["coarse", "fine"], multiplier=2.0)
    per_class = np.bincount([j.label for j in jobs])
    assert list(per_class) == [6, 4]  # 2 x (3 real, 2 real)
    assert [j.op for j in jobs if j.source == 0] == ["coarse", "fine"]
    assert len({j.file for j in jobs}) == len(jobs)
    assert len(plan_jobs(labelled, ["none"], per_class=5)) == 10
    shards = [shard_jobs(jobs, r, 3) for r in range(3)]
    assert sorted(j.index for s in shards for j in s) == list(range(len(jobs)))
    assert {j.file.split("/")[0] for j in jobs} == set(FOLDERS)


#################################################################################
#                         generation, metadata, resume                          #
#################################################################################

def test_generates_valid_imagefolder_and_rerun_is_idempotent(tmp_path, model_dir, pipe, labelled, count_saves):
    from torchvision.datasets import ImageFolder

    cfg = make_cfg(tmp_path, model_dir)
    out = tmp_path / "out"
    summary = run(cfg, labelled, pipe)
    files = pngs(out)
    assert summary["images"] == summary["made"] == len(files) == 8 == len(count_saves)
    meta = read_jsonl(out / "metadata.jsonl")
    assert sorted(r["file"] for r in meta) == files
    assert summary["resolution"] == 16  # the model's own size (no mvc_training.json in this folder)
    for r in meta:
        im = Image.open(out / r["file"])
        im.load()
        assert im.size == (16, 16)
        assert r["class_name"] == labelled.classes[r["label"]] and r["file_name"] == r["file"]
        assert r["source_id"] == labelled.ids[r["source_index"]]
        for key in ("variant", "seed", "op", "op_params", "guidance_scale", "image_guidance_scale",
                    "num_inference_steps", "scheduler", "model_dir"):
            assert key in r
    assert {r["op"] for r in meta} == {"coarse", "fine"} and {r["method"] for r in meta} == {"mvc"}
    assert all(r["op_params"]["coarse_stage"] == "tokens" for r in meta if r["op"] == "coarse")  # the default
    ds = ImageFolder(str(out))
    assert len(ds) == 8 and ds.classes == FOLDERS
    by_file = {r["file_name"]: r for r in meta}
    for path, y in ds.samples:  # torchvision's class index of every image is its label
        assert by_file[Path(path).relative_to(out).as_posix()]["label"] == y
    if _has_datasets_library():  # and the `datasets` loader reads every record, nested op_params included
        from datasets import load_dataset

        hf = load_dataset("imagefolder", data_files={"train": f"{out}/**"}, split="train",
                          cache_dir=str(tmp_path / "hf-cache"))
        rows = hf.remove_columns("image")  # (file_name became the image; `file` is the same path)
        assert sorted((r["file"], r["label"], r["op"]) for r in rows) == sorted((r["file"], r["label"], r["op"])
                                                                             for r in meta)
    # grids and TensorBoard live beside the ImageFolder
    grids = tmp_path / "out_grids"
    assert (grids / "t-shirt_top.png").is_file() and list((grids / "tb").iterdir())
    # a rerun makes nothing and leaves metadata unchanged
    before = (out / "metadata.jsonl").read_text()
    count_saves.clear()
    assert run(cfg, labelled, pipe)["made"] == 0 and count_saves == []
    assert (out / "metadata.jsonl").read_text() == before
    # a larger set keeps the existing images and adds only the new ones
    run(make_cfg(tmp_path, model_dir, **{"generate.per_class": 5}), labelled, pipe)
    assert len(count_saves) == 2 and len(read_jsonl(out / "metadata.jsonl")) == 10


def test_crash_then_resume_without_duplicates(tmp_path, model_dir, pipe, labelled, monkeypatch):
    cfg = make_cfg(tmp_path, model_dir)
    out = tmp_path / "out"
    real, saved = SyntheticSet.save_image, []

    def crashing(self, image, job):
        if len(saved) == 3:
            raise RuntimeError("simulated crash")
        real(self, image, job)
        saved.append(job.file)

    monkeypatch.setattr(SyntheticSet, "save_image", crashing)
    with pytest.raises(RuntimeError):
        run(cfg, labelled, pipe)
    assert len(pngs(out)) == 3
    part = read_jsonl(out / "metadata.rank0.jsonl")
    assert len(part) == 3 and all((out / r["file"]).is_file() for r in part)
    # a crash between file and record (an image of ours without its line), a lost file, and a temp
    # file from a killed write
    lost = part[0]["file"]
    orphan = f"{FOLDERS[0]}/00002_v000.png"
    (out / orphan).write_bytes((out / part[1]["file"]).read_bytes())  # marked as ours, no record
    (out / lost).unlink()
    (out / FOLDERS[0] / ".00002_v000.png.tmp123.png").write_bytes(b"half")

    calls = []
    monkeypatch.setattr(SyntheticSet, "save_image", lambda self, im, j: (calls.append(j.file), real(self, im, j)))
    summary = run(cfg, labelled, pipe)
    assert summary["images"] == 8 and len(calls) == 8 - 2  # 2 survived with their lines
    assert orphan in calls  # regenerated, not trusted
    meta = read_jsonl(out / "metadata.jsonl")
    assert sorted(r["file"] for r in meta) == pngs(out) and len(meta) == len({r["file"] for r in meta}) == 8
    assert not list(out.rglob(".*")) and not list(out.glob("metadata.rank*"))


def test_two_shards_equal_one_process_and_batch_size_does_not_matter(tmp_path, model_dir, pipe, labelled):
    small = {"generate.per_class": 2}
    single = make_cfg(tmp_path, model_dir, out="single", **small, **{"generate.batch_size": 4})
    sharded = make_cfg(tmp_path, model_dir, out="sharded", **small, **{"generate.batch_size": 1})
    run(single, labelled, pipe)
    r1 = run(sharded, labelled, pipe, rank=1, world=2)  # rank 1 alone: leaves its lines in a per-rank file
    assert r1["made"] == 2 and (tmp_path / "sharded" / "metadata.rank1.jsonl").is_file()
    r0 = run(sharded, labelled, pipe, rank=0, world=2)  # rank 0 merges
    assert r0["made"] == 2 and r0["images"] == 4
    a, b = tmp_path / "single", tmp_path / "sharded"
    assert pngs(a) == pngs(b)
    strip = lambda recs: sorted(json.dumps(r, sort_keys=True) for r in recs)  # noqa: E731
    assert strip(read_jsonl(a / "metadata.jsonl")) == strip(read_jsonl(b / "metadata.jsonl"))
    for f in pngs(a):  # same (source, variant) -> same image whatever the batch (float noise: <= 1 level)
        assert np.abs(pixels(a, f) - pixels(b, f)).max() <= 1


def test_pipeline_dtype_fp32_on_cpu_by_default_bf16_when_asked(tmp_path, model_dir, labelled):
    """generate.dtype: null loads the pipeline in fp32 on the CPU (fp16 on CUDA); bf16 loads it in bf16 and
    samples in it; the dtype is one of the settings the set records (its images differ)."""
    default = gen.generate_synthetic(make_cfg(tmp_path, model_dir, "fp32"), labelled=labelled, captions=CAPTIONS,
                                     progress=False)
    half = gen.generate_synthetic(make_cfg(tmp_path, model_dir, "bf16", **{"generate.dtype": "bf16"}),
                                  labelled=labelled, captions=CAPTIONS, progress=False)
    assert default["dtype"] == "fp32" and half["dtype"] == "bf16" and half["made"] == default["made"] == 8
    recorded = {d: json.loads((tmp_path / d / "generation.json").read_text())["settings"]["dtype"]
                for d in ("fp32", "bf16")}
    assert recorded == {"fp32": "fp32", "bf16": "bf16"}
    assert pngs(tmp_path / "fp32") == pngs(tmp_path / "bf16")
    with pytest.raises(MVCError, match="generate.dtype"):
        make_cfg(tmp_path, model_dir, **{"generate.dtype": "fp8"})


def test_batched_render_equals_the_plain_pipeline(pipe, labelled):
    """Our path (shared latents/embeddings, batch of 3) == one diffusers call per image with its prompt."""
    from mvc.data.prompts import make_prompt

    template = "{caption}, a photo of class type {label}"
    srcs = [0, 3]
    prompts = [make_prompt(template, CAPTIONS[labelled.ids[s]], labelled.classes[labelled.targets[s]]) for s in srcs]
    images = [sd_io.resize(labelled.load_image(s), 16) for s in srcs]
    emb = encode(pipe, prompts)
    neg = encode(pipe, [""]).expand(len(srcs), -1, -1)
    lat = sd_io.encode_conditions(pipe.vae, images, 16)
    ours = render(pipe, emb, neg, lat, [torch_generator(0, s, 0) for s in srcs], 2, 3.0, 1.5)
    for i, s in enumerate(srcs):
        ref = pipe(prompt=prompts[i], image=images[i], num_inference_steps=2, guidance_scale=3.0,
                   image_guidance_scale=1.5, generator=torch_generator(0, s, 0)).images[0]
        assert np.abs(np.asarray(ours[i], np.int16) - np.asarray(ref, np.int16)).max() <= 1


@pytest.mark.parametrize("scheduler", SAMPLERS.names())
def test_every_scheduler_renders(pipe, scheduler):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    # the loaded components with another scheduler (load_ip2p_pipeline's own choice is checked on the fixture)
    assert type(pipe.scheduler).__name__ == SAMPLERS.get("euler_ancestral")[0]
    p = StableDiffusionInstructPix2PixPipeline(**{**pipe.components, "scheduler": build_sampler(
        scheduler, pipe.scheduler.config)}, requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    assert type(p.scheduler).__name__ == SAMPLERS.get(scheduler)[0]
    e = encode(p, ["dark"])
    ims = render(p, e, encode(p, [""]), torch.zeros(1, 4, 8, 8), [torch_generator(0, 0, 0)], 2, 3.0, 1.5)
    assert ims[0].size == (16, 16)


#################################################################################
#                   coarse mixing: token ids vs output embeddings               #
#################################################################################

def test_embed_shuffle_is_invisible_to_the_unet_token_shuffle_is_not(pipe):
    """Why mixing.coarse_stage defaults to 'tokens': SD's cross-attention has no positions on the text side,
    so permuting the encoder's OUTPUT vectors leaves the U-Net's prediction unchanged (float rounding);
    permuting the token ids BEFORE the encoder (positions + causal attention) changes it."""
    from mvc.generation.mixing import coarse_mix

    ids, _ = sd_io.tokenize(pipe.tokenizer, ["dark small round shape, a photo of class type trouser"])  # (1, T)
    emb = sd_io.encode_ids(pipe.text_encoder, ids)  # (1, T, D)
    x = torch.randn(1, 8, 8, 8, generator=torch.Generator().manual_seed(0))  # (noisy target | condition) latents
    t = torch.tensor([500])
    with torch.no_grad():
        eps = lambda e: pipe.unet(x, t, encoder_hidden_states=e).sample  # noqa: E731
        ref = eps(emb)
        for seed in range(2):
            shuffled = coarse_mix(emb, torch.Generator().manual_seed(seed), k=4, window=(1, 5))
            assert (shuffled - emb).abs().max() > 0.1  # the embedding itself did change a lot
            d_embed = float((eps(shuffled) - ref).abs().max())
            tok = coarse_mix(ids, torch.Generator().manual_seed(seed), k=4, window=(1, 5))
            d_token = float((eps(sd_io.encode_ids(pipe.text_encoder, tok)) - ref).abs().max())
            assert d_embed < 1e-4
            assert d_token > 100 * max(d_embed, 1e-6), (d_token, d_embed)


def test_default_coarse_changes_the_image_embed_stage_shuffle_does_not(tmp_path, model_dir, pipe, labelled):
    """Same seeds, so the diffusion noise is shared: the only difference with 'none' is the mixing."""
    # a random tiny model reacts weakly to text: 2 steps and strong text guidance make the effect visible
    small = {"generate.per_class": 2, "run.seed": 3, "generate.num_inference_steps": 2, "generate.guidance_scale": 7.5}
    run(make_cfg(tmp_path, model_dir, out="none", **small, **{"mixing.ops": ["none"]}), labelled, pipe)
    run(make_cfg(tmp_path, model_dir, out="tok", **small, **{"mixing.ops": ["coarse"]}), labelled, pipe)
    run(make_cfg(tmp_path, model_dir, out="emb", **small, **{"mixing.ops": ["coarse"],
                                                           "mixing.coarse_stage": "embeds"}), labelled, pipe)
    files = pngs(tmp_path / "none")
    assert files == pngs(tmp_path / "tok") == pngs(tmp_path / "emb") and len(files) == 4
    tok_diff = [np.abs(pixels(tmp_path / "tok", f) - pixels(tmp_path / "none", f)).mean() for f in files]
    emb_diff = [np.abs(pixels(tmp_path / "emb", f) - pixels(tmp_path / "none", f)).max() for f in files]
    assert min(tok_diff) > 0.5, tok_diff  # every token-shuffled variant is a different image (measured: 2-3 levels)
    assert max(emb_diff) <= 1, emb_diff  # embedding-level shuffle: the same image (rounding only)
    meta = read_jsonl(tmp_path / "tok" / "metadata.jsonl")
    for r in meta:
        p = r["op_params"]
        assert p["coarse_stage"] == "tokens" and p["coarse_mode"] == "shuffle"
        w0, w1 = p["window"]
        caption_tokens = [t.replace("</w>", "") for t in p["mixed_tokens"]]
        assert len(caption_tokens) == w1 - w0 and caption_tokens != r["caption"].split()  # reordered
    assert all(r["op_params"]["coarse_stage"] == "embeds" for r in read_jsonl(tmp_path / "emb" / "metadata.jsonl"))


def test_token_swap_stays_inside_both_captions(pipe, labelled):
    """Swap at the token stage: positions where source and donor both have caption tokens (never EOS/template)."""
    from mvc.generation.mixing import ClassPrompts, mix_prompts, mixing_params

    cfg = make_config(overrides={"mixing.coarse_mode": "swap", "mixing.coarse_k": 4})
    enc = lambda ids, mask: sd_io.encode_ids(pipe.text_encoder, ids, mask)  # noqa: E731
    sources = [0, 1, 2]
    ids = [labelled.ids[s] for s in sources]
    ctx = ClassPrompts.build(sources, ids, [CAPTIONS[i] for i in ids], "t-shirt/top", cfg.captions.prompt_template,
                             "caption", pipe.tokenizer, enc)
    jobs = [Job(i, 0, "t-shirt/top", FOLDERS[0], s, labelled.ids[s], v, "coarse") for i, (s, v) in
            enumerate((s, v) for s in ctx.sources for v in range(3))]
    embeds, op_ps, _ = mix_prompts(jobs, ctx, mixing_params(cfg.mixing), 0, enc, pipe.tokenizer.convert_ids_to_tokens)
    assert embeds.shape == (len(jobs), *ctx.embeds[0].shape)
    for j, p in zip(jobs, op_ps):
        d = p["donor_index"]
        (w0, w1), (c0, c1) = ctx.windows[j.source], p["coarse_window"]
        assert (c0, c1) == (max(w0, ctx.windows[d][0]), min(w1, ctx.windows[d][1])) and p["coarse_k"] == min(4, c1 - c0)
        new = [t.replace("</w>", "") for t in p["mixed_tokens"]]
        src, don = CAPTIONS[labelled.ids[j.source]].split(), CAPTIONS[labelled.ids[d]].split()
        assert all(a in (b, c) for a, b, c in zip(new, src, don + [None] * len(src)))
        assert new[c1 - w0:] == src[c1 - w0:]  # past the donor's caption: untouched
        # the batched encoder call equals encoding this job's edited prompt alone
        ids = ctx.tokens[j.source].clone()
        ids[w0:w1] = torch.tensor(pipe.tokenizer.convert_tokens_to_ids(p["mixed_tokens"]))
        assert torch.allclose(embeds[j.index], sd_io.encode_ids(pipe.text_encoder, ids[None])[0], atol=1e-5)


#################################################################################
#                              filter and errors                                #
#################################################################################

def test_filter_keeps_confident_matches_and_records_rejections(tmp_path, model_dir, pipe, labelled, count_saves):
    cfg = make_cfg(tmp_path, model_dir, **{"generate.filter_threshold": 0.7})
    jobs = plan_jobs(labelled, ["coarse", "fine"], per_class=4)
    order = iter(jobs)  # one rank, so images arrive in plan order

    def fake_predictor(images):
        # right class for all; confident (0.9) on even variants, unsure (0.6) on odd ones
        probs = []
        for _ in images:
            j = next(order)
            conf = 0.9 if j.variant % 2 == 0 else 0.6
            p = np.full(2, 1 - conf, np.float32)
            p[j.label] = conf
            probs.append(p)
        return np.stack(probs)

    n_keep = sum(j.variant % 2 == 0 for j in jobs)
    s = run(cfg, labelled, pipe, predictor=fake_predictor)
    out = tmp_path / "out"
    meta, rej = read_jsonl(out / "metadata.jsonl"), read_jsonl(out / "rejected.jsonl")
    assert s["images"] == len(meta) == len(pngs(out)) == n_keep and s["rejected"] == len(rej) == len(jobs) - n_keep
    assert 0 < n_keep < len(jobs)
    assert all(r["filter_score"] >= 0.7 for r in meta) and all(r["filter_score"] < 0.7 for r in rej)
    count_saves.clear()
    assert run(cfg, labelled, pipe, predictor=fake_predictor)["made"] == 0 and not count_saves  # rejections are final


def test_user_errors(tmp_path, model_dir, pipe, labelled):
    run(make_cfg(tmp_path, model_dir), labelled, pipe)
    with pytest.raises(MVCError, match="other settings"):
        run(make_cfg(tmp_path, model_dir, **{"generate.guidance_scale": 5.0}), labelled, pipe)
    with pytest.raises(MVCError, match="no fine-tuned pipeline"):
        gen.generate_synthetic(make_cfg(tmp_path, tmp_path / "nowhere", out="o2"), labelled=labelled,
                               captions=CAPTIONS, progress=False)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("mine")
    with pytest.raises(MVCError, match="not made by this project"):
        run(make_cfg(tmp_path, model_dir, out="foreign"), labelled, pipe)
    with pytest.raises(MVCError, match="window"):
        run(make_cfg(tmp_path, model_dir, out="o3", **{"mixing.window": [3, 99]}), labelled, pipe)
    with pytest.raises(MVCError, match="token ids after editing embeddings"):
        run(make_cfg(tmp_path, model_dir, out="o4", **{"mixing.ops": ["fine+coarse"]}), labelled, pipe)


def test_cli_bad_value_is_one_line(capsys):
    import generate_mvc
    from mvc.core.utils import run_cli

    with pytest.raises(SystemExit) as e:
        run_cli(generate_mvc.cli, ["--generate.scheduler=heun"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "heun" in err and "\n" not in err


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MVC_TEST_DDP") != "1", reason="~50 s on 2 CPU cores: set MVC_TEST_DDP=1")
def test_torchrun_two_processes_match_one(tmp_path, model_dir, labelled):
    """A real 2-process run (torchrun, gloo on CPU) writes the same set as the in-process single run."""
    script = tmp_path / "run_gen.py"
    script.write_text(f"""
import numpy as np
from accelerate import Accelerator
import tests.generation.test_generate as t
from mvc.generation.generate import generate_synthetic
acc = Accelerator()
cfg = t.make_cfg(__import__('pathlib').Path({str(tmp_path)!r}), {str(model_dir)!r}, out='ddp')
generate_synthetic(cfg, labelled=t.make_labelled(), captions=t.CAPTIONS, rank=acc.process_index,
                   world=acc.num_processes, barrier=acc.wait_for_everyone, progress=False)
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    torchrun = Path(sys.executable).parent / "torchrun"
    res = subprocess.run([str(torchrun), "--nproc_per_node=2", "--master_port=29517", str(script)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    ds = make_labelled()
    gen.generate_synthetic(make_cfg(tmp_path, model_dir, out="one"), labelled=ds, captions=CAPTIONS, progress=False)
    a, b = tmp_path / "one", tmp_path / "ddp"
    assert pngs(a) == pngs(b) and len(read_jsonl(b / "metadata.jsonl")) == 8
    assert not list(b.glob("metadata.rank*"))
    for f in pngs(a):
        assert np.abs(pixels(a, f) - pixels(b, f)).max() <= 1


#################################################################################
#                                 speed levers                                  #
#################################################################################

def test_channels_last_and_a_batch_size_left_to_the_device_make_the_same_images(tmp_path, model_dir, pipe, labelled):
    """generate.channels_last (a speed lever) makes the images of the contiguous U-Net (float noise: <= 1 level);
    generate.batch_size=null is DEFAULT_BATCH off CUDA, and every run records its batch size and peak memory."""
    from mvc.core.perf import DEFAULT_BATCH, channels_last

    small = {"generate.per_class": 2}
    try:
        plain = run(make_cfg(tmp_path, model_dir, out="plain", **small), labelled, pipe)
        fast = run(make_cfg(tmp_path, model_dir, out="fast", **small, **{"generate.channels_last": True,
                                                                         "generate.batch_size": None}), labelled, pipe)
        assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    finally:
        channels_last(pipe.unet, False)
    assert (plain["batch_size"], fast["batch_size"]) == (4, DEFAULT_BATCH) and fast["peak_memory_gb"] is None
    assert read_jsonl(tmp_path / "fast_grids" / "runs.jsonl")[-1]["batch_size"] == DEFAULT_BATCH
    a, b = tmp_path / "plain", tmp_path / "fast"
    assert pngs(a) == pngs(b) and len(pngs(a)) == 4
    for f in pngs(a):
        assert np.abs(pixels(a, f) - pixels(b, f)).max() <= 1


def test_batch_from_memory_fills_a_share_of_the_free_memory_within_bounds():
    assert gen.batch_from_memory(per_image=100, free=1000) == 5  # half the free memory
    assert gen.batch_from_memory(per_image=1, free=10**12) == gen.AUTO_BATCH_MAX
    assert gen.batch_from_memory(per_image=10**12, free=10) == 1  # one image whatever is free
