"""The tiny base: tokenizer, a micro pretraining build that diffusers loads and samples from, its cache."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mvc.diffusion.tiny as tiny
from mvc.core.config import TinyBaseConfig, make_config
from mvc.core.utils import MVCError
from mvc.data import ArraySource, ImageDataset
from mvc.diffusion.inputs import load_base
from mvc.diffusion.tiny import get_tiny_base, tiny_base_key
from mvc.diffusion.tokenizer import BASE_WORDS, build_tiny_tokenizer, train_bpe

ROOT = Path(__file__).resolve().parents[2]


def shapes_pool(n=64, size=20, seed=0):
    """Gray rectangles and discs of random size / brightness on black: a label-free pretraining pool."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    arr = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        v = rng.integers(80, 255)
        if i % 2:
            h, w = rng.integers(4, size - 4, 2)
            arr[i, 2:2 + h, 3:3 + w] = v
        else:
            r = rng.integers(3, size // 2)
            arr[i][(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < r * r] = v
    return ImageDataset("shapes", "train", ["rect", "disc"], np.arange(n) % 2, [f"p/{i}" for i in range(n)],
                        ArraySource(arr))


def micro_cfg(tmp_path, **kw):
    base = dict(image_size=16, vae_channels=[8, 16], unet_channels=[16, 32], text_hidden=16, text_layers=1,
                max_length=16, pool_size=48, vae_steps=3, unet_steps=3, batch_size=8, num_samples=4, sample_steps=2,
                cache_dir=str(tmp_path / "cache"))
    return TinyBaseConfig(**{**base, **kw})


def test_tokenizer_knows_the_caption_words_and_any_class_name():
    tok = build_tiny_tokenizer(max_length=16)
    for w in ("dark", "textured", "asymmetric", "object"):
        assert len(tok(w, add_special_tokens=False).input_ids) == 1  # whole-word tokens
    ids = tok("a photo of class type ankle boot t-shirt/top", add_special_tokens=False).input_ids
    # CLIP's unk token is <|endoftext|>: no special token may appear inside plain text
    assert not set(ids) & set(tok.all_special_ids) and len(ids) > 5
    # CLIP decodes every </w> as a space, so compare without spaces
    assert tok.decode(ids).replace(" ", "") == "aphotoofclasstypeankleboott-shirt/top"
    assert tok.model_max_length == 16
    assert {"dark", "small", "smooth", "symmetric"} <= set(BASE_WORDS)


def test_tokenize_gives_repeated_texts_the_ids_of_a_one_by_one_call():
    from mvc.diffusion.sd_io import tokenize

    tok = build_tiny_tokenizer(max_length=16)
    texts = ["a dark small object", "a bright large object", "a dark small object", "", "a dark small object"]
    ids, mask = tokenize(tok, texts)
    assert ids.shape == mask.shape == (5, 16)
    for i, text in enumerate(texts):  # each row what the tokenizer makes of that text alone
        one = tok([text], padding="max_length", max_length=16, truncation=True, return_tensors="pt")
        assert torch.equal(ids[i], one.input_ids[0]) and torch.equal(mask[i], one.attention_mask[0])
    assert not torch.equal(ids[0], ids[1]) and not torch.equal(ids[0], ids[3])


def test_bpe_merges_the_most_frequent_pair_first_and_breaks_ties_by_text():
    tokens, merges = train_bpe(["ab", "ab", "cd", "ab", "cd", "xy"], vocab_size=10)
    # "ab" (3x) beats "cd" (2x) beats "xy" (1x); each word then is one token with the word-final mark
    assert merges == [("a", "b</w>"), ("c", "d</w>"), ("x", "y</w>")]
    assert tokens == ["ab</w>", "cd</w>", "xy</w>"]
    # a tie is broken by the pair's text, never by the order the words came in
    for words in (["zz", "mm", "aa"], ["aa", "mm", "zz"], ["mm", "zz", "aa"]):
        assert train_bpe(words, vocab_size=2)[1] == [("a", "a</w>"), ("m", "m</w>")]
    # the vocabulary budget caps the merges
    assert len(train_bpe(["abcdef"], vocab_size=3)[0]) == 3


@pytest.mark.slow
def test_tokenizer_ids_are_the_same_in_every_process():
    """The tiny base, and the synthetic data after it, depend on the ids: they must not vary per process."""
    code = ("import hashlib, json; from mvc.diffusion.tokenizer import build_tiny_tokenizer; "
            "t = build_tiny_tokenizer(['ankle boot', 't-shirt/top']); "
            "print(hashlib.sha256(json.dumps(sorted(t.get_vocab().items())).encode()).hexdigest())")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout.strip() for seed in (1, 2, 3)}
    assert len(outs) == 1 and len(outs.pop()) == 64


@pytest.mark.slow
def test_a_build_in_another_process_is_byte_identical(tmp_path):
    """The tiny base (tokenizer, VAE, U-Net, text encoder) is the same whichever process builds it.

    Same torch thread count on both sides: a CPU reduction split over another number of threads sums in
    another order, which is a different (equally valid) float result, not a reproducibility bug.
    """
    import torch

    here = get_tiny_base(micro_cfg(tmp_path / "a"), shapes_pool(), progress=False)
    code = ("import sys, torch; from pathlib import Path; torch.set_num_threads(int(sys.argv[2])); "
            "from tests.diffusion.test_tiny import micro_cfg, shapes_pool; from mvc.diffusion.tiny import get_tiny_base; "
            "print(get_tiny_base(micro_cfg(Path(sys.argv[1])), shapes_pool(), progress=False))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "b"), str(torch.get_num_threads())],
                         capture_output=True,
                         text=True, check=True, cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": "7"})
    there = Path(out.stdout.strip().splitlines()[-1])
    assert there != here and there.name == here.name
    files = sorted(p.relative_to(here) for p in here.rglob("*") if p.suffix in (".safetensors", ".json", ".txt")
                   and "logs" not in p.parts and p.name != "tiny_base.json")  # tiny_base.json records build times
    assert any(f.suffix == ".safetensors" for f in files) and any(f.name == "tokenizer.json" for f in files)
    for f in files:
        assert (here / f).read_bytes() == (there / f).read_bytes(), f


def test_micro_build_is_a_loadable_sampling_pipeline_and_is_cached(tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    cfg = micro_cfg(tmp_path)
    pool = shapes_pool()
    folder = get_tiny_base(cfg, pool, output_dir=tmp_path / "run", progress=False)
    assert folder.parent == tmp_path / "cache" and folder.name == tiny_base_key(cfg, pool, "attributes")
    assert not list(folder.parent.glob(".*tmp-*"))  # the temporary build folder was renamed away
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # and the partial build removed
    info = json.loads((folder / "tiny_base.json").read_text())
    assert info["pool_size"] == 48 and info["captioner"] == "attributes"
    assert (folder / "samples.png").is_file() and list((folder / "logs" / "tb").iterdir())
    # pool captions were cached per image, label-free
    caps = [json.loads(x)["caption"] for x in next((tmp_path / "run" / "captions").glob("attributes-*.jsonl")).open()]
    assert len(caps) == 48 and not any(w in c.split() for c in caps for w in ("rect", "disc"))

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert pipe.safety_checker is None and pipe.unet.config.in_channels == 4
    # the latent scaling factor was measured (1 / std of the pool latents), not SD's constant
    assert pipe.vae.config.scaling_factor == pytest.approx(info["scaling_factor"]) != pytest.approx(0.18215)
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a dark small square smooth symmetric object", num_inference_steps=2, height=16, width=16,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert img.shape == (1, 16, 16, 3) and np.isfinite(img).all()

    # second call: a cache hit, nothing is trained again
    def no_build(*a, **k):
        raise AssertionError("the tiny base was rebuilt")
    monkeypatch.setattr(tiny, "_build_tiny_base", no_build)
    mtime = (folder / "model_index.json").stat().st_mtime_ns
    (folder.parent / f"{folder.name}.partial" / "unet").mkdir(parents=True)  # a build killed after publishing left it
    assert get_tiny_base(cfg, pool, progress=False) == folder
    assert not (folder.parent / f"{folder.name}.partial").exists()
    assert (folder / "model_index.json").stat().st_mtime_ns == mtime
    # ... also through load_base (model.base=tiny), as train_mvc.py calls it
    full = dataclasses.replace(make_config(overrides={"model.base": "tiny"}), tiny=cfg)
    comps = load_base(full, pool, tmp_path / "run", progress=False)
    assert comps["vae"].config.scaling_factor == pytest.approx(info["scaling_factor"])
    # another tiny section or another pool is another base (and would be built)
    assert tiny_base_key(micro_cfg(tmp_path, unet_steps=4), pool, "attributes") != folder.name
    assert tiny_base_key(cfg, pool.subset(range(60)), "attributes") != folder.name
    # the cache folder location is not part of the key
    assert tiny_base_key(micro_cfg(tmp_path / "elsewhere"), pool, "attributes") == folder.name


def test_interrupted_build_publishes_nothing_and_keeps_only_its_partial_folder(tmp_path, monkeypatch):
    cfg = micro_cfg(tmp_path)
    pool = shapes_pool(16)

    def interrupted(cfg, pool, captioner, work, out, *a):
        (out / "model_index.json").write_text("{}")  # half a build
        raise KeyboardInterrupt
    monkeypatch.setattr(tiny, "_build_tiny_base", interrupted)
    with pytest.raises(KeyboardInterrupt):
        get_tiny_base(cfg, pool, progress=False)
    key = tiny_base_key(cfg, pool, "attributes")
    # neither a final nor a temporary folder is left: only the partial build, for the next call to continue
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"{key}.partial"]


#################################################################################
#                              Resumable build                                  #
#################################################################################

def resume_cfg(tmp_path, **kw):
    """A micro build whose U-Net state matters (EMA, min-SNR, a high LR) and saves every 2 of its 7 U-Net steps."""
    return micro_cfg(tmp_path, unet_steps=7, checkpoint_every=2, ema_decay=0.9, snr_gamma=5.0, lr=5e-3, **kw)


def base_tensors(folder: Path) -> dict:
    """Every tensor of a built base (VAE, U-Net, text encoder), by file and name."""
    from safetensors.torch import load_file

    return {f"{f.parent.name}/{k}": v for f in sorted(folder.rglob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The resume tests' base built without a stop: (folder, its tensors, its log records, its tiny_base.json)."""
    from mvc.core.utils import read_jsonl

    folder = get_tiny_base(resume_cfg(tmp_path_factory.mktemp("straight")), shapes_pool(), progress=False)
    info = json.loads((folder / "tiny_base.json").read_text())
    return folder, base_tensors(folder), read_jsonl(folder / "logs" / "log.jsonl"), info


class Killed(BaseException):
    """The simulated kill: like SIGKILL or a time limit, no `except Exception` stops it."""


def crash_at_unet_step(monkeypatch, k: int) -> None:
    """Make the build die when it reaches U-Net step `k` (0-based)."""
    real = tiny._unet_step

    def step(run, scheduler, z_all, ids, null_ids, snr_table, cfg, step, precision):
        if step == k:
            raise Killed
        real(run, scheduler, z_all, ids, null_ids, snr_table, cfg, step, precision)
    monkeypatch.setattr(tiny, "_unet_step", step)


def killed_build(tmp_path, monkeypatch, k: int) -> tuple:
    """A resume_cfg build killed at U-Net step `k`: (config, its partial folder)."""
    cfg = resume_cfg(tmp_path)
    with monkeypatch.context() as m:
        crash_at_unet_step(m, k)
        with pytest.raises(Killed):
            get_tiny_base(cfg, shapes_pool(), progress=False)
    key = tiny_base_key(cfg, shapes_pool(), "attributes")
    assert not (tmp_path / "cache" / key).exists()  # nothing was published
    return cfg, tmp_path / "cache" / f"{key}.partial"


def test_a_build_killed_in_the_unet_phase_resumes_to_the_uninterrupted_base(tmp_path, monkeypatch, straight):
    """Killed at U-Net step 5 (checkpoints after the VAE and at step 4): the next call reuses the partial build
    (SIGKILL leftovers cleaned), runs steps 4-6 only, and publishes the straight build's tensors bit for bit, its
    log records once each, the seconds of both attempts and one resume; no partial folder is left."""
    from mvc.core.checkpoint import list_checkpoints, load_checkpoint
    from mvc.core.utils import read_jsonl

    cfg, partial = killed_build(tmp_path, monkeypatch, 5)
    assert [p.name for p in list_checkpoints(partial / "vae")] == ["checkpoint-00000003.pt"]
    assert [p.name for p in list_checkpoints(partial / "unet")] == ["checkpoint-00000004.pt"]  # only the newest
    ckpt = load_checkpoint(partial / "unet" / "checkpoint-00000004.pt", kind="tiny_unet")  # weights_only
    assert ckpt["step"] == 4 and len(ckpt["history"]) == 4 and ckpt["resumes"] == 0
    assert set(ckpt["ema"]) >= {"shadow_params", "optimization_step"} and ckpt["optimizer"]["state"]
    # what a SIGKILL would also leave: the build's temp folder and a half-written checkpoint, of dead processes
    stale = [partial.parent / f".{partial.name.removesuffix('.partial')}.tmp-999999999",
             partial / "unet" / ".checkpoint-00000006.pt.tmp-999999999-ab12.pt"]
    stale[0].mkdir()
    stale[1].write_bytes(b"half")

    folder = get_tiny_base(cfg, shapes_pool(), progress=False)
    assert folder.name == straight[0].name and not partial.exists() and not any(p.exists() for p in stale)
    tensors = base_tensors(folder)
    assert tensors.keys() == straight[1].keys() and len(tensors) > 50
    assert all(torch.equal(tensors[k], straight[1][k]) for k in tensors)
    assert read_jsonl(folder / "logs" / "log.jsonl") == straight[2]  # the replayed step 4 logged once
    info = json.loads((folder / "tiny_base.json").read_text())
    assert info["resumes"] == 1 and straight[3]["resumes"] == 0
    for k in ("vae_mse", "unet_loss", "scaling_factor"):  # the U-Net's loss over its restored history too
        assert info[k] == straight[3][k], k
    secs, before = info["seconds"], ckpt["seconds"]
    assert secs["vae"] >= before["vae"] > 0 and secs["unet"] > before["unet"] > 0
    assert secs["data"] > before["data"] and secs["total"] > before["total"] >= sum(before[k] for k in
                                                                                   ("data", "vae", "unet"))


def test_a_build_killed_after_the_vae_skips_it_on_resume(tmp_path, monkeypatch, straight):
    """Killed at U-Net step 1, before its first checkpoint: the resume loads the VAE, trains the U-Net from step 0,
    and ends with the straight build's tensors; a second kill and resume counts two resumes."""
    from mvc.core.utils import read_jsonl

    cfg, partial = killed_build(tmp_path, monkeypatch, 1)
    assert (partial / "vae").is_dir() and not (partial / "unet").exists()
    monkeypatch.setattr(tiny, "pretrain_vae", lambda *a, **k: pytest.fail("the VAE was trained again"))
    with monkeypatch.context() as m:
        crash_at_unet_step(m, 3)  # this time after the U-Net's checkpoint at step 2
        with pytest.raises(Killed):
            get_tiny_base(cfg, shapes_pool(), progress=False)
    folder = get_tiny_base(cfg, shapes_pool(), progress=False)
    tensors = base_tensors(folder)
    assert all(torch.equal(tensors[k], straight[1][k]) for k in straight[1])
    assert read_jsonl(folder / "logs" / "log.jsonl") == straight[2]  # U-Net step 0, logged by the first kill, once
    assert json.loads((folder / "tiny_base.json").read_text())["resumes"] == 2 and not partial.exists()


def test_an_odd_partial_build_is_refused_in_one_line_and_kept(tmp_path, monkeypatch):
    """A checkpoint of another device type, one beyond the U-Net's steps, and a truncated one are each refused in
    one line that names the folder to delete; nothing is trained or removed."""
    cfg, partial = killed_build(tmp_path, monkeypatch, 5)
    path = partial / "unet" / "checkpoint-00000004.pt"
    good = path.read_bytes()

    def refused(edit, match: str) -> None:
        ckpt = torch.load(path, weights_only=True)
        edit(ckpt)
        torch.save(ckpt, path)
        with pytest.raises(MVCError, match=match) as e:
            get_tiny_base(cfg, shapes_pool(), progress=False)
        assert "\n" not in str(e.value) and f"delete {partial} to build the tiny base from scratch" in str(e.value)
        assert path.is_file() and (partial / "vae").is_dir()
        path.write_bytes(good)

    refused(lambda c: c["trained_on"].update(device="cuda"),
            r"trained on other device \(device: 'cuda' -> 'cpu'\); build on the device type that started it \(cuda\)")
    refused(lambda c: c.update(step=9, history=torch.zeros(9, 2)), r"unet checkpoint .* is at step 9 of 7")
    refused(lambda c: c.pop("generator"), r"unet checkpoint .* lacks generator")
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(MVCError, match=r"cannot read checkpoint .*; it is truncated or not a checkpoint; delete"):
        get_tiny_base(cfg, shapes_pool(), progress=False)


def test_a_second_builder_waits_for_the_first_and_finds_the_base(tmp_path, monkeypatch, straight):
    """While one process holds a key's build lock, another call waits; once the base is published it returns it
    without building."""
    import shutil
    import threading

    cfg = resume_cfg(tmp_path)
    folder = tmp_path / "cache" / straight[0].name
    monkeypatch.setattr(tiny, "_build_tiny_base", lambda *a: pytest.fail("built although another process had"))
    got = []
    with tiny._locked(tmp_path / "cache" / f"{folder.name}.partial"):
        waiter = threading.Thread(target=lambda: got.append(get_tiny_base(cfg, shapes_pool(), progress=False)))
        waiter.start()
        waiter.join(1.0)
        assert waiter.is_alive() and not got  # it waits on the lock
        shutil.copytree(straight[0], folder)  # the first builder publishes
    waiter.join(30)
    assert got == [folder] and not (tmp_path / "cache" / f"{folder.name}.partial").exists()


def test_the_checkpoint_cadence_is_not_part_of_the_key_nor_of_a_finetuning_record():
    """Bases cached before tiny.checkpoint_every existed keep their key (it was 8453655b089b089e for micro_cfg with
    recipe 4: change it with RECIPE_VERSION only)."""
    pool = shapes_pool()
    keys = {tiny_base_key(micro_cfg(Path(d), checkpoint_every=n), pool, "attributes") for d in ("a", "b")
            for n in (1, 500)}
    assert keys == {"8453655b089b089e"} and tiny.RECIPE_VERSION == 4
    # nor of what a fine-tuning checkpoint on the tiny base was trained on: changing it blocks no resume
    from mvc.diffusion.finetune_loop import finetune_trained_on

    rec = finetune_trained_on(make_config(overrides={"model.base": "tiny", "tiny.checkpoint_every": 7}), pool,
                              torch.zeros(2, 3), torch.ones(2, 3), ["a"], 0)
    assert "tiny.unet_steps" in rec and not {"tiny.checkpoint_every", "tiny.cache_dir"} & set(rec)


def test_empty_pool_is_a_user_error(tmp_path):
    from mvc.core.utils import MVCError

    with pytest.raises(MVCError, match="remainder pool"):
        get_tiny_base(micro_cfg(tmp_path), shapes_pool(4).subset([]), progress=False)


def test_min_snr_weights_cap_the_low_noise_steps_only():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.arange(0, 1000, 37)
    assert torch.equal(tiny.snr_weights(sched, t, None), torch.ones(len(t)))
    w = tiny.snr_weights(sched, t, 5.0)
    snr = sched.alphas_cumprod[t] / (1 - sched.alphas_cumprod[t])
    assert torch.allclose(w[snr <= 5], torch.ones(int((snr <= 5).sum())))  # noisy steps keep weight 1
    assert (w[snr > 5] < 1).all() and torch.all(w[:-1] <= w[1:] + 1e-6)  # less noise, smaller weight


def test_pretraining_with_ema_saves_the_average_not_the_last_weights(tmp_path):
    """Same draws with and without EMA: the EMA run ends at different weights, between the start and the end."""
    cfg = micro_cfg(tmp_path, unet_steps=6, lr=1e-2)
    comps = tiny.build_tiny_components(cfg)
    start = {k: v.clone() for k, v in comps["unet"].state_dict().items()}
    lat = torch.randn(16, cfg.latent_channels, 8, 8)
    ids = tiny.tokenize(comps["tokenizer"], ["a dark object"] * 16)[0]
    null = tiny.tokenize(comps["tokenizer"], [""])[0][0]
    finals = {}
    for decay in (None, 0.5):
        unet = tiny.build_tiny_components(cfg)["unet"]
        unet.load_state_dict(start)
        te = tiny.build_tiny_components(cfg)["text_encoder"]
        te.load_state_dict(comps["text_encoder"].state_dict())
        c = dataclasses.replace(cfg, ema_decay=decay, snr_gamma=5.0)
        loss = tiny.pretrain_unet(unet, te, comps["scheduler"], lat, ids, null, c, progress=False)
        assert np.isfinite(loss)
        finals[decay] = unet.state_dict()
    k = "conv_in.weight"
    last, avg = finals[None][k], finals[0.5][k]
    assert not torch.allclose(last, avg)
    assert (avg - start[k]).norm() < (last - start[k]).norm()  # the average lags behind the last weights


#################################################################################
#                        Devices and mixed precision                            #
#################################################################################

def _unet_run(cfg, precision: str, latents=None):
    """Pretrain a fresh micro U-Net (same start, same draws) under `precision`: (loss, U-Net state dict)."""
    torch.manual_seed(0)
    comps = tiny.build_tiny_components(cfg)
    lat = torch.randn(16, cfg.latent_channels, 8, 8) if latents is None else latents
    ids = tiny.tokenize(comps["tokenizer"], ["a dark object"] * 16)[0]
    null = tiny.tokenize(comps["tokenizer"], [""])[0][0]
    loss = tiny.pretrain_unet(comps["unet"], comps["text_encoder"], comps["scheduler"], lat, ids, null, cfg,
                              progress=False, precision=precision)
    return loss, comps["unet"].state_dict()


def test_mixed_precision_pretraining_computes_in_its_dtype_and_keys_its_base_apart(tmp_path):
    """bf16 autocast and fp16 with its loss scaler train (finite, other weights than fp32's); the precision joins
    the cache key only when it is not 'no', so fp32 bases keep their keys; an unknown one is one line."""
    cfg = micro_cfg(tmp_path, unet_steps=4, ema_decay=0.9)
    fp32 = _unet_run(cfg, "no")
    for precision in ("bf16", "fp16"):
        loss, state = _unet_run(cfg, precision)
        assert np.isfinite(loss) and not torch.equal(state["conv_in.weight"], fp32[1]["conv_in.weight"])
    assert _unet_run(cfg, "no")[1]["conv_in.weight"].equal(fp32[1]["conv_in.weight"])  # fp32 replays exactly
    pool = shapes_pool()
    keys = {p: tiny_base_key(cfg, pool, "attributes", p) for p in ("no", "bf16", "fp16")}
    assert keys["no"] == tiny_base_key(cfg, pool, "attributes") and len(set(keys.values())) == 3
    with pytest.raises(MVCError, match="unknown mixed precision 'fp8'"):
        tiny_base_key(cfg, pool, "attributes", "fp8")
    folder = get_tiny_base(micro_cfg(tmp_path), pool, progress=False, precision="bf16")
    info = json.loads((folder / "tiny_base.json").read_text())
    assert folder.name == tiny_base_key(micro_cfg(tmp_path), pool, "attributes", "bf16")
    assert info["mixed_precision"] == "bf16" and info["device"] == "cpu"


def test_a_non_finite_loss_stops_pretraining_in_one_line(tmp_path):
    """The losses are checked at the logging cadence (not every step) and before anything is kept: a NaN latent
    stops the U-Net's pretraining, naming the step."""
    cfg = micro_cfg(tmp_path, unet_steps=3)
    lat = torch.full((16, cfg.latent_channels, 8, 8), float("nan"))
    with pytest.raises(MVCError, match=r"^tiny U-Net pretraining diverged at step 0 \(loss nan\); lower tiny.lr$"):
        _unet_run(cfg, "no", lat)


def test_the_stage_precision_is_read_without_building_an_accelerator():
    """base_source's default precision is the running stage's; reading it builds no second accelerator (which
    would reset the first one's gradient accumulation)."""
    from accelerate.state import AcceleratorState, GradientState, is_initialized

    from mvc.core.distributed import make_accelerator, stage_precision

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        assert stage_precision() == "no" and not is_initialized()
        acc = make_accelerator("bf16", grad_accum=2)
        assert stage_precision() == "bf16" and acc.gradient_accumulation_steps == 2
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
