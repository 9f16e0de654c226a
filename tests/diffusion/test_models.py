"""Base-model loading (text-to-image and InstructPix2Pix folders, errors) and the conv_in surgery."""


import pytest
import torch

from mvc.core.config import TinyBaseConfig, make_config
from mvc.core.utils import MVCError
from mvc.diffusion.inputs import load_base
from mvc.diffusion.models import load_pipeline_components, widen_conv_in
from mvc.diffusion.tiny import build_tiny_components


def micro_cfg():
    return TinyBaseConfig(image_size=16, vae_channels=[8, 16], unet_channels=[16, 32], text_hidden=16,
                          text_layers=1, max_length=16)


def unet_out(unet, x, ehs):
    with torch.no_grad():
        return unet(x, torch.tensor([10]), encoder_hidden_states=ehs).sample


#################################################################################
#                                conv_in surgery                                #
#################################################################################

def test_widen_conv_in_keeps_the_base_and_zero_inits_the_new_channels():
    torch.manual_seed(0)
    unet = build_tiny_components(micro_cfg())["unet"].eval()
    old_w, old_b = unet.conv_in.weight.detach().clone(), unet.conv_in.bias.detach().clone()
    x = torch.randn(1, 4, 8, 8)
    ehs = torch.randn(1, 16, 16)
    before = unet_out(unet, x, ehs)
    assert widen_conv_in(unet) is unet
    assert unet.conv_in.in_channels == 8 and unet.config.in_channels == 8
    assert torch.equal(unet.conv_in.weight[:, :4], old_w) and torch.equal(unet.conv_in.bias, old_b)
    assert torch.count_nonzero(unet.conv_in.weight[:, 4:]) == 0
    # zeros in the condition channels: exactly the base's prediction
    torch.testing.assert_close(unet_out(unet, torch.cat([x, torch.zeros_like(x)], 1), ehs), before)
    # a non-zero condition does not change the output until the new weights are trained
    assert torch.allclose(unet_out(unet, torch.cat([x, torch.randn_like(x)], 1), ehs), before)
    # the new weights are trainable parameters of the U-Net
    assert any(p is unet.conv_in.weight for p in unet.parameters()) and unet.conv_in.weight.requires_grad


def test_widen_conv_in_skips_an_instructpix2pix_unet_and_rejects_other_counts():
    unet = build_tiny_components(micro_cfg(), in_channels=8)["unet"]
    conv = unet.conv_in
    widen_conv_in(unet)
    assert unet.conv_in is conv
    odd = build_tiny_components(micro_cfg(), in_channels=3)["unet"]
    with pytest.raises(MVCError, match="3 input channels"):
        widen_conv_in(odd)


@pytest.mark.slow
def test_sd15_unet_shape_takes_the_surgery_and_a_forward():
    from mvc.diffusion.models import build_sd15_shape

    torch.manual_seed(0)
    unet = build_sd15_shape(("unet",))["unet"].eval()
    assert 8.5e8 < sum(p.numel() for p in unet.parameters()) < 8.7e8  # SD-1.5: 859.5M
    widen_conv_in(unet)
    assert unet.conv_in.weight.shape == (320, 8, 3, 3) and unet.config.in_channels == 8
    x = torch.randn(1, 8, 16, 16)  # noisy latent + condition latent at a small latent size (3 downsamplings)
    ehs = torch.randn(1, 77, 768)  # CLIP ViT-L/14 text embedding, as SD-1.5
    with torch.no_grad():
        out = unet(x, torch.tensor([500]), encoder_hidden_states=ehs).sample
    assert out.shape == (1, 4, 16, 16) and torch.isfinite(out).all()


#################################################################################
#                                  Loading                                      #
#################################################################################

def _save_pipeline(folder, in_channels=4):
    from diffusers import StableDiffusionInstructPix2PixPipeline, StableDiffusionPipeline

    torch.manual_seed(0)
    c = build_tiny_components(micro_cfg(), in_channels=in_channels)
    cls = StableDiffusionPipeline if in_channels == 4 else StableDiffusionInstructPix2PixPipeline
    cls(**c, safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)
    return c


@pytest.mark.parametrize("in_channels", [4, 8])
def test_load_pipeline_components_from_a_local_folder(tmp_path, in_channels):
    from diffusers import DDPMScheduler

    saved = _save_pipeline(tmp_path / "base", in_channels)
    comps = load_pipeline_components(str(tmp_path / "base"))
    assert set(comps) == {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    assert isinstance(comps["scheduler"], DDPMScheduler)
    assert comps["unet"].config.in_channels == in_channels
    for name in ("unet", "vae", "text_encoder"):
        a, b = saved[name].state_dict(), comps[name].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert comps["tokenizer"]("a dark object").input_ids == saved["tokenizer"]("a dark object").input_ids
    widen_conv_in(comps["unet"])
    assert comps["unet"].conv_in.in_channels == 8


def test_load_pipeline_components_errors_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(MVCError, match="no folder"):
        load_pipeline_components(str(tmp_path / "missing"))
    (tmp_path / "half" / "unet").mkdir(parents=True)
    with pytest.raises(MVCError, match="not a diffusers pipeline folder"):
        load_pipeline_components(str(tmp_path / "half"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MVCError, match="cannot load the base pipeline") as e:
        load_pipeline_components("nobody-here/no-such-pipeline-xyz")
    assert "\n" not in str(e.value)
    with pytest.raises(MVCError, match="remainder pool"):
        load_base(make_config(overrides={"model.base": "tiny"}), None, tmp_path)
