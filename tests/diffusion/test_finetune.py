"""InstructPix2Pix fine-tuning: dropout masks, caches vs pipeline, training, resume, DDP, final folder.

Run as a script (`torchrun --nproc_per_node 2 tests/diffusion/test_finetune.py OUT`) it is the 2-process worker
of `test_torchrun_two_processes_equal_one`.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mvc.core.config import TinyBaseConfig, make_config
from mvc.core.utils import MVCError
from mvc.diffusion.finetune import (
    conditioning_dropout_masks,
    draw_step_noise,
    encode_latents_cache,
    encode_prompts_cache,
    gather_batch,
    ip2p_loss,
)
from tests.helpers import max_weight_diff, torchrun_two, unet_weights

ROOT = Path(__file__).resolve().parents[2]

CLASSES = ["shirt", "shoe", "bag", "coat"]
TINY = TinyBaseConfig(image_size=16, vae_channels=[8, 16], unet_channels=[16, 32], text_hidden=32,
                      text_layers=1, max_length=16)


#################################################################################
#                                   Fixtures                                    #
#################################################################################

class ToyDataset:
    """16 RGB images in 4 classes (class = brightness + a bar position), with the ImageDataset surface."""

    def __init__(self, n: int = 16, size: int = 16):
        from PIL import Image

        rng = np.random.default_rng(0)
        self.classes = list(CLASSES)
        self.targets = np.arange(n) % len(CLASSES)
        self.ids = [f"toy/{i:03d}" for i in range(n)]
        self.images = []
        for i, t in enumerate(self.targets):
            a = rng.integers(0, 40, (size, size, 3)).astype(np.uint8) + np.uint8(50 * t)
            a[:, 4 * t:4 * t + 3] = 250
            self.images.append(Image.fromarray(a))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return self.images[i], int(self.targets[i])

    def fingerprint(self) -> str:
        return "toy-" + ",".join(self.ids)


def toy_pairs():
    """Index pairs within each class (condition -> target)."""
    ds = ToyDataset()
    cond, tgt = [], []
    for c in range(len(CLASSES)):
        idx = np.flatnonzero(ds.targets == c)
        cond += list(idx)
        tgt += list(np.roll(idx, 1))
    return SimpleNamespace(cond=np.array(cond, np.int32), target=np.array(tgt, np.int32))


def toy_prompts(ds):
    """One prompt per image: caption + class prompt."""
    return [f"bright item, a photo of class type {ds.classes[t]}" for t in ds.targets]


def build_components():
    """Seeded random tiny InstructPix2Pix components (8-channel U-Net)."""
    from mvc.diffusion.tiny import build_tiny_components

    torch.manual_seed(0)
    return build_tiny_components(TINY, CLASSES, in_channels=8)


def toy_config(out_dir, extra: dict | None = None, **train):
    """A config for a few fast steps on the toy data (`extra`: overrides of other sections)."""
    over = {"run.output_dir": str(out_dir), "run.seed": 3, "train.resolution": 16, "train.batch_size": 8,
            "train.max_steps": 6, "train.lr": 1e-3, "train.lr_warmup_steps": 2, "train.log_every": 1,
            "train.validate_every": 1000, "train.checkpoint_every": 1000, "train.validation_steps": 2,
            "train.num_validation": 2, "train.drop_text_prob": 0.2, "train.drop_image_prob": 0.2,
            "train.drop_both_prob": 0.2}
    over.update({f"train.{k}": v for k, v in train.items()})
    return make_config(overrides={**over, **(extra or {})})


def run_finetune(out_dir, components, resume=None, extra: dict | None = None, **train):
    """finetune() on the toy data with a deep copy of `components`."""
    from mvc.diffusion.finetune_loop import finetune

    ds = ToyDataset()
    comps = copy.deepcopy(components)
    res = finetune(toy_config(out_dir, extra, **train), comps, ds, toy_pairs(), toy_prompts(ds), Path(out_dir) / "mvc",
                   resume=resume)
    return res, comps


@pytest.fixture(scope="module")
def components():
    return build_components()


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, components):
    """6 uninterrupted steps (the reference of the resume and DDP tests)."""
    out = tmp_path_factory.mktemp("straight")
    res, _ = run_finetune(out, components)
    return out, res


#################################################################################
#                              Conditioning dropout                             #
#################################################################################

def test_dropout_masks_rates_disjoint_and_deterministic():
    g = torch.Generator().manual_seed(0)
    kt, ki = conditioning_dropout_masks(200_000, 0.1, 0.2, 0.05, g)
    assert kt.dtype == torch.bool and kt.shape == (200_000,)
    text_only = (~kt & ki).float().mean().item()
    image_only = (kt & ~ki).float().mean().item()
    both = (~kt & ~ki).float().mean().item()
    assert abs(text_only - 0.1) < 0.005 and abs(image_only - 0.2) < 0.005 and abs(both - 0.05) < 0.005
    kt0, ki0 = conditioning_dropout_masks(10_000, 0.0, 0.0, 0.0, g)
    assert kt0.all() and ki0.all()
    a = conditioning_dropout_masks(64, 0.3, 0.3, 0.3, torch.Generator().manual_seed(5))
    b = conditioning_dropout_masks(64, 0.3, 0.3, 0.3, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(MVCError):
        conditioning_dropout_masks(4, 0.5, 0.4, 0.2)


def test_training_inputs_match_pipeline_sampling_batch(components):
    """Dropped text = the pipeline's empty-prompt embedding; dropped image = its zero image latent; kept
    image = the posterior mode the pipeline uses. Checked by recording the pipeline's U-Net call."""
    from mvc.diffusion.models import ip2p_pipeline

    comps = copy.deepcopy(components)
    ds = ToyDataset()
    prompts = toy_prompts(ds)
    lat = encode_latents_cache(comps["vae"], ds, 16, show_progress=False)
    txt = encode_prompts_cache(comps["tokenizer"], comps["text_encoder"], prompts, show_progress=False)
    # training side: row 0 keeps both, row 1 drops text only, row 2 drops both
    rnd = draw_step_noise(3, tuple(lat.mean.shape[2:]), 1000, False, 0, 0, 0, torch.Generator().manual_seed(0))
    rnd.keep_text = torch.tensor([True, False, False])
    rnd.keep_image = torch.tensor([True, True, False])
    i = torch.tensor([0, 0, 0])
    b = gather_batch(lat, txt, i, i, i, rnd)
    # sampling side: record what the pipeline feeds the U-Net (chunks: text+image, image only, none)
    seen = {}
    unet = comps["unet"]
    orig = unet.forward

    def record(x, t, encoder_hidden_states=None, **kw):
        seen.setdefault("x", x.clone())
        seen.setdefault("emb", encoder_hidden_states.clone())
        return orig(x, t, encoder_hidden_states=encoder_hidden_states, **kw)

    unet.forward = record
    pipe = ip2p_pipeline(comps, unet)
    pipe(prompt=prompts[0], image=ds[0][0], num_inference_steps=1, guidance_scale=3.0, image_guidance_scale=1.5,
         generator=torch.Generator().manual_seed(0))
    x, emb = seen["x"], seen["emb"]
    assert x.shape[0] == 3 and emb.shape[0] == 3
    assert torch.allclose(emb, b["text_embeds"], atol=1e-5)  # [prompt, "", ""] == [kept, dropped, dropped]
    assert torch.allclose(x[:, 4:], b["cond_latents"], atol=1e-4)  # [mode, mode, 0] == [kept, kept, dropped]
    assert torch.count_nonzero(b["cond_latents"][2]) == 0 and torch.count_nonzero(b["cond_latents"][0]) > 0


def test_text_cache_holds_each_distinct_prompt_once_on_the_cpu_and_its_size_is_reported(components, straight_run):
    from mvc.diffusion.sd_io import encode_prompts

    comps = copy.deepcopy(components)
    tok, te = comps["tokenizer"], comps["text_encoder"]
    prompts = ["a dark object, a photo of class type x", "a bright object, a photo of class type y"]
    prompts = [prompts[i] for i in (0, 1, 0, 0, 1)]
    txt = encode_prompts_cache(tok, te, prompts, show_progress=False, dtype=torch.float16)
    L, D = txt.empty.shape
    assert txt.table.shape == (2, L, D) and txt.table.dtype == torch.float16 and txt.table.device.type == "cpu"
    assert txt.nbytes == 2 * L * D * 2 + 5 * 8 + L * D * 2  # two rows, not five
    assert torch.allclose(txt.lookup(torch.arange(5)).float(), encode_prompts(tok, te, prompts), atol=2e-3)
    # fine-tuning reports the caches' sizes before its first step
    out, res = straight_run
    first = json.loads((out / "mvc" / "log.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and first["setup/text_cache_gb"] == pytest.approx(res["text_cache_bytes"] / 1e9)
    assert res["latent_cache_bytes"] > 0 and first["setup/grad_accum"] == 1


#################################################################################
#                                    Training                                   #
#################################################################################

def test_training_lowers_loss_on_a_fixed_batch(tmp_path, components):
    ds = ToyDataset()

    def fixed_loss(comps):
        lat = encode_latents_cache(comps["vae"], ds, 16, show_progress=False)
        txt = encode_prompts_cache(comps["tokenizer"], comps["text_encoder"], toy_prompts(ds), show_progress=False)
        rnd = draw_step_noise(16, tuple(lat.mean.shape[2:]), 1000, False, 0, 0, 0, torch.Generator().manual_seed(1))
        p = toy_pairs()
        i, j = torch.as_tensor(p.cond, dtype=torch.long), torch.as_tensor(p.target, dtype=torch.long)
        with torch.no_grad():
            comps["unet"].eval()
            return ip2p_loss(comps["unet"], comps["scheduler"], **gather_batch(lat, txt, i, j, j, rnd),
                             noise=rnd.noise, timesteps=rnd.timesteps).mean().item()

    before = fixed_loss(copy.deepcopy(components))
    res, trained = run_finetune(tmp_path, components, max_steps=12, lr=3e-3, lr_warmup_steps=0, batch_size=16)
    after = fixed_loss(trained)
    assert after < 0.8 * before, (before, after)
    frozen = [p.requires_grad for p in list(trained["vae"].parameters()) + list(trained["text_encoder"].parameters())]
    assert not any(frozen)
    log = [json.loads(x) for x in (tmp_path / "mvc" / "log.jsonl").read_text().splitlines()]
    assert {"train/loss", "train/lr", "train/grad_norm", "train/images_per_s"} <= set(log[-1])
    assert list((tmp_path / "mvc" / "validation").glob("step-*.png"))  # a grid at the last step


def test_resume_equals_uninterrupted(tmp_path, components, straight_run):
    _, ref = straight_run
    ref_dir = straight_run[0]
    first, _ = run_finetune(tmp_path, components, max_steps=3, checkpoint_every=3)
    second, _ = run_finetune(tmp_path, components, resume="latest", checkpoint_every=3)
    assert np.allclose(first["losses"] + second["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
    a, b = unet_weights(ref_dir / "mvc" / "final"), unet_weights(tmp_path / "mvc" / "final")
    assert max_weight_diff(a, b) < 1e-6


def test_checkpoints_hold_the_keys_earlier_versions_wrote(straight_run):
    """The engine writes what the fine-tuning loop before it wrote, so checkpoints of either version resume."""
    from mvc.core.checkpoint import list_checkpoints

    path = list_checkpoints(straight_run[0] / "mvc" / "checkpoints")[-1]
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {"format_version", "kind", "trained_on", "step", "config", "unet", "optimizer", "lr_scheduler",
                         "ema", "sampler", "rng", "world_size"}
    assert (ckpt["kind"], ckpt["step"], ckpt["world_size"], ckpt["ema"]) == ("finetune", 6, 1, None)
    assert {"gen", "order", "pos", "epoch"} == set(ckpt["sampler"])


def test_resume_with_ema_and_grad_accum(tmp_path, components):
    ref, _ = run_finetune(tmp_path / "a", components, max_steps=4, use_ema=True, ema_decay=0.9, grad_accum=2)
    run_finetune(tmp_path / "b", components, max_steps=2, use_ema=True, ema_decay=0.9, grad_accum=2)
    res, _ = run_finetune(tmp_path / "b", components, resume="latest", max_steps=4, use_ema=True, ema_decay=0.9,
                          grad_accum=2)
    assert np.allclose(res["losses"], ref["losses"][2:], rtol=1e-5, atol=1e-6)
    a, b = unet_weights(tmp_path / "a/mvc/final"), unet_weights(tmp_path / "b/mvc/final")
    assert max_weight_diff(a, b) < 1e-6


def test_grad_accum_left_unset_comes_from_accelerate_and_drives_steps_and_schedule(tmp_path, components, monkeypatch,
                                                                                    fresh_accelerate):
    """train.grad_accum=null takes accelerate's gradient_accumulation_steps (here its environment variable): the
    loop then runs that many micro-batches per optimizer step, exactly like an explicit train.grad_accum=2 (same
    losses, same weights, schedule stepped once per update); an explicit value wins over accelerate's."""
    ref, _ = run_finetune(tmp_path / "explicit", components, max_steps=3, grad_accum=2)
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")
    res, _ = run_finetune(tmp_path / "env", components, max_steps=3, grad_accum=None)
    assert res["grad_accum"] == 2 and res["step"] == 3
    assert np.allclose(res["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
    a, b = unet_weights(tmp_path / "explicit/mvc/final"), unet_weights(tmp_path / "env/mvc/final")
    assert max_weight_diff(a, b) < 1e-6
    one, _ = run_finetune(tmp_path / "one", components, max_steps=1, grad_accum=1)
    assert one["grad_accum"] == 1


def test_mixed_precision_left_unset_comes_from_accelerate_and_is_recorded(tmp_path, monkeypatch, fresh_accelerate):
    from mvc.core.config import load_yaml
    from mvc.core.stage import start_stage

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    cfg = toy_config(tmp_path)
    assert cfg.train.mixed_precision is None and cfg.train.grad_accum is None  # the defaults: accelerate decides
    stage = start_stage(cfg, "train_mvc", precision_from="train")
    assert stage.accelerator.mixed_precision == "bf16"
    recorded = load_yaml(tmp_path / "config-train_mvc.yaml")["train"]
    assert recorded["mixed_precision"] == "bf16" and recorded["grad_accum"] == 1


def test_sharded_backends_are_refused_in_one_line(monkeypatch, fresh_accelerate):
    import accelerate
    from accelerate.utils import DistributedType

    from mvc.core.distributed import make_accelerator

    class FSDPAccelerator(accelerate.Accelerator):  # what `accelerate config` with FSDP gives on a GPU machine
        distributed_type = DistributedType.FSDP

    monkeypatch.setattr(accelerate, "Accelerator", FSDPAccelerator)
    with pytest.raises(MVCError, match="data-parallel only") as e:
        make_accelerator()
    assert "FSDP" in str(e.value) and "\n" not in str(e.value)


def test_final_folder_loads_with_plain_diffusers_and_generates(straight_run, components):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    out, _ = straight_run
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(out / "mvc" / "final")
    assert pipe.unet.config.in_channels == 8
    before = components["unet"].state_dict()
    assert any(not torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())  # it was trained
    img = pipe(prompt="a photo of class type bag", image=ToyDataset()[2][0], num_inference_steps=2,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert img.shape == (1, 16, 16, 3) and np.isfinite(img).all()


def test_final_folder_records_its_resolution_and_generation_samples_at_it(tmp_path, components, caplog):
    """Fine-tuned at 8 px (not the U-Net's native 16): the folder says so, and generation uses it by default."""
    import logging

    from mvc.data import ArraySource, ImageDataset
    from mvc.diffusion.models import TRAINING_FILE, training_info
    from mvc.generation.generate import generate_synthetic

    run_finetune(tmp_path, components, max_steps=1, resolution=8)
    final = tmp_path / "mvc" / "final"
    info = training_info(final)
    assert info["resolution"] == 8 and info["steps"] == 1 and json.loads((final / TRAINING_FILE).read_text()) == info
    assert json.loads((final / "unet" / "config.json").read_text())["sample_size"] == 4  # 8 px / VAE factor 2
    toy = ToyDataset()
    arr = np.stack([np.asarray(im) for im in toy.images])
    labelled = ImageDataset("toy", "train", CLASSES, toy.targets, toy.ids, ArraySource(arr))
    captions = {i: "bright item" for i in toy.ids}
    over = {"generate.model_dir": str(final), "generate.per_class": 1, "generate.num_inference_steps": 1,
            "mixing.ops": ["none"]}
    cfg = make_config(overrides={"run.output_dir": str(tmp_path), **over})
    summary = generate_synthetic(cfg, labelled=labelled, captions=captions, progress=False)
    assert summary["resolution"] == 8
    first = next((tmp_path / "synthetic").rglob("*.png"))
    assert Image.open(first).size == (8, 8)
    # an explicit generate.resolution wins, with a warning naming the tuned one
    cfg = make_config(overrides={"run.output_dir": str(tmp_path), **over, "generate.out_dir": "at16",
                                 "generate.resolution": 16})
    with caplog.at_level(logging.WARNING):
        summary = generate_synthetic(cfg, labelled=labelled, captions=captions, progress=False)
    assert summary["resolution"] == 16 and "fine-tuned at 8 px" in caplog.text


def test_validation_grid_shows_the_ema_weights_and_restores_the_trained_ones(tmp_path, components):
    from mvc.diffusion.finetune_loop import validation_grid
    from mvc.diffusion.finetune_setup import build_ema, prepare_unet

    comps = copy.deepcopy(components)
    tc = toy_config(tmp_path).train
    params = prepare_unet(comps["unet"], tc)
    ema = build_ema(params, 0.9)
    with torch.no_grad():
        for p in params:
            p.add_(0.5 * torch.randn_like(p))  # the trained weights now differ from the EMA's
    before = [p.detach().clone() for p in params]
    ds, pairs = ToyDataset(), toy_pairs()
    grid = lambda e: np.asarray(validation_grid(comps, comps["unet"], ds, pairs, toy_prompts(ds), tc, 0, e))  # noqa: E731
    with_ema, raw = grid(ema), grid(None)
    assert all(torch.equal(a, b) for a, b in zip(before, params))  # restored after the EMA grid
    ema.copy_to(params)  # the grid of the EMA weights themselves
    assert np.array_equal(grid(None), with_ema) and not np.array_equal(with_ema, raw)


def test_lora_is_merged_into_the_saved_unet(tmp_path, components):
    from diffusers import UNet2DConditionModel

    from mvc.diffusion.finetune_setup import prepare_unet
    from mvc.diffusion.models import export_unet

    unet = copy.deepcopy(components["unet"])
    params = prepare_unet(unet, toy_config(tmp_path, lora_rank=4).train)
    names = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert any("lora" in n for n in names) and any(n.startswith("conv_in") for n in names)
    assert not any("lora" not in n and not n.startswith("conv_in") for n in names)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))  # stands in for training (LoRA B starts at zero)
    merged = export_unet(unet)
    merged.save_pretrained(tmp_path / "u", safe_serialization=True)
    plain = UNet2DConditionModel.from_pretrained(tmp_path / "u")
    x, t, e = torch.randn(2, 8, 8, 8), torch.tensor([10, 500]), torch.randn(2, 16, 32)
    with torch.no_grad():
        assert torch.allclose(plain(x, t, e).sample, unet(x, t, e).sample, atol=1e-4)


def test_non_finite_loss_stops_with_a_clear_error(tmp_path, components):
    bad = copy.deepcopy(components)
    with torch.no_grad():
        bad["unet"].conv_out.weight.fill_(float("nan"))
    with pytest.raises(MVCError, match="non-finite loss"):
        run_finetune(tmp_path, bad, max_steps=2)


def test_a_loss_gone_non_finite_between_sync_points_stops_before_any_weights_are_written(tmp_path, components):
    """Losses are read at the logging cadence and before a checkpoint, not every step: a run whose loss turns
    non-finite at step 3 stops at the next sync point (the checkpoint of step 4), naming step 3, and writes no
    checkpoint and no final folder from the weights it produced."""
    bad = copy.deepcopy(components)
    calls = []

    def poison(module, args, output):
        calls.append(1)
        return output * float("nan") if len(calls) >= 3 else output  # from the 3rd step's forward on

    bad["unet"].conv_out.register_forward_hook(poison)
    with pytest.raises(MVCError, match="non-finite loss .* at step 3;"):
        run_finetune(tmp_path, bad, max_steps=6, log_every=100, checkpoint_every=4)
    assert len(calls) == 4  # steps 3 and 4 ran before the sync point of step 4 read their losses
    assert not list((tmp_path / "mvc").glob("checkpoints/checkpoint-*")) and not (tmp_path / "mvc" / "final").exists()


def test_speed_levers_keep_the_loss_curve_and_the_weights(tmp_path, components):
    """The fast path (no gradient checkpointing: null decides so off CUDA; channels-last; the foreach EMA update;
    TF32, a no-op off CUDA) computes what the slow one does: the same loss curve over 20 steps and the same
    exported (EMA) weights, up to float summation order."""
    common = dict(max_steps=20, use_ema=True, ema_decay=0.9, log_every=7, batch_size=8)
    slow, _ = run_finetune(tmp_path / "slow", components, gradient_checkpointing=True, channels_last=False,
                           ema_foreach=False, tf32=False, **common)
    fast, _ = run_finetune(tmp_path / "fast", components, gradient_checkpointing=None, channels_last=True,
                           ema_foreach=True, tf32=True, **common)
    assert (slow["gradient_checkpointing"], fast["gradient_checkpointing"]) == (True, False)
    assert len(slow["losses"]) == len(fast["losses"]) == 20
    np.testing.assert_allclose(fast["losses"], slow["losses"], rtol=1e-3)
    a, b = unet_weights(tmp_path / "slow/mvc/final"), unet_weights(tmp_path / "fast/mvc/final")
    d = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    # Adam divides by sqrt(v): a gradient that is ~0 up to float summation order can flip its update sign (a
    # few lr-sized outliers); everything else agrees closely
    assert d.mean().item() < 1e-5 and (d > 1e-5).float().mean().item() < 0.03 and d.max().item() < 5e-3
    setup = json.loads((tmp_path / "fast" / "mvc" / "log.jsonl").read_text().splitlines()[0])
    assert setup["setup/gradient_checkpointing"] == 0.0  # what null decided, recorded
    logged = [json.loads(x)["step"] for x in (tmp_path / "fast/mvc/log.jsonl").read_text().splitlines()[1:]]
    assert logged == [1, 7, 14, 20]  # the logging cadence (and the last step)


def test_step_memory_need_grows_with_rows_and_counts_the_state_to_come():
    from mvc.core.config import FinetuneConfig
    from mvc.diffusion.finetune_setup import optimizer_state_bytes, step_memory_need

    # a probe step of 1 row peaked at 10 units, of 2 rows at 13: 3 per row more; 50 rows, 7 units of state
    assert step_memory_need(10, 13, 50, 7) == 10 + 3 * 49 + 7
    params = [torch.nn.Parameter(torch.zeros(10, 10))]
    assert optimizer_state_bytes(params, FinetuneConfig(use_ema=False), world=1) == 100 * 8  # Adam's two moments
    assert optimizer_state_bytes(params, FinetuneConfig(use_ema=True, ema_foreach=True), world=2) == 100 * (8 + 8 + 4)


def test_missing_optional_backends_are_clear_errors(components):
    from mvc.diffusion.finetune_setup import build_adam, set_attention

    if __import__("importlib").util.find_spec("xformers") is None:
        with pytest.raises(MVCError, match="xformers"):
            set_attention(copy.deepcopy(components["unet"]), "xformers")
    if __import__("importlib").util.find_spec("bitsandbytes") is None:
        cfg = toy_config("/tmp/unused", use_8bit_adam=True).train
        with pytest.raises(MVCError, match="bitsandbytes"):
            build_adam([torch.nn.Parameter(torch.zeros(2))], cfg)


def test_fused_adam_is_the_default_and_takes_the_same_steps_as_torchs_default_adam():
    from mvc.core.config import FinetuneConfig
    from mvc.diffusion.finetune_setup import build_adam

    torch.manual_seed(0)
    start = torch.randn(300, 7)
    runs = {}
    for fused in (True, False):
        w = torch.nn.Parameter(start.clone())
        opt = build_adam([w], FinetuneConfig(fused_adam=fused, lr=1e-2, weight_decay=0.01))
        assert bool(opt.param_groups[0]["fused"]) is fused
        for k in range(5):
            (w.sin() * (k + 1)).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        runs[fused] = w.detach()
    assert not torch.equal(runs[True], start)  # the weights moved
    torch.testing.assert_close(runs[True], runs[False], rtol=1e-5, atol=1e-6)


#################################################################################
#                          Distributed and command line                         #
#################################################################################

@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path, straight_run):
    ref_dir, ref = straight_run
    r = torchrun_two(Path(__file__).resolve(), str(tmp_path), timeout=180)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    got = json.loads((tmp_path / "losses.json").read_text())
    assert np.allclose(got, ref["losses"], rtol=1e-5, atol=1e-6), (got, ref["losses"])
    a, b = unet_weights(ref_dir / "mvc" / "final"), unet_weights(tmp_path / "mvc" / "final")
    d = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    # Adam divides by sqrt(v): a gradient that is ~0 up to float summation order can flip its update
    # sign (a few lr-sized outliers); everything else must agree closely.
    assert d.mean().item() < 1e-5 and (d > 1e-5).float().mean().item() < 0.03 and d.max().item() < 5e-3


def test_train_mvc_help_exits_zero():
    r = subprocess.run([sys.executable, str(ROOT / "train_mvc.py"), "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert r.returncode == 0 and "--resume" in r.stdout and "--train.batch_size" in r.stdout


def _worker(out_dir: str) -> None:
    """torchrun worker: the straight run's config and components (seeded; the tiny tokenizer is
    deterministic) in 2 processes; rank 0 writes the losses."""
    res, _ = run_finetune(out_dir, build_components())
    if int(os.environ.get("RANK", "0")) == 0:
        (Path(out_dir) / "losses.json").write_text(json.dumps(res["losses"]))


if __name__ == "__main__":
    _worker(sys.argv[1])
