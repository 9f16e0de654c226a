"""One way to prepare Stable Diffusion inputs: training caches, generation and the diffusers pipeline agree,
also when images must be resized (28-px images at resolution 32, as in the tiny profile)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mvc.core.config import TinyBaseConfig
from mvc.data import ArraySource, ImageDataset
from mvc.diffusion import sd_io

TINY = TinyBaseConfig(image_size=32, vae_channels=[8, 16, 16], unet_channels=[16, 32], text_hidden=32,
                      text_layers=1, max_length=16)


@pytest.fixture(scope="module")
def components():
    from mvc.diffusion.tiny import build_tiny_components

    torch.manual_seed(0)
    return build_tiny_components(TINY, ["coat"], in_channels=8)


@pytest.fixture(scope="module")
def dataset():
    """Six 28x28 grey images (Fashion-MNIST's size) with sharp edges, so the resize filter matters."""
    rng = np.random.default_rng(0)
    arr = np.zeros((6, 28, 28), np.uint8)
    for i in range(6):
        y, x = rng.integers(2, 14, 2)
        arr[i, y:y + 12, x:x + 9] = 255
        arr[i] += rng.integers(0, 30, (28, 28)).astype(np.uint8)
    return ImageDataset("toy", "train", ["coat"], [0] * 6, [f"t/{i}" for i in range(6)], ArraySource(arr))


def test_resize_is_the_pipeline_image_processor(dataset):
    from diffusers.image_processor import VaeImageProcessor

    im = dataset.load_image(0)
    ours = sd_io.images_to_tensor([im], 32)  # (1, 3, 32, 32)
    theirs = VaeImageProcessor(vae_scale_factor=8).preprocess(im, height=32, width=32)
    assert ours.shape == (1, 3, 32, 32) and torch.equal(ours, theirs)
    # the uint8 path (tiny-base pretraining) gives the same values
    assert torch.equal(sd_io.uint8_to_model(sd_io.images_to_uint8([im], 32)), ours)
    # and it is not the bilinear resize the fine-tuning cache used before (the resize matters here)
    bilinear = torch.from_numpy(np.asarray(im.resize((32, 32), Image.BILINEAR), np.float32)).permute(2, 0, 1) / 127.5 - 1
    assert (bilinear - ours[0]).abs().max() > 0.05


def test_condition_latents_agree_between_training_generation_and_the_pipeline(components, dataset):
    """The condition latent of the fine-tuning cache == what generation computes == what
    StableDiffusionInstructPix2PixPipeline feeds its U-Net, for 28-px images at resolution 32."""
    from mvc.diffusion.finetune import encode_latents_cache
    from mvc.diffusion.models import ip2p_pipeline

    vae = components["vae"]
    cache = encode_latents_cache(vae, dataset, 32, show_progress=False)  # (N, 1, 4, 8, 8)
    train = cache.mean[:, 0]
    images = [dataset.load_image(i) for i in range(len(dataset))]
    gen = sd_io.encode_conditions(vae, images, 32)
    assert gen.shape == train.shape == (6, 4, 8, 8)
    torch.testing.assert_close(gen, train, rtol=0, atol=1e-6)

    # the pipeline itself, given the image at the model's resolution: record the U-Net's input
    pipe = ip2p_pipeline(components, components["unet"])
    seen = {}
    orig = pipe.unet.forward

    def record(x, t, encoder_hidden_states=None, **kw):
        seen.setdefault("x", x.clone())
        return orig(x, t, encoder_hidden_states=encoder_hidden_states, **kw)

    pipe.unet.forward = record
    try:
        for i in (0, 3):
            seen.clear()
            pipe(prompt="a coat", image=sd_io.resize(images[i], 32), num_inference_steps=1,
                 generator=torch.Generator().manual_seed(0))
            # chunks: [text + image, image only, none]; channels 4: are the condition latent
            torch.testing.assert_close(seen["x"][0, 4:], train[i], rtol=0, atol=1e-4)  # batch of 1 vs 6: rounding
            # and its image processor, handed the 28-px image with the target size, resizes the same way
            x = pipe.image_processor.preprocess(images[i], height=32, width=32)
            torch.testing.assert_close(pipe.vae.encode(x).latent_dist.mode()[0], train[i], rtol=0, atol=1e-4)
    finally:
        pipe.unet.forward = orig


def test_prompts_encode_as_the_pipeline_does(components):
    from mvc.diffusion.models import ip2p_pipeline

    pipe = ip2p_pipeline(components, components["unet"])
    prompts = ["a dark small coat", ""]
    ours = sd_io.encode_prompts(components["tokenizer"], components["text_encoder"], prompts)
    theirs = pipe._encode_prompt(prompts, "cpu", 1, False)  # (2, T, D)
    torch.testing.assert_close(ours, theirs)
    ids, mask = sd_io.tokenize(components["tokenizer"], prompts)
    assert ids.shape == mask.shape == (2, 16) and mask[1].sum() < mask[0].sum()
