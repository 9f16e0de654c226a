"""The tiny profile's base model: a small Stable-Diffusion-like pipeline built from configs.

It is made of the same classes as SD-1.5 (AutoencoderKL, UNet2DConditionModel, CLIPTextModel,
CLIPTokenizer, DDPMScheduler), only smaller, so every script runs the same code path on it.
"""

from __future__ import annotations

import json
from typing import Iterable

from mvc.config import TinyBaseConfig

#################################################################################
#                                  Tokenizer                                    #
#################################################################################

# Words the tokenizer learns whole; anything else falls back to sub-word / byte tokens.
BASE_WORDS = (
    "a an the of and with on in photo image picture class type item object thing "
    "dark bright light dim pale very mid medium gray grey black white "
    "small large big tiny huge wide narrow tall short long thin thick square round "
    "smooth textured plain patterned striped detailed soft sharp flat "
    "symmetric asymmetric balanced lopsided centered left right top bottom upper lower "
    "solid hollow filled outlined edge edges shape shapes"
).split()


def build_tiny_tokenizer(extra_words: Iterable[str] = (), max_length: int = 32, vocab_size: int = 1000):
    """A CLIPTokenizer whose byte-level BPE vocabulary is trained locally on a small word list.

    Every byte is in the vocabulary, so any text (class names included) tokenizes without <unk>.
    """
    from tokenizers import pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    words = list(BASE_WORDS) + [w for x in extra_words for w in str(x).lower().split()]
    corpus = [" ".join(words)] * 4  # repeat so every whole word clears the merge threshold
    backend = CLIPTokenizer().backend_tokenizer  # CLIP's normalizer and pre-tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, show_progress=False, end_of_word_suffix="</w>",
        special_tokens=["<|startoftext|>", "<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(corpus, trainer)
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return CLIPTokenizer(vocab=model["vocab"], merges=merges, model_max_length=max_length)


#################################################################################
#                                 Components                                    #
#################################################################################

def vae_scale_factor(cfg: TinyBaseConfig) -> int:
    """Pixel size / latent size of the tiny VAE."""
    return 2 ** (len(cfg.vae_channels) - 1)


def build_tiny_components(cfg: TinyBaseConfig, extra_words: Iterable[str] = (), in_channels: int = 4) -> dict:
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
                              beta_start=0.00085, beta_end=0.012, clip_sample=False)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}
