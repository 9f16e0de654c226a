"""Typed configs: dataclass sections with help text and validation, YAML files, CLI overrides.

Every script reads one YAML file (`--config configs/tiny.yaml`) into the same `Config` and uses the sections it
needs. `--section.key=value` (or `--section.key value`) overrides a value, parsed as YAML (`--run.seed=null`,
`--mixing.window=[1,8]`). An unknown key, a wrong type or an out-of-range value is a one-line `MVCError` naming
the key. Nothing slips past: every float must be finite (`nan` passes any `<`/`>` test), ranges are the ones
torch and diffusers accept, a list that must not be empty is not, a section is a mapping (or null: its
defaults), a config file is UTF-8, at most 1 MiB, without duplicate keys or an alias blow-up, and rules that
span keys (the prompt template, mixing ops and window, the tiny base's widths) are checked once, here.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from mvc.core.registry import choices, config_rule_of
from mvc.core.utils import MVCError, atomic_write_text, short_repr


def opt(default: Any, help: str, *, choices: Callable[[], list] | list | None = None,
        min: float | None = None, max: float | None = None, min_exclusive: bool = False,
        max_exclusive: bool = False, min_len: int | None = None, unique: bool = False) -> Any:
    """A config field with its help text, optional choices (a list or a zero-arg callable returning
    a registry's names), an optional numeric range (for a list: of each item), and for a list its
    least length and whether items must differ. Floats must be finite whatever the range."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "min_exclusive": min_exclusive,
            "max_exclusive": max_exclusive, "min_len": min_len, "unique": unique}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


SEED_MAX = 2**63 - 1  # seeds are hashed into 63-bit streams (mvc.core.seeds); arrays store them as int64
SEED = {"min": 0, "max": SEED_MAX}


#################################################################################
#                                  Sections                                     #
#################################################################################

# Choices are the names the packages that implement them publish (`mvc.core.registry.publish_choices`), read
# when a config is validated; this module imports none of those packages.
_datasets = choices("dataset")
_captioners = choices("captioner")
_strategies = choices("strategy")
_samplers = choices("sampler")
_lr_schedules = choices("lr schedule")
_precisions = choices("precision")
_dtypes = choices("dtype")
_generators = choices("generator")


@dataclass
class RunConfig:
    """Where outputs go and the base seed."""
    output_dir: str = opt("outputs/tiny", "Root of every output of this profile (each stage writes a sub-folder).")
    seed: int | None = opt(0, "Base seed; null draws one at random (it is then logged).", **SEED)


@dataclass
class DataConfig:
    """Which dataset, and which low-data subset of it."""
    name: str = opt("fashion_mnist", "Dataset name from the registry.", choices=_datasets)
    root: str = opt("datasets", "Data root; each dataset looks in its own sub-folder (see datasets/README.md).")
    k_per_class: int | None = opt(20, "Labelled images per class (the low-data subset); null uses all.", min=1)
    subset_seed: int = opt(0, "Seed of the labelled-subset draw (independent of run.seed).", **SEED)
    on_small_class: str = opt("error", "A class with fewer than 2 images: 'error' or 'skip' (with a warning).",
                              choices=choices("small-class policy"))
    test_split: str = opt("test", "Split used for evaluation.", choices=choices("eval split"))
    test_fraction: float = opt(0.2, "Per-class fraction held out as 'test' by datasets without an official "
                               "split (caltech101).", min=0, max=1, min_exclusive=True, max_exclusive=True)
    val_fraction: float = opt(0.1, "test_split=val on a dataset without a val split: this fraction of each "
                              "class's remainder pool is held out as val.", min=0, max=1, min_exclusive=True, max_exclusive=True)


@dataclass
class PairsConfig:
    """Index pairs (condition, target) drawn within each class."""
    rounds: int = opt(10, "How many times each class's two random index lists are drawn and paired.", min=1)
    seed: int = opt(0, "Seed of the pair draw.", **SEED)


@dataclass
class SamplingConfig:
    """Clustering-based sampling (the thesis, section 5.1; mvc/diffusion/clustering.py): per class, k-means on image
    embeddings, and only the most coherent clusters' most central images are fine-tuned on and generated from."""
    method: str = opt("none", "'none' (every labelled image) or 'clusters' (the kept images of coherent clusters; "
                      "fine-tuning and generation write to *_clusters folders).",
                      choices=choices("sampling method"))
    embedder: str = opt("base_vae", "'base_vae' (the flattened VAE posterior means of model.base: label-free on the "
                        "tiny profile, whose base never saw labels) or a timm model name (its pooled features, its "
                        "own preprocessing; e.g. efficientnet_b0, the thesis' choice).")
    pretrained: bool = opt(True, "timm embedders: pretrained weights from the HF hub cache (HF_HUB_OFFLINE is "
                           "respected); false gives a random network's features.")
    clusters_per_class: int = opt(3, "k of the per-class k-means (lowered, with a warning, for a class with fewer "
                                  "images).", min=1)
    keep_fraction: float = opt(0.8, "Share of each cluster's members kept, the closest to its centroid (at least 2 "
                               "when the cluster has 2).", min=0, max=1, min_exclusive=True)
    min_coherence: float = opt(0.85, "A cluster is kept when the mean cosine similarity of its kept members to the "
                               "centroid is at least this ...", min=-1, max=1)
    max_spread: float = opt(0.1, "... and their standard deviation at most this (1: no limit).", min=0, max=1)
    seed: int = opt(0, "Seed of the k-means initialisations (independent of run.seed).", **SEED)


@dataclass
class CaptionConfig:
    """Captioner and prompt template."""
    captioner: str = opt("attributes", "Captioner from the registry.", choices=_captioners)
    model_id: str = opt("Salesforce/blip2-opt-2.7b", "Hub id or local folder of the BLIP-2 / LAVIS captioner.")
    batch_size: int = opt(16, "Images per captioner batch (per process).", min=1)
    dtype: str | None = opt(None, "BLIP-2 weights and inputs: fp16, bf16 or fp32 (null: fp16 on CUDA, fp32 elsewhere).",
                            choices=_dtypes)
    max_new_tokens: int = opt(30, "Longest caption, in tokens (blip2/lavis).", min=1)
    template_text: str = opt("an image", "The fixed caption of the 'template' captioner.")
    lavis_model: str = opt("blip2_opt", "LAVIS model name of the 'lavis' captioner.")
    lavis_model_type: str = opt("caption_coco_opt2.7b", "LAVIS model type of the 'lavis' captioner.")
    prompt_template: str = opt("{caption}, a photo of class type {label}",
                               "Prompt = caption joined with the class prompt; must contain {caption} and {label}.")


@dataclass
class TinyBaseConfig:
    """The tiny Stable-Diffusion-like base, built and pretrained locally (tiny profile only)."""
    image_size: int = opt(32, "Pixel resolution of the tiny base.", min=8)
    latent_channels: int = opt(4, "VAE latent channels (4, as SD; the InstructPix2Pix pipeline needs 4).", choices=[4])
    vae_channels: list[int] = opt([16, 32, 32], "VAE block widths; downsampling factor = 2**(len-1) (32 px -> 8x8 latents).",
                                   min=1, min_len=1)
    unet_channels: list[int] = opt([64, 128], "U-Net block widths (each >= 8: its attention has 8 heads).", min=8,
                                    min_len=1)
    text_hidden: int = opt(64, "CLIP text encoder width (SD-1.5: 768).", min=8)
    text_layers: int = opt(2, "CLIP text encoder layers.", min=1)
    max_length: int = opt(32, "Tokenizer max length (SD-1.5: 77).", min=8)
    pool_size: int | None = opt(10000, "Images of the remainder pool used for pretraining (null: all).", min=1)
    vae_steps: int = opt(300, "VAE pretraining steps.", min=0)
    unet_steps: int = opt(350, "Text-to-image U-Net pretraining steps.", min=0)
    batch_size: int = opt(64, "Pretraining batch size.", min=1)
    lr: float = opt(2e-3, "Pretraining learning rate (AdamW, warm-up then cosine decay).", min=0, min_exclusive=True)
    vae_kl_weight: float = opt(1e-3, "Weight of the VAE's KL term (per latent element) beside the MSE.", min=0)
    caption_dropout: float = opt(0.1, "P(empty prompt) in U-Net pretraining, for classifier-free guidance.", min=0, max=1)
    train_text_encoder: bool = opt(True, "Train the CLIP text encoder jointly with the U-Net (frozen later, in MVC).")
    snr_gamma: float | None = opt(None, "Min-SNR-gamma weighting of the U-Net's loss (e.g. 5; null: plain MSE).",
                                  min=0, min_exclusive=True)
    ema_decay: float | None = opt(None, "EMA of the U-Net's (and text encoder's) pretraining weights, saved in "
                                  "the base (null: the last weights).", min=0, max=1)
    num_samples: int = opt(32, "Text-to-image samples in the base's samples.png grid.", min=1)
    sample_steps: int = opt(25, "DDIM steps of those samples.", min=1)
    seed: int = opt(0, "Seed of the pool subsample, the initialisation and the pretraining draws.", **SEED)
    # 500: a save (weights, AdamW and EMA states) costs well under a second on the CPU profiles (the tiny profile's 600
    # U-Net steps make one), and a kill costs the GPU profile at most 500 x 70 ms = 35 s of U-Net steps again
    checkpoint_every: int = opt(500, "Save the build's state every N U-Net steps (and after the VAE) in "
                                "<cache_dir>/<key>.partial/, where a killed build resumes; not part of the key.", min=1)
    cache_dir: str = opt("outputs/cache/tiny_base", "Where built bases are cached, keyed by this section's hash "
                         "(minus cache_dir and checkpoint_every).")


@dataclass
class ModelConfig:
    """The base pipeline that MVC fine-tunes."""
    base: str = opt("tiny", "'tiny' (built locally), a hub id (SD-1.5), or a local diffusers folder.")
    revision: str | None = opt(None, "Hub revision of the base.")
    variant: str | None = opt(None, "Weight variant (e.g. 'fp16').")


@dataclass
class FinetuneConfig:
    """InstructPix2Pix-style fine-tuning on the index pairs (train_mvc.py)."""
    resolution: int = opt(32, "Training resolution (SD-1.5: 256 or 512).", min=8)
    batch_size: int = opt(50, "Global batch per micro-step, split across processes (paper: 50).", min=1)
    grad_accum: int | None = opt(None, "Micro-batches per optimizer step (null: accelerate's "
                                 "gradient_accumulation_steps, 1 unless configured there).", min=1)
    max_steps: int = opt(1000, "Optimizer steps.", min=1)
    lr: float = opt(1e-4, "Learning rate (paper: 1e-4, Adam).", min=0, min_exclusive=True)
    adam_beta1: float = opt(0.9, "Adam beta1.", min=0, max=1, max_exclusive=True)
    adam_beta2: float = opt(0.999, "Adam beta2.", min=0, max=1, max_exclusive=True)
    weight_decay: float = opt(0.0, "Weight decay.", min=0)
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0: off).", min=0)
    lr_scheduler: str = opt("constant", "LR schedule after the warm-up.", choices=_lr_schedules)
    lr_warmup_steps: int = opt(50, "Warm-up steps.", min=0)
    drop_text_prob: float = opt(0.05, "P(drop only the text conditioning).", min=0, max=1)
    drop_image_prob: float = opt(0.05, "P(drop only the image conditioning).", min=0, max=1)
    drop_both_prob: float = opt(0.05, "P(drop both).", min=0, max=1)
    random_flip: bool = opt(False, "Horizontal flips; latents of both orientations are cached when on.")
    mixed_precision: str | None = opt(None, "Mixed precision: no, fp16 or bf16 (null: accelerate's, from `accelerate "
                                      "config` or `accelerate launch --mixed_precision`).", choices=_precisions)
    gradient_checkpointing: bool | None = opt(None, "U-Net gradient checkpointing (recomputes activations: about "
                                             "1/4 more U-Net FLOPs per step, far less memory). null: on only when "
                                             "a probe of the step says it would not fit in free GPU memory without "
                                             "(SD-1.5, 256 px, batch 50: 20.5 GB with it on an H200; "
                                             "bench/bench_gpu.py measures both); off on the CPU.")
    attention: str = opt("sdpa", "Attention implementation.", choices=choices("attention"))
    channels_last: bool = opt(False, "U-Net weights and activations in channels-last memory format (cuDNN's "
                              "native layout for fp16/bf16 convolutions; slower on the CPU).")
    compile: bool = opt(False, "torch.compile the U-Net's training step (1-2 minutes of compiling first; "
                        "validation and export use the plain U-Net).")
    tf32: bool = opt(True, "TF32 tensor cores for fp32 matmuls and convolutions on CUDA (what runs outside "
                     "mixed precision); no effect elsewhere.")
    use_ema: bool = opt(False, "Keep an EMA of the U-Net and save it.")
    ema_decay: float = opt(0.9999, "EMA decay (1 would never move the average).", min=0, max=1,
                             max_exclusive=True)
    ema_foreach: bool = opt(True, "Update the EMA with torch's multi-tensor (foreach) kernels: a few launches "
                            "instead of three per weight tensor, at the cost of one transient copy of the "
                            "trainable weights.")
    use_8bit_adam: bool = opt(False, "bitsandbytes 8-bit Adam (GPU).")
    fused_adam: bool = opt(True, "torch's fused Adam kernel (CPU and CUDA): one pass over all weights "
                           "instead of one per tensor; false = torch's default Adam.")
    lora_rank: int = opt(0, "LoRA rank through peft (0: full fine-tuning); conv_in is always trained fully.", min=0)
    checkpoint_every: int = opt(250, "Save a checkpoint every N steps.", min=1)
    checkpoints_keep: int = opt(3, "Checkpoints kept (oldest removed).", min=1)
    validate_every: int = opt(250, "Validation grid every N steps.", min=1)
    num_validation: int = opt(4, "Pairs shown in the validation grid.", min=1)
    validation_steps: int = opt(20, "Sampling steps for validation images.", min=1)
    validation_guidance_scale: float = opt(3.0, "Text guidance of validation images.", min=0)
    validation_image_guidance_scale: float = opt(1.5, "Image guidance of validation images.", min=0)
    prompt_from: str = opt("target", "Whose caption a pair's prompt uses (IP2P: the image to generate).",
                           choices=choices("prompt source"))
    conditioning: str = opt("caption", "What the U-Net reads through cross-attention: 'caption' (MVC: caption + "
                            "class prompt), or a variant of the supplement's Fig. 4: 'photo_index' (\"a photo i/n of "
                            "type <class>\"), 'image' (the image's embedding), 'image_direction' (E(target) - "
                            "E(condition)), 'caption_shape' (the caption and an edge map through a ControlNet branch "
                            "built from the U-Net); docs/conditioning.md. Generation follows the fine-tuned model's.",
                            choices=choices("conditioning"))
    log_every: int = opt(10, "Log scalars every N steps.", min=1)


@dataclass
class MixingConfig:
    """Mixing Visual Concepts: edits of the prompt embedding (generate_mvc.py)."""
    ops: list[str] = opt(["coarse", "fine"], "Operations cycled over the variants of each source.", min_len=1)
    coarse_mode: str = opt("shuffle", "Coarse op: permute tokens or swap them in from a donor.",
                           choices=choices("coarse mode"))
    coarse_stage: str = opt("tokens", "Where the coarse op runs: 'tokens' (token ids before the text encoder) or "
                            "'embeds' (its output; a shuffle there is invisible to the U-Net's cross-attention).",
                            choices=choices("mixing stage"))
    coarse_k: int = opt(4, "Token vectors chosen for the coarse op.", min=1)
    window: str | list[int] = opt("caption", "Token positions mixing may touch: 'caption' (the caption's tokens), "
                                  "'prompt' (every prompt token but BOS/EOS: caption and class prompt), 'all' (every "
                                  "position but BOS, padding too), or a fixed [start, end).")
    fine_m: int = opt(3, "Token vectors whose slice is replaced (fine op).", min=1)
    fine_s: int = opt(4, "Dimensions per slice (paper: < 10 of 768).", min=1)
    fine_source: str = opt("donor", "Where the fine slice comes from.", choices=choices("fine source"))
    fine_contiguous: bool = opt(True, "Contiguous slice (else scattered dimensions).")


@dataclass
class GenerateConfig:
    """Synthetic-set generation (generate_mvc.py), by any generator of the registry (`method`)."""
    method: str = opt("mvc", "Generator: a name of the registry mvc.generation.generators.GENERATORS, whose classes "
                      "say what each samples (docs/generators.md); only those that sample the fine-tuned model "
                      "need train_mvc.py first. Every one writes the same synthetic-set format.",
                      choices=_generators)
    model_dir: str | None = opt(None, "Fine-tuned pipeline folder of mvc / mvc_nomix (default: "
                                "<run.output_dir>/mvc/final); txt2img / img2img / textual_inversion sample model.base, "
                                "dreambooth its own <run.output_dir>/dreambooth/final.")
    out_dir: str | None = opt(None, "Output folder (default: <run.output_dir>/synthetic for mvc, "
                              "<run.output_dir>/synthetic_<method> for the others).")
    strength: float = opt(0.5, "img2img and textual_inversion: how far from the real image, in (0, 1] (DA-Fusion: 0.5; the thesis: "
                          "0.05-0.2); int(num_inference_steps x strength) denoising steps run, at least 1.",
                          min=0, max=1, min_exclusive=True)
    caption_from: str = opt("source", "mvc / mvc_nomix: whose caption a synthetic image's prompt starts from: "
                            "'source' (the condition image's own, as the paper generates) or 'target' (another "
                            "labelled image of the class, drawn once per source, as a training pair's target: "
                            "train.prompt_from is the training side).", choices=choices("caption source"))
    caption: bool = opt(False, "txt2img / img2img: prompt with the image's caption too (captions.prompt_template), "
                        "not the class prompt alone (the template without {caption}).")
    num_inference_steps: int = opt(20, "Sampling steps.", min=1)
    guidance_scale: float = opt(3.0, "Text guidance.", min=0, min_exclusive=True)
    image_guidance_scale: float = opt(1.5, "Image guidance.", min=0, min_exclusive=True)
    scheduler: str = opt("euler_ancestral", "Sampler.", choices=_samplers)
    multiplier: float | None = opt(4.0, "Synthetic images per class = multiplier x real count (or use per_class).", min=0, min_exclusive=True)
    per_class: int | None = opt(None, "Fixed synthetic images per class (overrides multiplier).", min=1)
    batch_size: int | None = opt(None, "Variants per pipeline call (each is 2-3 U-Net rows). null: on CUDA as many "
                                 "as free GPU memory holds (a probe of one image, at most 128), elsewhere 16.",
                                 min=1)
    dtype: str | None = opt(None, "Pipeline weights: fp16, bf16 or fp32 (null: fp16 on CUDA, fp32 elsewhere).",
                            choices=_dtypes)
    channels_last: bool = opt(False, "The U-Net in channels-last memory format (cuDNN's native layout for "
                              "fp16/bf16 convolutions; slower on the CPU).")
    compile: bool = opt(False, "torch.compile the pipeline's U-Net (1-2 minutes of compiling first, again for a "
                        "new batch shape).")
    tf32: bool = opt(True, "TF32 tensor cores for fp32 matmuls and convolutions on CUDA (generate.dtype=fp32); no "
                     "effect elsewhere.")
    grid_sources: int = opt(4, "Sources per class in the sample grid.", min=1)
    grid_dir: str | None = opt(None, "Sample grids + TensorBoard (default: <out_dir>_grids, beside the ImageFolder "
                                     "so that it holds class folders only).")
    resolution: int | None = opt(None, "Source images are resized to this before encoding (null: the model's size).", min=8)
    filter_checkpoint: str | None = opt(None, "Real-data classifier checkpoint used to filter synthetic images.")
    filter_threshold: float = opt(0.5, "Keep an image when the filter's confidence in its class >= this.", min=0, max=1)


@dataclass
class CurationConfig:
    """Curation of a synthetic set (mvc/curation.py): images a classifier of the labelled subset calls confidently
    wrong or too easy are dropped, and candidates are made until every class keeps its planned count."""
    filters: list[str] = opt([], "Filters: 'wrong' (assigned to another class with more confidence than a typical real "
                             "image of it gets), 'easy' (confidently right and a near copy of its source), 'semantic' "
                             "(a CLIP image-text match below the class's real images; needs clip_model); []: off. A "
                             "curated set goes to its own folder (`..._curated_easy_wrong`), its classifier runs are named "
                             "`...-curated_easy_wrong-seed<n>`.", choices=choices("curation filter"), unique=True)
    folds: int = opt(5, "Cross-fitted selectors: classifiers (the `classifier` recipe, strategy real) each trained on "
                     "the other folds of the labelled subset; an image is scored by the one that never saw its source.",
                     min=2)
    seed: int = opt(0, "Seed of the selectors' training.", **SEED)
    wrong_quantile: float = opt(0.5, "Per class c: this quantile of the out-of-fold confidence of correctly classified "
                                "real images of c; an image of another class assigned to c above it is wrong.",
                                min=0, max=1)
    easy_quantile: float = opt(0.75, "Per class: this quantile of the real images' own-class confidence; above it an "
                               "image is confidently right ...", min=0, max=1)
    copy_quantile: float = opt(0.25, "... and a near copy when closer to its source (cosine distance of the selector's "
                               "features) than this quantile of the class's real nearest-other distances.",
                               min=0, max=1)
    semantic_quantile: float = opt(0.1, "Per class: an image whose CLIP match to the class prompt is below this quantile "
                                   "of the real images' is dropped.", min=0, max=1)
    clip_model: str | None = opt(None, "CLIP for the semantic filter: a hub id (e.g. openai/clip-vit-base-patch32) or "
                                 "a local folder; null: none (the tiny profile has none offline).")
    max_factor: float = opt(3.0, "At most this many candidates per planned image of a class (a class that still "
                            "falls short keeps fewer, with a warning).", min=1)


TI_TEMPLATES = ["a photo of a {token}", "a picture of a {token}", "an image of a {token}", "a photo of the {token}",
                "a close-up photo of a {token}", "a cropped photo of the {token}", "a dark photo of a {token}",
                "a bright photo of a {token}"]


@dataclass
class TextualInversionConfig:
    """Textual inversion (generate.method=textual_inversion): one token embedding learned per class on the frozen
    base (DA-Fusion's recipe), written to <run.output_dir>/textual_inversion/ and reused while these keys stay."""
    steps: int = opt(2000, "Optimizer steps, all concepts together (may be raised later: training continues).", min=1)
    lr: float = opt(2e-3, "Adam learning rate of the learned vectors, constant (DA-Fusion and diffusers: 5e-4 times "
                    "the batch size).", min=0, min_exclusive=True)
    batch_size: int = opt(4, "Images per step; row r of step s trains concept (s * batch_size + r) mod C.", min=1)
    num_vectors: int = opt(1, "Embedding vectors per concept (DA-Fusion: 1); more add the tokens <t>_1, <t>_2, ... that "
                           "the pipelines expand <t> into.", min=1, max=16)
    initializer: str | None = opt(None, "Word whose first token's embedding every concept starts from (null: the "
                                  "concept's class name).")
    templates: list[str] = opt(TI_TEMPLATES, "Training prompts, one drawn per image; {token} is the concept's "
                               "placeholder (e.g. <mvc-class-3>).", min_len=1, unique=True)
    prompt: str = opt("a photo of a {token}", "Generation prompt, img2img from each real image with its class's "
                      "token (DA-Fusion: 'a photo of a {name}'); must hold {token}.")
    checkpoint_every: int = opt(500, "Save a checkpoint every N steps (and at the last).", min=1)
    checkpoints_keep: int = opt(2, "Checkpoints kept (oldest removed).", min=1)
    log_every: int = opt(25, "Log scalars every N steps.", min=1)


@dataclass
class DreamBoothConfig:
    """DreamBooth (generate.method=dreambooth, mvc/diffusion/dreambooth.py): ONE model fine-tuned for every class, one rare
    identifier per concept (a class by default), with prior preservation. The defaults suit the tiny profile;
    the full-profile configs set SD-1.5 values. Adam's betas, fused / 8-bit Adam, gradient clipping and the
    attention implementation are the train section's."""
    instance_prompt: str = opt("a photo of {identifier} {label}", "Prompt of a concept's images; must contain "
                               "{identifier} and {label}. The class prompt is this template without {identifier}.")
    identifiers: list[str] = opt([], "One rare identifier per concept, in concept order (the class order by "
                                 "default); []: generated, the same every run ('zqx', 'zqj', ...: strings of rare "
                                 "letters). Words without spaces or braces, distinct ignoring case.", unique=True)
    max_steps: int = opt(200, "Optimizer steps (SD-1.5: 800-1200).", min=1)
    batch_size: int = opt(16, "Instance images per step (as many class images join them under prior preservation).",
                          min=1)
    lr: float = opt(1e-3, "Learning rate (SD-1.5: 5e-6 full fine-tuning, 1e-4 LoRA).", min=0, min_exclusive=True)
    lr_scheduler: str = opt("constant", "LR schedule after the warm-up.", choices=_lr_schedules)
    lr_warmup_steps: int = opt(0, "Warm-up steps.", min=0)
    weight_decay: float = opt(0.0, "Adam weight decay.", min=0)
    prior_loss_weight: float = opt(1.0, "Weight of the class-image (prior-preservation) loss beside the instance "
                                   "loss (0: no prior preservation).", min=0)
    num_class_images: int = opt(10, "Class images per class, sampled once by the base from the class prompt and "
                                "cached (0: no prior preservation; SD-1.5: 100-200).", min=0)
    prior_steps: int = opt(20, "Sampling steps of the class images.", min=1)
    prior_guidance_scale: float = opt(3.0, "Text guidance of the class images.", min=0, min_exclusive=True)
    prior_scheduler: str = opt("euler_ancestral", "Sampler of the class images.", choices=_samplers)
    resolution: int | None = opt(None, "Training and class-image resolution (null: the base's native size; the "
                                 "synthetic set is sampled at it unless generate.resolution says otherwise).", min=8)
    train_text_encoder: bool = opt(True, "Train the text encoder too (fully; LoRA adapters on its attention when "
                                   "lora_rank > 0). On the tiny profile it lifts the reference's label fidelity of "
                                   "the set from 29% to 38% at 150 steps (its base never saw a class name).")
    lora_rank: int = opt(0, "LoRA rank through peft on the U-Net's attention projections (0: full fine-tuning).",
                         min=0)
    gradient_checkpointing: bool = opt(False, "U-Net gradient checkpointing.")
    checkpoint_every: int = opt(100, "Save a checkpoint every N steps (a later run resumes the newest).", min=1)
    checkpoints_keep: int = opt(2, "Checkpoints kept (oldest removed).", min=1)
    log_every: int = opt(10, "Log scalars every N steps.", min=1)


@dataclass
class ClassifierConfig:
    """Classifier training on real + synthetic data (train_classifier.py)."""
    backbone: str = opt("resnet18", "Any timm model name.")
    pretrained: bool = opt(False, "Load pretrained timm weights (needs the hub).")
    cifar_stem: bool = opt(True, "3x3 stride-1 stem without max-pool, for 32x32 inputs.")
    input_size: int | None = opt(32, "Input size (null: from the model's data config).", min=8)
    channels_last: bool = opt(True, "Weights in channels-last memory format (5-8% faster tiny-profile runs on CPU; cuDNN's "
                              "native layout).")
    strategy: str = opt("real", "Synthetic-data strategy from the registry.", choices=_strategies)
    synthetic_dir: str | None = opt(None, "Synthetic ImageFolder (default: the set generate.method writes, "
                                    "<run.output_dir>/synthetic for mvc). Runs on another generator's set are "
                                    "named after it (`<strategy>-<augment>-<backbone>-<method>-seed<n>`).")
    synthetic_ratio: float | None = opt(None, "Synthetic:real ratio used (null: all synthetic images).", min=0)
    two_phase_lr_scale: float = opt(0.1, "Phase-2 LR = this x LR.", min=0, min_exclusive=True)
    two_phase_fraction: float = opt(0.2, "Share of the step budget spent in phase 2 (real only).", min=0, max=1)
    prob_p: float = opt(0.8, "Probabilistic: P(a synthetic image joins the batch), per real image.", min=0, max=1)
    prob_mode: str = opt("append", "Probabilistic: 'append' (paper) or 'replace' (DA-Fusion).",
                         choices=choices("probabilistic mode"))
    augment: str = opt("standard", "Classic augmentation.", choices=choices("augmentation"))
    autoaugment_policy: str = opt("cifar10", "Dataset the AutoAugment / Fast AutoAugment policy was searched on "
                                  "(cifar10 for small images, imagenet for photos at 224 px).",
                                  choices=choices("autoaugment policy"))
    epochs: int = opt(30, "Budget in real-only epochs, used when `steps` is null: every strategy gets the "
                      "optimizer steps of this many epochs over the real images.", min=1)
    steps: int | None = opt(None, "Optimizer-step budget of every run (each strategy's epochs follow its epoch size, "
                                  "so strategies with more data are not given more training).", min=1)
    batch_size: int = opt(50, "Batch size (paper: 50; BatchNorm needs 2 or more).", min=2)
    optimizer: str = opt("adam", "Optimizer.", choices=choices("optimizer"))
    lr: float = opt(1e-3, "Learning rate.", min=0, min_exclusive=True)
    momentum: float = opt(0.9, "SGD momentum.", min=0, max=1)
    weight_decay: float = opt(0.0, "Weight decay.", min=0)
    scheduler: str = opt("cosine", "LR schedule.", choices=_lr_schedules)
    milestones: list[float] = opt([0.5, 0.75], "Multistep milestones as fractions of the epochs.", min=0, max=1)
    gamma: float = opt(0.1, "Multistep factor.", min=0, min_exclusive=True)
    label_smoothing: float = opt(0.0, "Label smoothing.", min=0, max=1)
    mixed_precision: str | None = opt(None, "Mixed precision: no, fp16 or bf16 (null: accelerate's).",
                                      choices=_precisions)
    probe: str = opt("none", "Feature probe on a frozen backbone instead of training ('none': train).",
                     choices=lambda: ["none", *choices("probe")()])
    kfold: int = opt(0, "Stratified k-fold on the labelled subset (0: use the test split).", min=0)
    seeds: list[int] = opt([0], "Seeds; several report mean +- std.", min_len=1, unique=True, **SEED)
    num_workers: int = opt(0, "DataLoader workers.", min=0)
    checkpoint_every: int = opt(1, "Save a checkpoint every N epochs.", min=1)
    eval_every: int = opt(1, "Evaluate every N epochs (0: only after the last epoch).", min=0)
    checkpoints_keep: int = opt(2, "Classifier checkpoints kept per run (oldest removed).", min=1)
    results_csv: str | None = opt(None, "Results CSV a row is appended to (default: <run.output_dir>/results.csv).")
    val_fraction: float = opt(0.0, "Labelled share held out (stratified) to pick the best epoch; 0: best is picked "
                              "on test accuracy (optimistic, flagged in metrics.json).", min=0, max=0.9)
    test_limit: int | None = opt(None, "Evaluate on a fixed class-balanced subset of at most N test images (null: all).",
                                 min=1)
    run_tag: str | None = opt(None, "A tag in the run folder's name before the seed (`...-<tag>-seed0`), so runs of "
                              "one strategy under other settings (e.g. a longer budget: run_pipeline.py names its "
                              "long runs `steps<N>`) keep folders of their own.")


@dataclass
class EvaluateConfig:
    """Synthetic-set evaluation (evaluate_synthetic.py, run_pipeline.py) and its reference classifier.

    The reference is trained once per dataset on its full training split (every label) and only
    judges synthetic images; it never trains, filters or selects anything."""
    reference_backbone: str = opt("mvc_refcnn", "timm name of the evaluation-only reference classifier.")
    reference_pretrained: bool = opt(False, "Start the reference from pretrained timm weights (needs the hub).")
    reference_input_size: int | None = opt(28, "Reference input size (null: from the model's data config).", min=8)
    reference_epochs: int = opt(3, "Reference training epochs over the full training split.", min=1)
    reference_batch_size: int = opt(128, "Reference batch size.", min=2)
    reference_lr: float = opt(2e-3, "Reference learning rate (Adam, cosine).", min=0, min_exclusive=True)
    reference_augment: str = opt("standard", "Reference augmentation.",
                                 choices=choices("augmentation"))
    reference_seed: int = opt(0, "Seed of the reference's training.", **SEED)
    reference_channels_last: bool = opt(True, "Reference weights in channels-last memory format (the small reference "
                                        "CNN trains 1.4x faster on CPU this way; cuDNN's native layout).")
    cache_dir: str = opt("outputs/cache/reference", "Where trained references are cached, keyed by dataset and settings.")
    real_limit: int | None = opt(2000, "Real test images (a fixed class-balanced subset) that diversity and the "
                                       "Fréchet distance compare with (null: all).", min=2)
    max_per_class: int = opt(400, "Images per class in the pairwise diversity (a random subset beyond).", min=2)
    cas: bool = opt(True, "Train classifiers on the synthetic set alone (CAS, classifier.* settings, pipeline.seeds).")
    real_curve: list[int] = opt([10, 20, 40, 80], "Labelled images per class of the real-only accuracy curve "
                                "(--real-curve): what a strategy's accuracy is worth in real images.", min=1, min_len=1, unique=True)
    batch_size: int = opt(256, "Images per batch when computing the reference's features.", min=1)


@dataclass
class PipelineConfig:
    """The end-to-end run (run_pipeline.py): which classifier baselines, how many seeds."""
    runs: list[str] = opt(["real", "real+randaugment", "concat", "two_phase", "probabilistic"],
                          "Classifier runs, each 'strategy' or 'strategy+augment'.", min_len=1, unique=True)
    seeds: list[int] = opt([0, 1, 2], "Classifier seeds; the report gives mean +- std over them.", min_len=1,
                            unique=True, **SEED)
    report: str = opt("results.md", "Report file name inside run.output_dir.")
    recipes: list[dict] = opt([], "Classifier recipes, each a mapping of classifier.* keys over the classifier "
                              "section plus a 'name' (e.g. {name: efficientnet_b0, backbone: efficientnet_b0, "
                              "optimizer: sgd}); every run of pipeline.runs is trained with each. []: the section as is.")
    generators: list[str] = opt(["mvc"], "Generators (generate.method) whose synthetic sets the pipeline makes, "
                                "evaluates (metrics and CAS) and trains on, e.g. [mvc, mvc_nomix, txt2img, img2img]: "
                                "one synthetic-set row and accuracy rows each. The first is the main set (every run "
                                "of pipeline.runs); each other gets the runs of pipeline.generator_runs, over the same "
                                "seeds. MVC is fine-tuned only when one of them needs it (mvc, mvc_nomix).",
                                choices=_generators, min_len=1, unique=True)
    generator_runs: list[str] = opt(["probabilistic", "two_phase"], "Classifier runs ('strategy' or "
                                    "'strategy+augment', each using synthetic images) trained on the set of every "
                                    "generator of pipeline.generators after the first.", min_len=1, unique=True)
    long_factor: int = opt(0, "Also train pipeline.long_runs with this many times the classifier's step budget (e.g. "
                           "5: more synthetic images may need more steps than the real ones alone); 0: no long runs.",
                           min=0)
    long_runs: list[str] = opt(["real+randaugment", "probabilistic"], "Runs trained at the long budget, each "
                               "'strategy[+augment][@generator]' (a run using synthetic images trains on the set of "
                               "@generator, one of pipeline.generators; default the first), over pipeline.seeds.",
                               min_len=1, unique=True)


@dataclass
class Config:
    """Every section; a YAML file sets any subset of them."""
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    captions: CaptionConfig = field(default_factory=CaptionConfig)
    tiny: TinyBaseConfig = field(default_factory=TinyBaseConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: FinetuneConfig = field(default_factory=FinetuneConfig)
    mixing: MixingConfig = field(default_factory=MixingConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    curation: CurationConfig = field(default_factory=CurationConfig)
    textual_inversion: TextualInversionConfig = field(default_factory=TextualInversionConfig)
    dreambooth: DreamBoothConfig = field(default_factory=DreamBoothConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def __post_init__(self):
        validate(self)
        check_combinations(self)


# Rules spanning keys that need a package's knowledge, checked in this order; each is registered under its key by
# the package that has it (`mvc.core.registry.config_rule`): the caption template by mvc.data.prompts, textual
# inversion's by mvc.diffusion.textual_inversion, the mixing window and ops by mvc.generation.mixing, DreamBooth's
# prompt and identifiers by mvc.diffusion.dreambooth, img2img's steps by mvc.generation.generators, the embedder
# by mvc.diffusion.clustering, the fine-tuned model's conditioning by mvc.diffusion.conditioning.
PACKAGE_RULES = ("captions.prompt_template", "textual_inversion.templates", "textual_inversion.prompt",
                 "mixing.window", "mixing.ops", "dreambooth.instance_prompt", "dreambooth.identifiers",
                 "textual_inversion.initializer", "generate.strength", "sampling.embedder", "train.conditioning")


def check_combinations(cfg: Config) -> None:
    """Rules that span several keys, or that a key's type and range cannot say (`validate` checks each
    key on its own); each is checked here, once, when the config is built, before any work starts."""
    t = cfg.train  # the three conditioning-dropout cases are disjoint: together at most certain
    p = t.drop_text_prob + t.drop_image_prob + t.drop_both_prob
    if p > 1.0 + 1e-9:
        raise MVCError(f"config keys train.drop_text_prob + train.drop_image_prob + train.drop_both_prob "
                       f"sum to {p:.3f} > 1")
    for key in PACKAGE_RULES:
        check, names_keys = config_rule_of(key)
        try:
            check(cfg)
        except MVCError as e:
            if names_keys:
                raise
            raise MVCError(f"config key {key}: {e}") from None
    cu = cfg.curation
    if "semantic" in cu.filters and not cu.clip_model:
        raise MVCError("config key curation.filters: 'semantic' needs a CLIP model and none is available here "
                       "(curation.clip_model is null); set it to a local CLIP folder or hub id, or drop 'semantic'")
    if cu.filters and cfg.generate.filter_checkpoint:
        raise MVCError("config keys curation.filters and generate.filter_checkpoint: use one way of filtering "
                       "(curation fits its thresholds per class and keeps the planned counts)")
    w = cfg.mixing.window
    if isinstance(w, list) and not 0 <= w[0] < w[1]:
        raise MVCError(f"config key mixing.window: [start, end) = {w} is not a non-empty range of token positions")
    _check_widths(cfg.tiny)


def _check_widths(tiny: TinyBaseConfig) -> None:
    """The tiny base's block widths: diffusers' GroupNorm uses min(32, smallest width) groups, so every width
    must be a multiple of it; each VAE block halves the image, which must stay at least 2 px."""
    for key, widths in (("tiny.vae_channels", tiny.vae_channels), ("tiny.unet_channels", tiny.unet_channels)):
        groups = min(32, min(widths))
        odd = [w for w in widths if w % groups]
        if odd:
            raise MVCError(f"config key {key}: widths {widths} must all be multiples of {groups} "
                           f"(the GroupNorm groups, min(32, smallest width)); {odd[0]} is not")
    factor = 2 ** (len(tiny.vae_channels) - 1)
    if tiny.image_size % factor or tiny.image_size // factor < 2:
        raise MVCError(f"config key tiny.image_size: {tiny.image_size} px must be a multiple of {factor} (the VAE's "
                       f"{len(tiny.vae_channels)} blocks halve it {len(tiny.vae_channels) - 1} times) and give "
                       "latents of at least 2 px")


#################################################################################
#                                 Validation                                    #
#################################################################################

def _type_ok(value: Any, tp: Any) -> bool:
    """True when `value` fits the annotation `tp` (int is accepted for float, bool is not an int)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, t) for t in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, args[0]) for v in value) if args else True
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def validate(cfg: Any, prefix: str = "") -> None:
    """Check types, choices, list lengths and ranges of every field of a (nested) config dataclass.

    Every float must be finite: `nan` compares false with any bound, so it would pass every range and then
    change the meaning of a run (no clipping, no guidance) or reach torch as a traceback."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        key = f"{prefix}{f.name}"
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, prefix=f"{key}.")
            continue
        tp = hints[f.name]
        if isinstance(value, str) and _type_ok(0.5, tp) and not _type_ok("s", tp):
            try:  # YAML 1.1 reads '1e-4' (no dot) as a string
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, int) and not isinstance(value, bool) and tp is float:
            value = float(value)
        setattr(cfg, f.name, value)
        if not _type_ok(value, tp):
            raise MVCError(f"config key {key}: expected {_type_name(tp)}, got {short_repr(value)} "
                           f"({type(value).__name__})")
        m = f.metadata
        choices = m.get("choices")
        if choices is not None and value is not None:  # a list's choices are its items'
            allowed = choices() if callable(choices) else choices
            for v in value if isinstance(value, list) else [value]:
                if v not in allowed:
                    raise MVCError(f"config key {key}: unknown value {short_repr(v)}; choose one of "
                                   f"{', '.join(map(str, allowed))}")
        if isinstance(value, list):
            if m.get("min_len") and len(value) < m["min_len"]:
                raise MVCError(f"config key {key}: needs at least {m['min_len']} value(s), got {short_repr(value)}")
            if m.get("unique") and len(set(map(str, value))) < len(value):
                raise MVCError(f"config key {key}: {short_repr(value)} repeats a value; give each once")
        nums = value if isinstance(value, list) else [value]
        for v in nums:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                _check_range(key, v, m)


def _check_range(key: str, v: float, m: dict) -> None:
    """One number against a field's range (and, for a float, finiteness)."""
    if isinstance(v, float) and not math.isfinite(v):
        raise MVCError(f"config key {key}: {v!r} is not a finite number")
    lo, hi = m.get("min"), m.get("max")
    if lo is not None and (v < lo or (m.get("min_exclusive") and v <= lo)):
        op = ">" if m.get("min_exclusive") else ">="
        raise MVCError(f"config key {key}: {v!r} is out of range; it must be {op} {lo}")
    if hi is not None and (v > hi or (m.get("max_exclusive") and v >= hi)):
        op = "<" if m.get("max_exclusive") else "<="
        raise MVCError(f"config key {key}: {v!r} is out of range; it must be {op} {hi}")


#################################################################################
#                         YAML files and CLI overrides                          #
#################################################################################

def _set_key(tree: dict, dotted: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict, checking each level against the Config dataclasses."""
    parts = dotted.split(".")
    cls: Any = Config
    node = tree
    for i, p in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(cls)}
        if p not in names:
            where = ".".join(parts[:i]) or "top level"
            raise MVCError(f"unknown config key {short_repr(dotted)}: {where} has {', '.join(names)}")
        sub = typing.get_type_hints(cls)[p]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(sub):  # a whole section: a mapping of its keys, or null for its defaults
                if value is not None and not isinstance(value, dict):
                    raise MVCError(f"config section {dotted}: expected a mapping of its keys (or nothing, for the "
                                   f"defaults), got {short_repr(value)}")
                node.setdefault(p, {})
                for key, v in _flatten(value or {}):
                    _set_key(tree, f"{dotted}.{key}", v)
                return
            node[p] = value
            return
        if not dataclasses.is_dataclass(sub):
            raise MVCError(f"unknown config key {short_repr(dotted)}: {'.'.join(parts[:i + 1])} is not a section")
        cls = sub
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise MVCError(f"config key {'.'.join(parts[:i + 1])}: expected a mapping")


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        # a dict value is a section only if the key names one; otherwise it is a (wrong-typed) value
        out.extend(_flatten(v, key + ".") if isinstance(v, dict) and v else [(key, v)])
    return out


def _build(cls: Any, tree: dict) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in tree:
            v = tree[f.name]
            kwargs[f.name] = _build(hints[f.name], v) if dataclasses.is_dataclass(hints[f.name]) else v
    obj = cls.__new__(cls)
    defaults = cls.__dataclass_fields__
    for name, f in defaults.items():
        if name in kwargs:
            setattr(obj, name, kwargs[name])
        elif f.default is not dataclasses.MISSING:
            setattr(obj, name, f.default)
        else:
            setattr(obj, name, f.default_factory())
    return obj


MAX_CONFIG_BYTES = 1 << 20  # a config is a page of settings; a larger file is a mistake (or hostile)
MAX_CONFIG_NODES = 100_000  # YAML nodes after expanding aliases (a few hundred bytes can expand to billions)


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses duplicate keys (YAML says they are an error; PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise MVCError(f"duplicate key {short_repr(key)} on lines {seen[key] + 1} and "
                               f"{key_node.start_mark.line + 1}; give each key once")
            if isinstance(key, typing.Hashable):
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many nodes `node` stands for once every alias is expanded (an alias is the same node object,
    so this is a count over a graph, cheap even when the expansion is not)."""
    if id(node) not in memo:
        memo[id(node)] = 1  # a recursive alias counts once
        if isinstance(node, yaml.SequenceNode):
            memo[id(node)] = 1 + sum(_expanded_size(n, memo) for n in node.value)
        elif isinstance(node, yaml.MappingNode):
            memo[id(node)] = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    return min(memo[id(node)], 10 * MAX_CONFIG_NODES)


def _parse_yaml(text: str) -> Any:
    """YAML text -> Python values (safe types only), refusing duplicate keys, alias blow-up and deep
    nesting (MVCError)."""
    loader = _ConfigLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_CONFIG_NODES:
            raise MVCError(f"it expands (through YAML aliases) to more than {MAX_CONFIG_NODES} values; "
                           "write the settings out")
        return loader.construct_document(node)
    except RecursionError:  # PyYAML composes and constructs recursively
        raise MVCError("it nests lists or mappings too deeply") from None
    finally:
        loader.dispose()


def _yaml_problem(e: yaml.YAMLError) -> str:
    """What PyYAML found wrong, and where (its message's first line is only the context)."""
    problem = getattr(e, "problem", None)
    mark = getattr(e, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem[:120]} at line {mark.line + 1}, column {mark.column + 1}"
    return short_repr(str(e).splitlines()[0] if str(e) else type(e).__name__, 200)


def load_yaml(path: str | Path) -> dict:
    """Read a YAML config file into a dict, with a one-line error for a file that is missing, not a
    regular file, too large, not UTF-8, empty, malformed, alias-bombed or has duplicate keys."""
    p = Path(path)
    if not p.exists():
        raise MVCError(f"config file not found: {p}")
    if not p.is_file():  # a folder, or a FIFO/device whose reading could block forever
        raise MVCError(f"config file {str(p)!r} is not a regular file")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise MVCError(f"config file {p} is {p.stat().st_size} bytes; a config is at most {MAX_CONFIG_BYTES} bytes")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise MVCError(f"config file {p} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    try:
        data = _parse_yaml(text)
    except yaml.YAMLError as e:
        raise MVCError(f"{p}: not valid YAML ({_yaml_problem(e)})") from None
    except MVCError as e:
        raise MVCError(f"{p}: {e}") from None
    if data is None:
        raise MVCError(f"config file {p} is empty (or only comments); give its sections, or leave out --config "
                       "for the defaults")
    if not isinstance(data, dict):
        raise MVCError(f"{p}: the top level must be a mapping of sections")
    return data


def make_config(tree: dict | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Build a validated `Config` from a nested dict plus dotted overrides."""
    merged: dict = {}
    for key, value in _flatten(tree or {}):
        _set_key(merged, key, value)
    for key, value in (overrides or {}).items():
        _set_key(merged, key, value)
    cfg = _build(Config, merged)
    validate(cfg)
    check_combinations(cfg)
    return cfg


def parse_value(text: str) -> Any:
    """Parse a CLI value as YAML (so numbers, booleans, null and lists work)."""
    try:
        return _parse_yaml(text)
    except yaml.YAMLError:
        return text
    except MVCError as e:
        raise MVCError(f"command-line value {short_repr(text)}: {e}") from None


def config_help() -> str:
    """Every config key with its type, default and help, for `--help`."""
    lines = ["config keys (override with --section.key=value):"]
    for sf in dataclasses.fields(Config):
        section = typing.get_type_hints(Config)[sf.name]
        hints = typing.get_type_hints(section)
        lines.append(f"  [{sf.name}] {section.__doc__}")
        for f in dataclasses.fields(section):
            d = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            options = f.metadata.get("choices")
            options = f" Choices: {', '.join(map(str, options() if callable(options) else options))}." if options else ""
            lines.append(f"    --{sf.name}.{f.name}  ({_type_name(hints[f.name])}, default {d!r}): "
                         f"{f.metadata.get('help', '')}{options}")
    return "\n".join(lines)


class CLIParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are `MVCError`s, so `run_cli` prints them as one `error:` line
    (argparse's own handler prints the usage block and `prog: error: ...` instead)."""

    def error(self, message: str):
        raise MVCError(f"{message} (see {self.prog} --help)")


def build_parser(description: str) -> argparse.ArgumentParser:
    """The common parser of the three scripts: --config plus the config keys listed in the epilog."""
    p = CLIParser(description=description, epilog=config_help(),
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config file (e.g. configs/tiny.yaml).")
    return p


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None,
               shortcuts: dict[str, str] | None = None) -> tuple[Config, argparse.Namespace]:
    """Parse script flags plus `--section.key=value` overrides into (Config, namespace).

    `shortcuts` maps a script flag's dest to a config key (e.g. {'strategy': 'classifier.strategy'})
    so that the flag, when given, overrides the key.
    """
    args, rest = parser.parse_known_args(argv)
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(rest):
        tok = rest[i]
        if not tok.startswith("--") or tok == "--":
            raise MVCError(f"unexpected argument {tok!r}; config overrides look like --section.key=value")
        if "." not in tok[2:].split("=", 1)[0]:  # before asking for its value: `--bogus` is unknown, not valueless
            raise MVCError(f"unknown option {tok.split('=', 1)[0]}; see --help")
        if "=" in tok:
            key, text = tok[2:].split("=", 1)
        else:
            key = tok[2:]
            if i + 1 >= len(rest) or rest[i + 1].startswith("--"):
                raise MVCError(f"--{key} needs a value (--{key}=VALUE)")
            i += 1
            text = rest[i]
        if "." not in key:
            raise MVCError(f"unknown option --{key}; see --help")
        overrides[key] = parse_value(text)
        i += 1
    for dest, key in (shortcuts or {}).items():
        v = getattr(args, dest, None)
        if v is not None:
            overrides[key] = v
    tree = load_yaml(args.config) if args.config else {}
    return make_config(tree, overrides), args


def config_to_dict(cfg: Any) -> dict:
    """The config as a plain nested dict."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically) next to a run's outputs."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
