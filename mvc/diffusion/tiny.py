"""The tiny profile's base model: a small Stable-Diffusion-like pipeline built from configs.

It is made of the same classes as SD-1.5 (AutoencoderKL, UNet2DConditionModel, CLIPTextModel,
CLIPTokenizer, DDPMScheduler), only smaller, so every script runs the same code path on it. It is built by one
process (the main one; the others wait and read the cache) on the stage accelerator's device and with its mixed
precision (`mvc.diffusion.inputs.base_source`); every draw comes from CPU generators, so the device changes no
draw, and on a GPU the loop avoids host syncs (losses are read every 25 steps, on a device buffer). The build
checkpoints as it goes and a killed one resumes (`get_tiny_base`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from mvc.core import seeds
from mvc.core.checkpoint import check_trained_on, list_checkpoints, load_checkpoint, save_checkpoint
from mvc.core.schedules import lr_multiplier
from mvc.core.utils import (
    MVCError,
    RunLogger,
    atomic_dir,
    atomic_write_json,
    clean_stale_temps,
    fingerprint,
    image_grid,
    truncate_jsonl,
)
from mvc.diffusion.sd_io import images_to_uint8, tokenize, uint8_to_model
from mvc.diffusion.tokenizer import build_tiny_tokenizer

log = logging.getLogger(__name__)

# Bump when the pretraining recipe changes, so cached bases built by an older recipe are not reused.
RECIPE_VERSION = 4  # 2: deterministic tokenizer (train_bpe); 3: one resize filter (sd_io), named seeds; 4: min-SNR, EMA

#################################################################################
#                                 Components                                    #
#################################################################################

def tiny_vae_scale_factor(cfg: Any) -> int:
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
        sample_size=cfg.image_size // tiny_vae_scale_factor(cfg), in_channels=in_channels, out_channels=cfg.latent_channels,
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
    """Every image of `dataset` at size x size (the SD input resize of `mvc.diffusion.sd_io`): (N, 3, size, size) uint8."""
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


@dataclasses.dataclass
class UNetTraining:
    """What the U-Net phase's remaining steps depend on, besides the data and the config; its `state_dict` is what
    a checkpoint of the phase holds."""
    unet: Any
    text_encoder: Any
    params: list  # the trained parameters: the U-Net's, then the text encoder's when it is trained
    opt: torch.optim.Optimizer
    scaler: Any  # torch.amp.GradScaler (a no-op unless fp16)
    ema: Any  # diffusers EMAModel of `params`, or None
    gen: torch.Generator  # the CPU generator of every draw
    hist: torch.Tensor  # (steps, [loss, mean per-sample loss]) on the device

    def state_dict(self, step: int) -> dict:
        """The state after `step` steps, loadable with `torch.load(weights_only=True)`."""
        return {"step": int(step), "unet": self.unet.state_dict(), "text_encoder": self.text_encoder.state_dict(),
                "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(),
                "ema": None if self.ema is None else self.ema.state_dict(), "generator": self.gen.get_state(),
                "history": self.hist[:step].cpu()}

    def load_state_dict(self, state: dict) -> int:
        """Continue from `state` (written by `state_dict`); returns its step."""
        step = int(state["step"])
        self.unet.load_state_dict(state["unet"])
        self.text_encoder.load_state_dict(state["text_encoder"])
        self.opt.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if (self.ema is None) != (state["ema"] is None):
            raise ValueError("the state's EMA does not match tiny.ema_decay")
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
            self.ema.to(self.hist.device)
        self.gen.set_state(state["generator"])
        self.hist[:step] = state["history"].to(self.hist.device)
        return step


def _unet_training(unet: Any, text_encoder: Any, cfg: Any, device: torch.device, precision: str) -> UNetTraining:
    """The U-Net phase's trainable state at step 0: models on `device` in training mode, AdamW, loss scaler, EMA."""
    unet.to(device).train()
    text_encoder.to(device).train(cfg.train_text_encoder).requires_grad_(cfg.train_text_encoder)
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if cfg.train_text_encoder else [])
    ema = None
    if cfg.ema_decay is not None:
        from diffusers.training_utils import EMAModel

        # foreach: one fused update for all tensors; its rounding differs in the last bit from the per-tensor loop,
        # so the CPU keeps the loop (and the cached CPU bases their bits)
        ema = EMAModel(params, decay=cfg.ema_decay, foreach=device.type != "cpu")
    return UNetTraining(unet, text_encoder, params, torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0),
                        torch.amp.GradScaler(device.type, enabled=precision == "fp16"), ema,
                        seeds.generator(cfg.seed, "tiny.unet"), torch.zeros(cfg.unet_steps, 2, device=device))


def _unet_step(run: UNetTraining, scheduler: Any, z_all: torch.Tensor, ids: torch.Tensor, null_ids: torch.Tensor,
               snr_table: torch.Tensor, cfg: Any, step: int, precision: str) -> None:
    """One U-Net pretraining step (draws, loss, AdamW, EMA) on the latents `z_all` (N, C, h, w), recorded in
    `run.hist[step]`."""
    device = z_all.device
    idx = torch.randint(0, len(z_all), (cfg.batch_size,), generator=run.gen)
    z0 = z_all[idx.to(device, non_blocking=True)]  # (B, C, h, w)
    tok = ids[idx].clone()  # (B, L)
    drop = torch.rand(len(idx), generator=run.gen) < cfg.caption_dropout
    tok[drop] = null_ids
    noise = torch.randn(z0.shape, generator=run.gen).to(device, non_blocking=True)
    t_cpu = torch.randint(0, len(snr_table), (len(idx),), generator=run.gen)
    w = snr_table[t_cpu]  # (B,), no device round trip
    t = t_cpu.to(device, non_blocking=True)
    zt = scheduler.add_noise(z0, noise, t)
    with _amp(device, precision):
        with torch.set_grad_enabled(cfg.train_text_encoder):
            ehs = run.text_encoder(tok.to(device, non_blocking=True))[0]  # (B, L, D)
        pred = run.unet(zt, t, encoder_hidden_states=ehs).sample
        per_sample = F.mse_loss(pred.float(), noise, reduction="none").mean(dim=(1, 2, 3))  # (B,)
        loss = (per_sample * w.to(per_sample.device, non_blocking=True).to(per_sample)).mean()
    _update(run.opt, run.scaler, loss, run.params, pretrain_lr(cfg, step, cfg.unet_steps,
                                                               warmup=min(100, cfg.unet_steps)))
    if run.ema is not None:
        run.ema.step(run.params)
    run.hist[step, 0], run.hist[step, 1] = loss.detach(), per_sample.detach().mean()


def pretrain_unet(unet: Any, text_encoder: Any, scheduler: Any, latents: torch.Tensor, ids: torch.Tensor,
                  null_ids: torch.Tensor, cfg: Any, device: Any = None,
                  logger: RunLogger | None = None, progress: bool = True, precision: str = "no",
                  resume: dict | None = None, save: Callable[[int, dict], None] | None = None) -> float:
    """Text-to-image noise-prediction training on scaled latents (N, C, h, w) and token ids (N, L), on `device`
    with mixed `precision` ('no', 'fp16', 'bf16').

    Captions are replaced by the empty prompt with probability `cfg.caption_dropout`, so that
    classifier-free guidance works; the text encoder is trained jointly when `cfg.train_text_encoder`.
    The loss is weighted by `snr_weights` (`cfg.snr_gamma`); with `cfg.ema_decay` the U-Net ends with
    the exponential moving average of its weights (and the text encoder with its own). Returns the
    last-100-step mean loss. Every draw comes from a CPU generator, so a device changes no draw.
    Every `cfg.checkpoint_every` steps `save(step, state)` gets the `UNetTraining.state_dict` after them (losses
    checked finite first); `resume` (such a state) continues after its step, to the weights of a run without a stop.
    """
    from tqdm.auto import tqdm

    device = torch.device(device) if device is not None else torch.device("cpu")
    run = _unet_training(unet, text_encoder, cfg, device, precision)
    start = 0
    if resume is not None:
        try:
            start = run.load_state_dict(resume)
        except (KeyError, RuntimeError, ValueError) as e:
            first = (str(e).strip().splitlines() or [""])[0][:150]
            raise MVCError(f"cannot resume the tiny U-Net's pretraining: its saved state does not fit "
                           f"({type(e).__name__}: {first}); delete the partial build to start over") from None
    z_all = latents.to(device)  # (N, C, h, w), on the device once
    snr_table = snr_weights(scheduler, torch.arange(scheduler.config.num_train_timesteps), cfg.snr_gamma)  # (T,)
    bar = tqdm(range(start, cfg.unet_steps), initial=start, total=cfg.unet_steps, desc="tiny base: U-Net",
               disable=not progress)
    for step in bar:
        _unet_step(run, scheduler, z_all, ids, null_ids, snr_table, cfg, step, precision)
        if _log_point(step, cfg.unet_steps):
            _check_finite(run.hist[:step + 1, 0], "U-Net")
            bar.set_postfix(loss=f"{np.mean(run.hist[max(0, step - 99):step + 1, 1].tolist()):.4f}")
            if logger is not None:
                logger.scalars(step, {"loss": run.hist[step, 0].item()}, prefix="unet/")
        if save is not None and (step + 1) % cfg.checkpoint_every == 0:
            _check_finite(run.hist[:step + 1, 0], "U-Net")  # never keep a diverged state
            save(step + 1, run.state_dict(step + 1))
    if run.ema is not None:
        run.ema.copy_to(run.params)
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    _check_weights(run.params, "U-Net")
    recent = run.hist[-100:, 1].tolist()
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
    """Hash of the tiny section (minus cache_dir and checkpoint_every, which change no weight), the pool's
    fingerprint, the captioner, the recipe and the mixed precision of the build (only when not 'no', so fp32 bases
    keep their keys, whichever device built them)."""
    if precision not in ("no", *AMP_DTYPES):
        raise MVCError(f"unknown mixed precision {precision!r} for the tiny base; use no, fp16 or bf16")
    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IN_KEY}
    extra = () if precision == "no" else (precision,)
    return fingerprint(RECIPE_VERSION, d, pool.fingerprint(), captioner_key, *extra)


NOT_IN_KEY = ("cache_dir", "checkpoint_every")  # tiny settings that change where or how often, not what, it builds


def get_tiny_base(cfg: Any, pool: Any, captioner: Any = None, output_dir: str | os.PathLike | None = None,
                  device: Any = None, progress: bool = True, precision: str = "no") -> Path:
    """The folder of the tiny base pretrained on `pool` (a StableDiffusionPipeline), built once and cached.

    The base learns from the remainder pool (disjoint from the labelled subset) with label-free
    `attributes` captions, under `cfg.cache_dir/<key>/`; later calls with the same tiny section
    and pool return the cached folder. It trains on `device` (default: the CPU) with mixed `precision` ('no',
    'fp16', 'bf16': part of the key). The build is resumable: its checkpoints (after the VAE, then every
    `cfg.checkpoint_every` U-Net steps) and logs live in `<key>.partial/` beside it (`PartialBuild`), and a killed
    build continues from there, on the device type that started it, to the weights of a build without a stop.
    The finished base is published whole (readers never see half of one) and the partial folder removed; one
    process at a time builds a key (others wait on a lock, then find it built).
    Pool captions are cached under `<output_dir>/captions/` when `output_dir` is given.
    """
    from mvc.data.captions import AttributeCaptioner

    captioner = captioner if captioner is not None else AttributeCaptioner()
    if len(pool) == 0:
        raise MVCError("the tiny base needs a non-empty remainder pool: lower data.k_per_class "
                       "or use model.base=<a pretrained diffusers folder>")
    key = tiny_base_key(cfg, pool, captioner.cache_key, precision)
    root = Path(cfg.cache_dir).expanduser()
    folder, work = root / key, root / f"{key}.partial"
    if _cached(folder, work):
        return folder
    device = torch.device(device) if device is not None else torch.device("cpu")
    with _locked(work):
        if _cached(folder, work):  # another process built it while this one waited
            return folder
        clean_stale_temps(root, key)  # temp folders of killed builds
        clean_stale_temps(work, recursive=True)  # and of their checkpoint and log writes
        with atomic_dir(folder) as tmp:
            # seeding the build must not touch the caller's RNGs: the CPU's, and the device's (the VAE's posterior
            # draws)
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                _build_tiny_base(cfg, pool, captioner, work, tmp, output_dir, device, progress, precision, key)
            for name in ("logs", "pool_captions.jsonl"):  # what the partial folder kept for a resume
                if (work / name).exists():
                    os.replace(work / name, tmp / name)
        shutil.rmtree(work, ignore_errors=True)
    log.info("tiny base: built %s", folder)
    return folder


def _cached(folder: Path, work: Path) -> bool:
    """Whether the base is built in `folder`; then a partial folder left by a build killed right after publishing
    it is removed."""
    if not (folder / "model_index.json").is_file():
        return False
    if work.exists():
        shutil.rmtree(work, ignore_errors=True)
    log.info("tiny base: cache hit %s", folder)
    return True


@contextlib.contextmanager
def _locked(work: Path) -> Iterator[None]:
    """Hold an exclusive lock on the partial build folder `work` (created when missing); the kernel releases it when
    the holder dies, so a killed build leaves no stale lock. Without fcntl (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    work.mkdir(parents=True, exist_ok=True)
    fd = os.open(work, os.O_RDONLY)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class PartialBuild:
    """The checkpoints of a tiny base's build in `work` (`vae/`, then `unet/`): written as it goes, with the seconds
    each phase took (summed over the attempts, each up to its last checkpoint) and how often it resumed, and read
    back so that a killed build continues. A checkpoint that does not load, was trained on anything else (another key
    or device type) or is out of range is refused in one line that names the folder to delete."""

    def __init__(self, work: Path, cfg: Any, key: str, device: torch.device):
        """Read the newest checkpoint of each phase in `work` (none: a fresh build)."""
        self.work, self.cfg, self.device = work, cfg, device
        self.trained_on = {"tiny_base_key": key, "device": device.type}
        self.fix = f"delete {work} to build the tiny base from scratch"
        self.vae, self.unet = self._read("vae"), self._read("unet")
        if self.unet is not None and self.vae is None:
            raise MVCError(f"{work} holds a U-Net checkpoint but no VAE one; {self.fix}")
        last = self.unet or self.vae
        self.resumes = 0 if last is None else int(last["resumes"]) + 1
        self.before = {} if last is None else dict(last["seconds"])
        self.spent = {"data": 0.0, "vae": 0.0, "unet": 0.0}  # this attempt's
        self.t0 = self._mark = time.time()

    def _read(self, phase: str) -> dict | None:
        """The newest checkpoint of `phase` ('vae' or 'unet'), checked; None when there is none."""
        ckpts = list_checkpoints(self.work / phase)
        if not ckpts:
            return None
        path = ckpts[-1]
        try:
            ckpt = load_checkpoint(path, kind=f"tiny_{phase}")
        except MVCError as e:
            raise MVCError(f"{e}; {self.fix}") from None
        started = (ckpt.get("trained_on") or {}).get("device")
        check_trained_on(ckpt, self.trained_on, path, fix=f"build on the device type that started it ({started}), "
                                                          f"or {self.fix}")
        need = {"vae": ("vae", "vae_mse"), "unet": ("unet", "text_encoder", "optimizer", "scaler", "ema",
                                                    "generator", "history")}[phase]
        missing = [k for k in ("seconds", "resumes", "rng", *need) if k not in ckpt]
        if missing:
            raise MVCError(f"the tiny base's {phase} checkpoint {path} lacks {', '.join(missing)}; {self.fix}")
        step, total = ckpt["step"], self.cfg.vae_steps if phase == "vae" else self.cfg.unet_steps
        valid = step == total if phase == "vae" else 0 < step <= total and len(ckpt["history"]) == step
        if not valid:
            raise MVCError(f"the tiny base's {phase} checkpoint {path} is at step {step} of {total}; {self.fix}")
        log.info("tiny base: resuming from %s", path)
        return ckpt

    def lap(self, phase: str) -> None:
        """Count the seconds since the last lap as `phase`'s."""
        now = time.time()
        self.spent[phase] += now - self._mark
        self._mark = now

    def seconds(self, running: str | None = None) -> dict:
        """Seconds per phase and in total, the earlier attempts' added; `running`: the phase under way."""
        now = time.time()
        out = {k: self.before.get(k, 0.0) + v for k, v in self.spent.items()}
        if running is not None:
            out[running] += now - self._mark
        out["total"] = self.before.get("total", 0.0) + now - self.t0
        return out

    def save(self, phase: str, step: int, state: dict) -> None:
        """Checkpoint `state` of `phase` after `step` steps, with the seconds so far, the resume count and the global
        RNG states (the VAE's posterior draws)."""
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        extra = {"seconds": self.seconds(running=phase), "resumes": self.resumes,
                 "rng": {"cpu": torch.get_rng_state(), "cuda": cuda}}
        save_checkpoint(self.work / phase, step, {**state, **extra}, dataclasses.asdict(self.cfg), keep=1,
                        kind=f"tiny_{phase}", trained_on=self.trained_on)

    def restore_rng(self) -> None:
        """Set the global RNGs to the newest checkpoint's (what an uninterrupted build has there)."""
        rng = (self.unet or self.vae)["rng"]
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None:
            torch.cuda.set_rng_state(rng["cuda"], self.device)


def _pool_data(cfg: Any, pool: Any, captioner: Any, work: Path, output_dir: str | os.PathLike | None,
               progress: bool) -> tuple[Any, list[str], torch.Tensor]:
    """The pretraining pool (subsampled to `cfg.pool_size`), its captions (cached) and images (N, 3, S, S) uint8."""
    from mvc.data.captions import caption_cache_path, caption_dataset

    if cfg.pool_size is not None and cfg.pool_size < len(pool):
        rng = seeds.numpy_rng(cfg.seed, "tiny.pool")
        pool = pool.subset(np.sort(rng.choice(len(pool), cfg.pool_size, replace=False)))
    cap_path = (caption_cache_path(output_dir, captioner, pool) if output_dir is not None
                else work / "pool_captions.jsonl")
    caps = caption_dataset(pool, captioner, cap_path, batch_size=256, progress=progress)
    return pool, [caps[i] for i in pool.ids], pool_images(pool, cfg.image_size, progress=progress)


def _build_tiny_base(cfg: Any, pool: Any, captioner: Any, work: Path, out: Path, output_dir: str | os.PathLike | None,
                     device: torch.device, progress: bool, precision: str, key: str) -> None:
    """Pretrain the tiny base on `pool`, or continue the partial build in `work` (checkpoints, logs/, pool captions),
    and save it (pipeline, samples.png, tiny_base.json) in `out`."""
    build = PartialBuild(work, cfg, key, device)
    pool, captions, images = _pool_data(cfg, pool, captioner, work, output_dir, progress)
    torch.manual_seed(seeds.derive_seed(cfg.seed, "tiny.init"))  # the random initialisation of every component
    comps = build_tiny_components(cfg)
    vae, unet, text_encoder, tokenizer = (comps[k] for k in ("vae", "unet", "text_encoder", "tokenizer"))
    unet_start = 0 if build.unet is None else int(build.unet["step"])
    logger = _resumed_logger(work / "logs", fresh=build.vae is None, unet_start=unet_start)
    build.lap("data")
    try:
        if build.vae is None:
            vae_mse = pretrain_vae(vae, images, cfg, device, logger, progress, precision)
            build.save("vae", cfg.vae_steps, {"vae": vae.state_dict(), "vae_mse": vae_mse})
        else:  # the VAE phase is done: its weights, as pretrain_vae leaves them
            vae.load_state_dict(build.vae["vae"])
            vae.to(device).eval().requires_grad_(False)
            vae_mse = float(build.vae["vae_mse"])
            build.restore_rng()
        build.lap("vae")
        # SD scales latents to unit variance before diffusion; its factor (0.18215) was measured the same way
        latents = encode_latents(vae, images, device=device)  # (N, C, h, w)
        scaling = float(1.0 / latents.std())
        vae.register_to_config(scaling_factor=scaling)
        ids = tokenize(tokenizer, captions)[0]  # (N, L)
        null_ids = tokenize(tokenizer, [""])[0][0]  # (L,)
        unet_loss = pretrain_unet(unet, text_encoder, comps["scheduler"], latents * scaling, ids, null_ids, cfg,
                                  device, logger, progress, precision, resume=build.unet,
                                  save=lambda step, state: build.save("unet", step, state))
        build.lap("unet")
        _save_base(comps, out, logger, cfg, captions, images)
        atomic_write_json(out / "tiny_base.json", {
            "recipe_version": RECIPE_VERSION, "tiny": dataclasses.asdict(cfg), "pool_fingerprint": pool.fingerprint(),
            "pool_size": len(pool), "captioner": captioner.name, "vae_mse": vae_mse, "unet_loss": unet_loss,
            "scaling_factor": scaling, "device": device.type, "mixed_precision": precision,
            "seconds": build.seconds(), "resumes": build.resumes,
        })
    finally:
        logger.close()


def _resumed_logger(logs: Path, fresh: bool, unet_start: int) -> RunLogger:
    """The build's logger in `logs`: emptied for a fresh build; for a resumed one without the records of the U-Net
    steps from `unet_start` on, which it runs again (TensorBoard, which cannot drop one phase's events, may show
    those twice)."""
    if fresh:
        return RunLogger(logs, truncate_to=-1)
    truncate_jsonl(logs / "log.jsonl", lambda r: int(r.get("step", 0)) < unet_start
                   or not any(k.startswith("unet/") for k in r))
    return RunLogger(logs)


def _save_base(comps: dict, out: Path, logger: RunLogger, cfg: Any, captions: list[str], images: torch.Tensor) -> None:
    """Save the trained components as a StableDiffusionPipeline in `out`, with samples.png (real pool images beside
    samples from their captions)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**{k: comps[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    n = min(cfg.num_samples, len(images))
    pick = seeds.numpy_rng(cfg.seed, "tiny.samples").choice(len(images), n, replace=False)
    grid = sample_grid(pipe, [captions[i] for i in pick], images[pick], cfg.seed, steps=cfg.sample_steps)
    logger.image("tiny_base/samples", grid, 0, path=out / "samples.png")
