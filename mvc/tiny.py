"""The tiny profile's base model: a small Stable-Diffusion-like pipeline built from configs.

It is made of the same classes as SD-1.5 (AutoencoderKL, UNet2DConditionModel, CLIPTextModel,
CLIPTokenizer, DDPMScheduler), only smaller, so every script runs the same code path on it. It is built by one
process (the main one; the others wait and read the cache) on the stage accelerator's device and with its mixed
precision (`mvc.finetune_loop.base_source`); every draw comes from CPU generators, so the device changes no
draw, and on a GPU the loop avoids host syncs (losses are read every 25 steps, on a device buffer).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from mvc import seeds
from mvc.schedules import lr_multiplier
from mvc.sd_io import images_to_uint8, tokenize, uint8_to_model
from mvc.tokenizer import build_tiny_tokenizer
from mvc.utils import MVCError, RunLogger, atomic_dir, atomic_write_json, clean_stale_temps, fingerprint, image_grid

log = logging.getLogger(__name__)

# Bump when the pretraining recipe changes, so cached bases built by an older recipe are not reused.
RECIPE_VERSION = 4  # 2: deterministic tokenizer (train_bpe); 3: one resize filter (sd_io), named seeds; 4: min-SNR, EMA

#################################################################################
#                                 Components                                    #
#################################################################################

def vae_scale_factor(cfg: Any) -> int:
    """Pixel size / latent size of the tiny VAE."""
    return 2 ** (len(cfg.vae_channels) - 1)


def build_tiny_components(cfg: Any, extra_words: Iterable[str] = (), in_channels: int = 4) -> dict:
    """Randomly initialised tiny SD components: unet, vae, text_encoder, tokenizer, scheduler.

    `in_channels=4` is the text-to-image base; 8 gives an InstructPix2Pix U-Net directly.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_tokenizer(extra_words, max_length=cfg.max_length)
    n = len(cfg.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.vae_channels), layers_per_block=1,
        norm_num_groups=min(32, min(cfg.vae_channels)), sample_size=cfg.image_size,
    )
    m = len(cfg.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=cfg.image_size // vae_scale_factor(cfg), in_channels=in_channels, out_channels=cfg.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (m - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (m - 1),
        block_out_channels=tuple(cfg.unet_channels), layers_per_block=1,
        cross_attention_dim=cfg.text_hidden, attention_head_dim=8,
        norm_num_groups=min(32, min(cfg.unet_channels)),
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_hidden, intermediate_size=cfg.text_hidden * 4,
        num_hidden_layers=cfg.text_layers, num_attention_heads=max(1, cfg.text_hidden // 32),
        max_position_embeddings=cfg.max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                              beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


#################################################################################
#                              Pretraining data                                 #
#################################################################################

def pool_images(dataset: Any, size: int, progress: bool = True, chunk: int = 1024) -> torch.Tensor:
    """Every image of `dataset` at size x size (the SD input resize of `mvc.sd_io`): (N, 3, size, size) uint8."""
    from tqdm.auto import tqdm

    out = torch.empty(len(dataset), 3, size, size, dtype=torch.uint8)
    for i in tqdm(range(0, len(dataset), chunk), desc="tiny base: images", unit="chunk", disable=not progress):
        idx = range(i, min(i + chunk, len(dataset)))
        out[i:i + len(idx)] = images_to_uint8([dataset.load_image(j) for j in idx], size)
    return out


def pretrain_lr(cfg: Any, step: int, total: int, warmup: int) -> float:
    """The pretraining LR: linear warm-up, then cosine decay to 10% of `cfg.lr`."""
    return cfg.lr * lr_multiplier("cosine", step, total, warmup, floor=0.1)


#################################################################################
#                                Pretraining                                    #
#################################################################################

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}  # accelerate's mixed-precision modes -> autocast dtype


def _amp(device: torch.device, precision: str):
    """Autocast to the compute dtype of `precision` ('no', 'fp16', 'bf16') on `device`; off for 'no'."""
    if precision not in ("no", *AMP_DTYPES):
        raise MVCError(f"unknown mixed precision {precision!r}; use no, fp16 or bf16")
    return torch.autocast(device.type, dtype=AMP_DTYPES.get(precision, torch.float32), enabled=precision != "no")


def _update(opt: torch.optim.Optimizer, scaler: Any, loss: torch.Tensor, params: list, lr: float) -> None:
    """One AdamW update at learning rate `lr`, gradients clipped to norm 1 (through fp16's loss scaler, which skips
    a step whose gradients overflow; a no-op wrapper otherwise)."""
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    scaler.step(opt)
    scaler.update()


def _check_finite(losses: torch.Tensor, what: str) -> None:
    """Stop the build at the first non-finite loss of `losses` (steps 0.., on the device): one host sync, at the
    logging cadence and before anything is saved, instead of one per step."""
    bad = ~torch.isfinite(losses)
    if bool(bad.any()):
        step = int(bad.nonzero()[0, 0])
        raise MVCError(f"tiny {what} pretraining diverged at step {step} (loss {losses[step].item()}); lower tiny.lr")


def _log_point(step: int, total: int) -> bool:
    """Whether `step` (0-based) shows progress, logs and checks the losses: every 25 steps and the last."""
    return step % 25 == 0 or step == total - 1


def pretrain_vae(vae: Any, images: torch.Tensor, cfg: Any, device: Any = None,
                 logger: RunLogger | None = None, progress: bool = True, precision: str = "no") -> float:
    """Train the VAE to reconstruct `images` (MSE + a small KL) on `device` with mixed `precision` ('no', 'fp16',
    'bf16'); returns the last-100-step mean MSE."""
    from tqdm.auto import tqdm

    device = torch.device(device) if device is not None else torch.device("cpu")
    vae.to(device).train()
    params = list(vae.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    gen = seeds.generator(cfg.seed, "tiny.vae")
    pool = images.to(device)  # (N, 3, S, S) uint8, on the device once
    hist = torch.zeros(cfg.vae_steps, 2, device=device)  # (steps, [loss, mse]), read at the logging cadence only
    bar = tqdm(range(cfg.vae_steps), desc="tiny base: VAE", disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=gen)
        x = uint8_to_model(pool[idx.to(device, non_blocking=True)])  # (B, 3, S, S)
        with _amp(device, precision):
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample(generator=None)).sample
            mse = F.mse_loss(rec.float(), x)
            kl = post.kl().float().mean() / post.mean[0].numel()  # per latent element, so the weight is size-free
            loss = mse + cfg.vae_kl_weight * kl
        _update(opt, scaler, loss, params, pretrain_lr(cfg, step, cfg.vae_steps, warmup=min(50, cfg.vae_steps)))
        hist[step, 0], hist[step, 1] = loss.detach(), mse.detach()
        if _log_point(step, cfg.vae_steps):
            _check_finite(hist[:step + 1, 0], "VAE")
            bar.set_postfix(mse=f"{np.mean(hist[max(0, step - 99):step + 1, 1].tolist()):.4f}")
            if logger is not None:
                logger.scalars(step, {"mse": mse.item(), "kl": kl.item()}, prefix="vae/")
    vae.eval().requires_grad_(False)
    _check_weights(params, "VAE")
    recent = hist[-100:, 1].tolist()
    return float(np.mean(recent)) if recent else float("nan")


def _check_weights(params: list, what: str) -> None:
    """Refuse to keep weights that are not finite (a last update from an overflowing gradient), one host sync."""
    if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        raise MVCError(f"tiny {what} pretraining ended with non-finite weights; lower tiny.lr")


@torch.no_grad()
def encode_latents(vae: Any, images: torch.Tensor, batch_size: int = 256, device: Any = None) -> torch.Tensor:
    """Posterior means of `images` (N, 3, S, S uint8), in fp32 on `device`: (N, C, S/f, S/f) float32 on the CPU,
    unscaled (the U-Net's pretraining moves them back to its device once)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    out = [vae.encode(uint8_to_model(images[i:i + batch_size].to(device))).latent_dist.mean
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).cpu()


def snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float | None) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al., 2023) of epsilon-prediction, min(SNR, gamma) / SNR, (B,);
    ones when `gamma` is None. The low-noise steps, easy and many, stop dominating the gradient."""
    if gamma is None:
        return torch.ones(len(timesteps))
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps.cpu())
    return torch.clamp(snr, max=gamma) / snr


def pretrain_unet(unet: Any, text_encoder: Any, scheduler: Any, latents: torch.Tensor, ids: torch.Tensor,
                  null_ids: torch.Tensor, cfg: Any, device: Any = None,
                  logger: RunLogger | None = None, progress: bool = True, precision: str = "no") -> float:
    """Text-to-image noise-prediction training on scaled latents (N, C, h, w) and token ids (N, L), on `device`
    with mixed `precision` ('no', 'fp16', 'bf16').

    Captions are replaced by the empty prompt with probability `cfg.caption_dropout`, so that
    classifier-free guidance works; the text encoder is trained jointly when `cfg.train_text_encoder`.
    The loss is weighted by `snr_weights` (`cfg.snr_gamma`); with `cfg.ema_decay` the U-Net ends with
    the exponential moving average of its weights (and the text encoder with its own). Returns the
    last-100-step mean loss. Every draw comes from a CPU generator, so a device changes no draw.
    """
    from tqdm.auto import tqdm

    device = torch.device(device) if device is not None else torch.device("cpu")
    unet.to(device).train()
    text_encoder.to(device).train(cfg.train_text_encoder).requires_grad_(cfg.train_text_encoder)
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if cfg.train_text_encoder else [])
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    gen = seeds.generator(cfg.seed, "tiny.unet")
    T = scheduler.config.num_train_timesteps
    ema = None
    if cfg.ema_decay is not None:
        from diffusers.training_utils import EMAModel

        # foreach: one fused update for all tensors; its rounding differs in the last bit from the per-tensor loop,
        # so the CPU keeps the loop (and the cached CPU bases their bits)
        ema = EMAModel(params, decay=cfg.ema_decay, foreach=device.type != "cpu")
    z_all = latents.to(device)  # (N, C, h, w), on the device once
    snr_table = snr_weights(scheduler, torch.arange(T), cfg.snr_gamma)  # (T,) on the CPU, elementwise: once
    hist = torch.zeros(cfg.unet_steps, 2, device=device)  # (steps, [loss, mean per-sample loss])
    bar = tqdm(range(cfg.unet_steps), desc="tiny base: U-Net", disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(latents), (cfg.batch_size,), generator=gen)
        z0 = z_all[idx.to(device, non_blocking=True)]  # (B, C, h, w)
        tok = ids[idx].clone()  # (B, L)
        drop = torch.rand(len(idx), generator=gen) < cfg.caption_dropout
        tok[drop] = null_ids
        noise = torch.randn(z0.shape, generator=gen).to(device, non_blocking=True)
        t_cpu = torch.randint(0, T, (len(idx),), generator=gen)
        w = snr_table[t_cpu]  # (B,), no device round trip
        t = t_cpu.to(device, non_blocking=True)
        zt = scheduler.add_noise(z0, noise, t)
        with _amp(device, precision):
            with torch.set_grad_enabled(cfg.train_text_encoder):
                ehs = text_encoder(tok.to(device, non_blocking=True))[0]  # (B, L, D)
            pred = unet(zt, t, encoder_hidden_states=ehs).sample
            per_sample = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))  # (B,)
            loss = (per_sample * w.to(per_sample.device, non_blocking=True).to(per_sample)).mean()
        _update(opt, scaler, loss, params, pretrain_lr(cfg, step, cfg.unet_steps, warmup=min(100, cfg.unet_steps)))
        if ema is not None:
            ema.step(params)
        hist[step, 0], hist[step, 1] = loss.detach(), per_sample.detach().mean()
        if _log_point(step, cfg.unet_steps):
            _check_finite(hist[:step + 1, 0], "U-Net")
            bar.set_postfix(loss=f"{np.mean(hist[max(0, step - 99):step + 1, 1].tolist()):.4f}")
            if logger is not None:
                logger.scalars(step, {"loss": loss.item()}, prefix="unet/")
    if ema is not None:
        ema.copy_to(params)
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    _check_weights(params, "U-Net")
    recent = hist[-100:, 1].tolist()
    return float(np.mean(recent)) if recent else float("nan")


def sample_grid(pipe: Any, captions: list[str], real: torch.Tensor, seed: int, steps: int = 25,
                guidance_scale: float = 3.0, per_row: int = 8):
    """Pairs of rows: real pool images, then text-to-image samples from their captions (a PIL grid)."""
    from diffusers import DDIMScheduler
    from PIL import Image

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    gens = [seeds.generator(seed, "tiny.samples", i) for i in range(len(captions))]
    with torch.no_grad():
        fake = pipe(captions, num_inference_steps=steps, guidance_scale=guidance_scale, generator=gens,
                    height=real.shape[-2], width=real.shape[-1], output_type="pil").images
    reals = [Image.fromarray(r.permute(1, 2, 0).numpy()) for r in real]
    rows = []
    for i in range(0, len(captions), per_row):
        rows += [reals[i:i + per_row], fake[i:i + per_row]]
    return image_grid(rows)


#################################################################################
#                                 Cache                                         #
#################################################################################

def tiny_base_key(cfg: Any, pool: Any, captioner_key: str, precision: str = "no") -> str:
    """Hash of the tiny section (minus cache_dir), the pool's fingerprint, the captioner, the recipe and the mixed
    precision of the build (only when not 'no', so fp32 bases keep their keys, whichever device built them)."""
    if precision not in ("no", *AMP_DTYPES):
        raise MVCError(f"unknown mixed precision {precision!r} for the tiny base; use no, fp16 or bf16")
    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "cache_dir"}
    extra = () if precision == "no" else (precision,)
    return fingerprint(RECIPE_VERSION, d, pool.fingerprint(), captioner_key, *extra)


def get_tiny_base(cfg: Any, pool: Any, captioner: Any = None, output_dir: str | os.PathLike | None = None,
                  device: Any = None, progress: bool = True, precision: str = "no") -> Path:
    """The folder of the tiny base pretrained on `pool` (a StableDiffusionPipeline), built once and cached.

    The base learns from the remainder pool (disjoint from the labelled subset) with label-free
    `attributes` captions, under `cfg.cache_dir/<key>/`; later calls with the same tiny section
    and pool return the cached folder. It trains on `device` (default: the CPU) with mixed `precision` ('no',
    'fp16', 'bf16': part of the key). The build is not resumable (a few minutes on 2 CPU cores):
    an interrupted build leaves only a temporary folder, removed by the next build.
    Pool captions are cached under `<output_dir>/captions/` when `output_dir` is given.
    """
    from mvc.captions import AttributeCaptioner

    captioner = captioner if captioner is not None else AttributeCaptioner()
    if len(pool) == 0:
        raise MVCError("the tiny base needs a non-empty remainder pool: lower data.k_per_class "
                       "or use model.base=<a pretrained diffusers folder>")
    key = tiny_base_key(cfg, pool, captioner.cache_key, precision)
    root = Path(cfg.cache_dir).expanduser()
    folder = root / key
    if (folder / "model_index.json").is_file():
        log.info("tiny base: cache hit %s", folder)
        return folder
    clean_stale_temps(root, key)  # temp folders of killed builds
    with atomic_dir(folder) as tmp:
        device = torch.device(device) if device is not None else torch.device("cpu")
        # seeding the build must not touch the caller's RNGs: the CPU's, and the device's (the VAE's posterior draws)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            _build_tiny_base(cfg, pool, captioner, tmp, output_dir, device, progress, precision)
    log.info("tiny base: built %s", folder)
    return folder


def _build_tiny_base(cfg: Any, pool: Any, captioner: Any, out: Path, output_dir: str | os.PathLike | None,
                     device: torch.device, progress: bool, precision: str) -> None:
    """Pretrain the tiny base on `pool` and save it (pipeline, samples.png, tiny_base.json, logs/) in `out`."""
    from diffusers import StableDiffusionPipeline

    from mvc.captions import caption_cache_path, caption_dataset

    t0 = time.time()
    if cfg.pool_size is not None and cfg.pool_size < len(pool):
        rng = seeds.numpy_rng(cfg.seed, "tiny.pool")
        pool = pool.subset(np.sort(rng.choice(len(pool), cfg.pool_size, replace=False)))
    cap_path = (caption_cache_path(output_dir, captioner, pool) if output_dir is not None
                else out / "pool_captions.jsonl")
    caps = caption_dataset(pool, captioner, cap_path, batch_size=256, progress=progress)
    captions = [caps[i] for i in pool.ids]
    images = pool_images(pool, cfg.image_size, progress=progress)  # (N, 3, S, S) uint8

    torch.manual_seed(seeds.derive_seed(cfg.seed, "tiny.init"))  # the random initialisation of every component
    comps = build_tiny_components(cfg)
    vae, unet, text_encoder, tokenizer, scheduler = (comps[k] for k in
                                                      ("vae", "unet", "text_encoder", "tokenizer", "scheduler"))
    logger = RunLogger(out / "logs")
    try:
        t1 = time.time()
        vae_mse = pretrain_vae(vae, images, cfg, device, logger, progress, precision)
        t2 = time.time()
        # SD scales latents to unit variance before diffusion; its factor (0.18215) was measured the same way
        latents = encode_latents(vae, images, device=device)  # (N, C, h, w)
        scaling = float(1.0 / latents.std())
        vae.register_to_config(scaling_factor=scaling)
        ids = tokenize(tokenizer, captions)[0]  # (N, L)
        null_ids = tokenize(tokenizer, [""])[0][0]  # (L,)
        unet_loss = pretrain_unet(unet, text_encoder, scheduler, latents * scaling, ids, null_ids, cfg,
                                  device, logger, progress, precision)
        t3 = time.time()
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.save_pretrained(out, safe_serialization=True)
        n = min(cfg.num_samples, len(pool))
        pick = seeds.numpy_rng(cfg.seed, "tiny.samples").choice(len(pool), n, replace=False)
        grid = sample_grid(pipe, [captions[i] for i in pick], images[pick], cfg.seed, steps=cfg.sample_steps)
        logger.image("tiny_base/samples", grid, 0, path=out / "samples.png")
        atomic_write_json(out / "tiny_base.json", {
            "recipe_version": RECIPE_VERSION, "tiny": dataclasses.asdict(cfg), "pool_fingerprint": pool.fingerprint(),
            "pool_size": len(pool), "captioner": captioner.name, "vae_mse": vae_mse, "unet_loss": unet_loss,
            "scaling_factor": scaling, "device": device.type, "mixed_precision": precision,
            "seconds": {"data": t1 - t0, "vae": t2 - t1, "unet": t3 - t2, "total": time.time() - t0},
        })
    finally:
        logger.close()
