"""InstructPix2Pix fine-tuning maths: conditioning dropout, the one-off caches, the global batch order, the loss.

Every labelled image is VAE-encoded once and every distinct prompt text-encoded once (`mvc.diffusion.sd_io`, as
generation prepares them), into caches in CPU memory; a step only indexes them and runs the U-Net. The inputs a
step builds are exactly the three chunks the InstructPix2Pix pipeline feeds its U-Net at sampling time.
docs/finetuning.md ties each choice (condition mode, target sample, flips, dropout) to the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mvc.core.utils import MVCError, batched
from mvc.diffusion.engine import draw_noise
from mvc.diffusion.sd_io import encode_images, encode_prompts, images_to_tensor

CACHE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}  # text cache dtype per mixed precision (else fp32)


#################################################################################
#                            Conditioning dropout                               #
#################################################################################

def conditioning_dropout_masks(batch_size: int, p_text: float, p_image: float, p_both: float,
                               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row keep masks (keep_text, keep_image), bool (B,), for three disjoint drop cases.

    One uniform u per row: u < p_text drops the text only, the next p_image drops the image only,
    the next p_both drops both; the rest keeps both.
    """
    for name, p in (("p_text", p_text), ("p_image", p_image), ("p_both", p_both)):
        if not 0.0 <= p <= 1.0:
            raise MVCError(f"conditioning dropout {name}={p} must be in [0, 1]")
    if p_text + p_image + p_both > 1.0 + 1e-9:
        raise MVCError(f"conditioning dropout probabilities sum to {p_text + p_image + p_both:.3f} > 1")
    u = torch.rand(batch_size, generator=generator)
    drop_text_only = u < p_text
    drop_image_only = (u >= p_text) & (u < p_text + p_image)
    drop_both = (u >= p_text + p_image) & (u < p_text + p_image + p_both)
    keep_text = ~(drop_text_only | drop_both)
    keep_image = ~(drop_image_only | drop_both)
    return keep_text, keep_image


#################################################################################
#                                   Caches                                      #
#################################################################################

@dataclass
class LatentCache:
    """VAE posteriors of every image: mean/std (N, F, C, h, w) float32, F = 2 when flips are cached."""
    mean: torch.Tensor
    std: torch.Tensor
    scaling_factor: float

    @property
    def nbytes(self) -> int:
        """Memory held by the cache."""
        return sum(t.numel() * t.element_size() for t in (self.mean, self.std))

    def to(self, device) -> "LatentCache":
        """A copy on `device` (training keeps it on the CPU; a benchmark may not)."""
        return LatentCache(self.mean.to(device), self.std.to(device), self.scaling_factor)


@dataclass
class TextCache:
    """Text-encoder outputs, each distinct prompt once: table (U, L, D) of the distinct prompts,
    index (P,) long of every image's prompt into it, empty (L, D) of the prompt ""."""
    table: torch.Tensor
    index: torch.Tensor
    empty: torch.Tensor

    @property
    def nbytes(self) -> int:
        """Memory held by the cache."""
        return sum(t.numel() * t.element_size() for t in (self.table, self.index, self.empty))

    def to(self, device) -> "TextCache":
        """A copy on `device` (training keeps it on the CPU; a benchmark may not)."""
        return TextCache(self.table.to(device), self.index.to(device), self.empty.to(device))

    def lookup(self, prompt_idx: torch.Tensor) -> torch.Tensor:
        """Embeddings (b, L, D) of the prompts of images `prompt_idx` (b,)."""
        return self.table[self.index[prompt_idx]]


@torch.no_grad()
def encode_latents_cache(vae, dataset, resolution: int, batch_size: int = 64, flip: bool = False,
                         show_progress: bool = True) -> LatentCache:
    """VAE-encode every image of `dataset` once (mvc.diffusion.sd_io, as the pipeline does): posterior mean and std,
    both orientations if `flip`."""
    means, stds = [], []
    for chunk in tqdm(list(batched(range(len(dataset)), batch_size)), desc="caching VAE latents",
                      disable=not show_progress):
        x = images_to_tensor([dataset[i][0] for i in chunk], resolution)  # (b, 3, R, R) in [-1, 1]
        views = [x, torch.flip(x, dims=[3])] if flip else [x]
        enc = [encode_images(vae, v, batch_size) for v in views]  # each (mean, std), (b, C, h, w)
        means.append(torch.stack([m for m, _ in enc], 1).cpu())  # (b, F, C, h, w)
        stds.append(torch.stack([s for _, s in enc], 1).cpu())
    return LatentCache(torch.cat(means), torch.cat(stds), float(vae.config.scaling_factor))


@torch.no_grad()
def encode_prompts_cache(tokenizer, text_encoder, prompts: list[str], batch_size: int = 64,
                         show_progress: bool = True, dtype: torch.dtype = torch.float32) -> TextCache:
    """Text-encode each distinct prompt once (mvc.diffusion.sd_io) plus the empty prompt, stored on the CPU in `dtype`
    (the U-Net's compute dtype: under fp16 mixed precision its cross-attention reads fp16 anyway)."""
    uniq = sorted(set(prompts))
    pos = {p: i for i, p in enumerate(uniq)}
    empty = encode_prompts(tokenizer, text_encoder, [""])[0].to("cpu", dtype)  # (L, D)
    table = torch.empty((len(uniq), *empty.shape), dtype=dtype)  # (U, L, D), filled in place: no second copy
    for start in tqdm(range(0, len(uniq), batch_size), desc="caching text embeddings", disable=not show_progress):
        chunk = uniq[start:start + batch_size]
        table[start:start + len(chunk)] = encode_prompts(tokenizer, text_encoder, chunk).to("cpu", dtype)
    index = torch.tensor([pos[p] for p in prompts], dtype=torch.long)  # (P,)
    return TextCache(table, index, empty)


#################################################################################
#                              Global batch order                               #
#################################################################################

class GlobalBatchSampler:
    """Endless stream of pair indices: epoch after epoch, a fresh permutation from its own generator."""

    def __init__(self, num_pairs: int, generator: torch.Generator):
        if num_pairs < 1:
            raise MVCError("no training pairs: the labelled subset needs classes with at least 2 images")
        self.n = num_pairs
        self.gen = generator
        self.order = torch.randperm(self.n, generator=self.gen)
        self.pos = 0
        self.epoch = 0

    def next(self, size: int) -> torch.Tensor:
        """The next `size` pair indices (long), crossing into the next epoch's permutation when needed."""
        out = []
        while size > 0:
            if self.pos >= self.n:
                self.order = torch.randperm(self.n, generator=self.gen)
                self.pos, self.epoch = 0, self.epoch + 1
            take = min(size, self.n - self.pos)
            out.append(self.order[self.pos:self.pos + take])
            self.pos += take
            size -= take
        return torch.cat(out)

    def state_dict(self) -> dict:
        """Generator state, current permutation and position (weights_only-loadable)."""
        return {"gen": self.gen.get_state(), "order": self.order.clone(), "pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state_dict` was taken."""
        if len(state["order"]) != self.n:
            raise MVCError(f"the checkpoint was trained on {len(state['order'])} pairs, this run has {self.n}; "
                           "resume with the same data and pairs config")
        self.gen.set_state(state["gen"])
        self.order, self.pos, self.epoch = state["order"].clone(), int(state["pos"]), int(state["epoch"])


#################################################################################
#                         Per-step randomness and loss                          #
#################################################################################

@dataclass
class StepNoise:
    """Every random draw of one (global) micro-batch, so any process can take its rows."""
    timesteps: torch.Tensor  # (B,) long
    noise: torch.Tensor      # (B, C, h, w) diffusion noise
    eps: torch.Tensor        # (B, C, h, w) posterior-sample noise of the target latent
    flip: torch.Tensor       # (B,) long, 0 or 1 (orientation index into the cache)
    keep_text: torch.Tensor  # (B,) bool
    keep_image: torch.Tensor  # (B,) bool

    def rows(self, sl: slice) -> "StepNoise":
        """The rows `sl` of every draw."""
        return StepNoise(*(getattr(self, f)[sl] for f in self.__dataclass_fields__))

    def to(self, device) -> "StepNoise":
        """A copy on `device`."""
        return StepNoise(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def draw_step_noise(batch_size: int, latent_shape: tuple[int, ...], num_train_timesteps: int, flip: bool,
                    p_text: float, p_image: float, p_both: float, generator: torch.Generator) -> StepNoise:
    """Draw the dropout masks, then timesteps and noises (`engine.draw_noise`), then flips of a whole global
    micro-batch from `generator`."""
    keep_text, keep_image = conditioning_dropout_masks(batch_size, p_text, p_image, p_both, generator)
    t, noise, eps = draw_noise(batch_size, latent_shape, num_train_timesteps, generator)
    flips = (torch.randint(0, 2, (batch_size,), generator=generator) if flip
             else torch.zeros(batch_size, dtype=torch.long))
    return StepNoise(t, noise, eps, flips, keep_text, keep_image)


def gather_batch(latents: LatentCache, text: TextCache, cond_idx: torch.Tensor, target_idx: torch.Tensor,
                 prompt_idx: torch.Tensor, rnd: StepNoise, images=None,
                 shapes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Index the caches: condition latent (mode), target posterior, prompt embedding (or with `images`, an
    `mvc.diffusion.conditioning.ImageContexts`, the pair's image context), with dropout applied; with `shapes`
    (N, F, 1, R, R) uint8, the target's edge map in [0, 1] too."""
    f = rnd.flip
    cond = latents.mean[cond_idx, f]  # (b, C, h, w), the posterior mode
    cond = cond * rnd.keep_image[:, None, None, None].to(cond.dtype)  # dropped image -> zeros
    target = (latents.mean[target_idx, f] + latents.std[target_idx, f] * rnd.eps) * latents.scaling_factor
    emb = text.lookup(prompt_idx) if images is None else images.lookup(cond_idx, target_idx, f)  # (b, L, D)
    emb = torch.where(rnd.keep_text[:, None, None], emb, text.empty[None].to(emb.dtype))
    out = {"cond_latents": cond, "target_latents": target, "text_embeds": emb}
    if shapes is not None:
        out["controlnet_cond"] = shapes[target_idx, f].float() / 255.0
    return out


def noise_prediction_loss(unet, noise_scheduler, latents: torch.Tensor, text_embeds: torch.Tensor, noise: torch.Tensor,
                          timesteps: torch.Tensor, cond_latents: torch.Tensor | None = None,
                          **unet_kwargs) -> torch.Tensor:
    """Per-sample noise-prediction MSE (b,) of a U-Net (epsilon or v_prediction) on scaled latents (b, C, h, w):
    the text-to-image U-Net, or with `cond_latents` (b, C, h, w) concatenated the 8-channel InstructPix2Pix one."""
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)  # (b, C, h, w)
    model_in = noisy if cond_latents is None else torch.cat([noisy, cond_latents.to(noisy.dtype)], dim=1)
    pred = unet(model_in, timesteps, encoder_hidden_states=text_embeds, return_dict=False, **unet_kwargs)[0]
    target = prediction_target(noise_scheduler, latents, noise, timesteps)
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


def prediction_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor,
                      timesteps: torch.Tensor) -> torch.Tensor:
    """What the U-Net learns to predict (b, C, h, w): the noise (epsilon) or the velocity (v_prediction), as the
    scheduler's `prediction_type` says."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise MVCError(f"unsupported scheduler prediction_type {kind!r}; use epsilon or v_prediction")


def ip2p_loss(unet, noise_scheduler, cond_latents: torch.Tensor, target_latents: torch.Tensor,
              text_embeds: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              controlnet_cond: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample noise-prediction MSE (b,) of the 8-channel U-Net, the condition latent beside the noisy target
    (with `controlnet_cond`, a U-Net with a ControlNet branch reading that map)."""
    extra = {} if controlnet_cond is None else {"controlnet_cond": controlnet_cond}
    return noise_prediction_loss(unet, noise_scheduler, target_latents, text_embeds, noise, timesteps, cond_latents,
                                 **extra)
