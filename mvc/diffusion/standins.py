"""Local stand-ins for the full profile's hub models, built from configs with random weights.

For a run without network or GPU (the miniature full-profile run, `tests/smoke/run.sh`, and tests), these
builders write folders with the *same structure* as the hub's SD-1.5 and BLIP-2:
- `save_sd15_structured`: a StableDiffusionPipeline folder with SD-1.5's classes and config keys (AutoencoderKL,
  a 4-level UNet2DConditionModel, CLIPTextModel + CLIPTokenizer with 77 positions, SD-1.5's PNDM scheduler
  config, safetensors weights), at tiny widths;
- `save_small_blip2`: a `Blip2ForConditionalGeneration` + `Blip2Processor` folder from a small config, with an
  OPT-style byte-level BPE tokenizer trained locally.
Both load through the same code paths as the hub ids: only the folder replaces the hub. Their outputs mean nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch

from mvc.diffusion.models import SD15_TEXT_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG

# Tiny widths over SD-1.5's configs (every key is SD-1.5's; only sizes change). Widths are multiples of
# SD-1.5's 32 normalisation groups; 4 levels each, as SD-1.5: the VAE downsamples 8x.
SD15_MINI_UNET = dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, cross_attention_dim=32, sample_size=8)
SD15_MINI_VAE = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, sample_size=64)
SD15_MINI_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      projection_dim=32)
# SD-1.5's scheduler/scheduler_config.json (PNDM)
SD15_SCHEDULER_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                             num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
                             clip_sample=False, trained_betas=None)

CAPTION_WORDS = ("a photo of an the with on in and small large dark bright picture image object close up view "
                 "white black red blue green grey scan brain animal vehicle plane car bird cat dog").split()


def save_sd15_structured(folder: str | os.PathLike, words: Iterable[str] = (), seed: int = 0) -> Path:
    """An SD-1.5-structured text-to-image pipeline folder at tiny widths (random weights); returns it."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from mvc.diffusion.tokenizer import build_tiny_tokenizer

    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer((*CAPTION_WORDS, *words), max_length=SD15_TEXT_CONFIG["max_position_embeddings"])
    text = CLIPTextModel(CLIPTextConfig(**{**SD15_TEXT_CONFIG, **SD15_MINI_TEXT, "vocab_size": len(tokenizer)},
                                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.pad_token_id))
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**{**SD15_VAE_CONFIG, **SD15_MINI_VAE}),
        text_encoder=text, tokenizer=tokenizer,
        unet=UNet2DConditionModel(**{**SD15_UNET_CONFIG, **SD15_MINI_UNET}),
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG),  # the file keeps keys PNDM ignores
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def opt_style_tokenizer(words: Iterable[str], vocab_size: int = 1000):
    """A byte-level BPE tokenizer like OPT's (`</s>` as BOS and EOS, `<pad>`, `<unk>`), trained on `words`
    with `mvc.diffusion.tokenizer.train_bpe` (deterministic: the same words give the same ids in every process)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mvc.diffusion.tokenizer import train_bpe

    pre = pre_tokenizers.ByteLevel(add_prefix_space=True)
    pieces = [p for w in words for p, _ in pre.pre_tokenize_str(w)]
    specials = ["<pad>", "</s>", "<unk>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens, merges = train_bpe(pieces, max(0, vocab_size - len(specials) - len(alphabet)), suffix="")
    vocab: dict[str, int] = {}
    for t in (*specials, *alphabet, *tokens):
        vocab.setdefault(t, len(vocab))
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    bpe.pre_tokenizer = pre
    bpe.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def save_small_blip2(folder: str | os.PathLike, words: Iterable[str] = (), image_size: int = 32,
                     seed: int = 0) -> Path:
    """A BLIP-2 (ViT, Q-Former, OPT decoder, two layers each, width 32) + processor folder, random weights."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessor

    words = [*CAPTION_WORDS, *words]
    tok = opt_style_tokenizer(words)
    processor = Blip2Processor(BlipImageProcessor(size={"height": image_size, "width": image_size}), tok,
                               num_query_tokens=4)
    config = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=8),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=100, max_position_embeddings=64),
        text_config=dict(model_type="opt", vocab_size=len(processor.tokenizer), hidden_size=32, ffn_dim=64,
                         num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
                         max_position_embeddings=64, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id),
        num_query_tokens=4, image_token_index=processor.tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    # random weights would decode to stray bytes, or end at once: let the stand-in speak in whole words (the
    # tokens of `words`) by zeroing the output rows of every other token (a zero logit loses to the largest of
    # the words' random logits, so greedy decoding picks a word, and EOS never comes before max_new_tokens)
    vocab = processor.tokenizer.get_vocab()
    whole = sorted({vocab[f"\u0120{w}"] for w in words if f"\u0120{w}" in vocab})  # "Ġword": a word after a space
    out = model.get_output_embeddings().weight  # (V, D)
    with torch.no_grad():
        keep = torch.zeros(len(out), dtype=torch.bool)
        keep[whole] = True
        out[~keep] = 0.0
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return Path(folder)
