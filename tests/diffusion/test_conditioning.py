"""The conditioning variants of the supplement's Fig. 4 (train.conditioning): what fine-tuning and generation feed
the U-Net's cross-attention, and that both sides agree."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import mvc.generation.generate as gen
import mvc.generation.generators as generators
from mvc.core.config import TinyBaseConfig, make_config
from mvc.core.utils import MVCError, read_jsonl
from mvc.data import ArraySource, ImageDataset
from mvc.diffusion.conditioning import (
    ImageContexts,
    image_contexts,
    image_tokens,
    lift_matrix,
    photo_index_captions,
    token_grid,
)
from mvc.diffusion.finetune import draw_step_noise, encode_latents_cache, encode_prompts_cache, gather_batch
from tests.diffusion.test_finetune import ToyDataset, build_components, run_finetune
from tests.helpers import write_random_ip2p

TINY = dict(image_size=16, vae_channels=[16, 32], unet_channels=[32, 64], text_hidden=32, text_layers=1, max_length=16)


def labelled_set(n: int = 6) -> ImageDataset:
    """`n` random 16x16 grey images in two classes (3 + 3)."""
    images = np.random.default_rng(1).integers(0, 255, (n, 16, 16), dtype=np.uint8)
    return ImageDataset("toy", "train", ["coat", "bag"], [i % 2 for i in range(n)], [f"train/{i}" for i in range(n)],
                        ArraySource(images))


#################################################################################
#                                  The pieces                                   #
#################################################################################

def test_photo_index_numbers_each_image_within_its_class():
    ds = labelled_set(7)  # coat: 0, 2, 4, 6; bag: 1, 3, 5
    caps = photo_index_captions(ds)
    assert [caps[f"train/{i}"] for i in (0, 2, 4, 6)] == ["1/4", "2/4", "3/4", "4/4"]
    assert [caps[f"train/{i}"] for i in (1, 3, 5)] == ["1/3", "2/3", "3/3"]


def test_image_tokens_pool_lift_and_keep_the_latent_scale():
    lift = lift_matrix(4, 32)
    assert torch.allclose(lift @ lift.T, torch.eye(4) * 8, atol=1e-5)  # orthonormal rows times sqrt(D / C)
    assert torch.equal(lift, lift_matrix(4, 32))  # fixed: training and generation use the same map
    mean = torch.randn(3, 4, 8, 8)
    tok = image_tokens(mean, 0.5, 4, 32)
    assert tok.shape == (3, 16, 32)
    pooled = torch.nn.functional.avg_pool2d(mean * 0.5, 2).flatten(2).transpose(1, 2)  # (3, 16, 4)
    assert torch.allclose(tok @ lift.T / 8, pooled, atol=1e-5)  # the lift loses nothing
    assert token_grid(8, 16) == 3 and token_grid(2, 77) == 2  # g*g fits between BOS and the end, at most the latent
    with pytest.raises(MVCError, match="context positions"):
        token_grid(8, 2)


def test_image_contexts_put_the_tokens_after_bos_in_the_empty_prompt():
    empty = torch.randn(10, 32)
    tok = torch.randn(2, 4, 32)
    ctx = image_contexts(tok, empty)
    assert ctx.shape == (2, 10, 32)
    assert torch.equal(ctx[:, 1:5], tok) and torch.equal(ctx[:, 0], empty[0].expand(2, -1))
    assert torch.equal(ctx[:, 5:], empty[5:].expand(2, -1, -1))
    with pytest.raises(MVCError, match="do not fit"):
        image_contexts(torch.randn(1, 10, 32), empty)


def test_a_pair_reads_its_target_or_the_direction_from_its_condition():
    mean = torch.randn(5, 1, 4, 8, 8)  # (N, F, C, h, w)
    empty = torch.zeros(16, 32)
    img = ImageContexts.build(mean, 1.0, empty, direction=False)
    drc = ImageContexts.build(mean, 1.0, empty, direction=True)
    c, t, f = torch.tensor([0, 3]), torch.tensor([1, 2]), torch.zeros(2, dtype=torch.long)
    assert img.grid == 3 and img.tokens.shape == (5, 1, 9, 32)
    assert torch.equal(img.lookup(c, t, f), image_contexts(img.tokens[t, 0], empty))
    assert torch.allclose(drc.lookup(c, t, f)[:, 1:10], img.tokens[t, 0] - img.tokens[c, 0])
    assert torch.allclose(drc.lookup(t, c, f), -drc.lookup(c, t, f))  # swapped pair: the opposite direction


#################################################################################
#                          Fine-tuning with each variant                        #
#################################################################################

@pytest.fixture(scope="module")
def components():
    return build_components()


def test_training_with_an_image_conditioning_feeds_the_targets_embedding(components):
    comps = components
    ds = ToyDataset()
    lat = encode_latents_cache(comps["vae"], ds, 16, show_progress=False)
    txt = encode_prompts_cache(comps["tokenizer"], comps["text_encoder"], [""] * len(ds), show_progress=False)
    img = ImageContexts.build(lat.mean, lat.scaling_factor, txt.empty, direction=False)
    rnd = draw_step_noise(2, tuple(lat.mean.shape[2:]), 1000, False, 0, 0, 0, torch.Generator().manual_seed(0))
    rnd.keep_text = torch.tensor([True, False])
    c, t = torch.tensor([0, 0]), torch.tensor([4, 4])
    emb = gather_batch(lat, txt, c, t, t, rnd, img)["text_embeds"]
    expect = image_contexts(image_tokens(lat.mean[[4], 0], lat.scaling_factor, img.grid, 32), txt.empty)[0]
    assert torch.allclose(emb[0], expect, atol=1e-6)
    assert torch.equal(emb[1], txt.empty)  # a dropped condition is the empty prompt, as for text


@pytest.mark.parametrize("kind", ["photo_index", "image", "image_direction"])
def test_each_variant_fine_tunes_records_itself_and_refuses_to_resume_as_another(tmp_path, components, kind):
    embeds = {"mixing.coarse_stage": "embeds"}  # image tokens have no ids for the coarse op to edit
    res, _ = run_finetune(tmp_path, components, conditioning=kind, max_steps=3, checkpoint_every=3, extra=embeds)
    assert np.isfinite(res["losses"]).all()
    info = json.loads((tmp_path / "mvc" / "final" / "mvc_training.json").read_text())
    assert info["conditioning"] == kind
    assert ("image_grid" in info) == kind.startswith("image")
    with pytest.raises(MVCError):  # the checkpoint was trained with another conditioning
        run_finetune(tmp_path, components, conditioning="caption", max_steps=4, checkpoint_every=3,
                     resume="latest")


#################################################################################
#                        Generation follows the model                           #
#################################################################################

@pytest.fixture(scope="module")
def model_of(tmp_path_factory):
    """A random tiny IP2P folder per conditioning, recorded in its mvc_training.json as fine-tuning records it."""
    def make(kind: str):
        path = write_random_ip2p(tmp_path_factory.mktemp(kind) / "final", TinyBaseConfig(**TINY), ["coat", "bag"])
        info = {"resolution": 16, "conditioning": kind, **({"image_grid": 3} if kind.startswith("image") else {})}
        (path / "mvc_training.json").write_text(json.dumps(info))
        return path
    return make


def generate(tmp_path, model_dir, method="mvc", **over):
    cfg = make_config(overrides={"run.output_dir": str(tmp_path), "generate.model_dir": str(model_dir),
                                 "generate.method": method, "generate.num_inference_steps": 1,
                                 "generate.per_class": 3, "generate.batch_size": 3, "mixing.coarse_k": 2,
                                 "mixing.fine_m": 2, "mixing.fine_s": 2, **over})
    return cfg, gen.generate_synthetic(cfg, labelled=labelled_set(), progress=False)


def test_an_image_model_generates_from_each_sources_own_embedding_without_captions(tmp_path, model_of, monkeypatch):
    from mvc.diffusion.models import load_ip2p_pipeline
    from mvc.diffusion.sd_io import encode_conditions, encode_prompts

    seen = []
    real = generators.render
    monkeypatch.setattr(generators, "render",
                        lambda pipe, emb, *a, **k: seen.append(emb.clone()) or real(pipe, emb, *a, **k))
    model = model_of("image")
    cfg, summary = generate(tmp_path, model, method="mvc_nomix")  # unmixed: the embedding itself
    assert summary["images"] == 6
    recs = read_jsonl(tmp_path / "synthetic_mvc_nomix" / "metadata.jsonl")
    assert all(r["conditioning"] == "image" and r["caption"] == "" for r in recs)
    # the context of source 0 is what training feeds for a pair whose target is image 0
    pipe = load_ip2p_pipeline(model, "euler_ancestral")
    ds = labelled_set()
    lat = encode_conditions(pipe.vae, [ds.load_image(0)], 16)
    empty = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""])[0]
    expect = image_contexts(image_tokens(lat, pipe.vae.config.scaling_factor, 3, 32), empty)[0]
    assert any(torch.allclose(e, expect, atol=1e-5) for batch in seen for e in batch)
    assert not any(torch.allclose(e, seen[0][0], atol=1e-3) for e in seen[-1])  # another class, other embeddings


def test_a_direction_model_records_each_partner_and_mixes_in_the_embedding_stage(tmp_path, model_of):
    model = model_of("image_direction")
    with pytest.raises(MVCError, match="coarse_stage=embeds"):  # image tokens have no ids to shuffle
        generate(tmp_path, model)
    cfg, summary = generate(tmp_path, model, **{"mixing.coarse_stage": "embeds", "mixing.coarse_mode": "swap"})
    assert summary["images"] == 6
    recs = read_jsonl(tmp_path / "synthetic" / "metadata.jsonl")
    assert all(r["conditioning"] == "image_direction" and r["partner_id"] != r["source_id"] for r in recs)
    classes = {f"train/{i}": i % 2 for i in range(6)}
    assert all(classes[r["partner_id"]] == classes[r["source_id"]] for r in recs)  # a partner of the same class


def test_a_photo_index_model_prompts_with_each_images_number(tmp_path, model_of):
    cfg, summary = generate(tmp_path, model_of("photo_index"), method="mvc_nomix")
    recs = read_jsonl(tmp_path / "synthetic_mvc_nomix" / "metadata.jsonl")
    assert summary["images"] == 6 and {r["caption"] for r in recs} <= {"1/3", "2/3", "3/3"}
    assert all(r["conditioning"] == "photo_index" for r in recs)


def test_the_conditioning_is_a_config_choice_checked_in_one_line():
    with pytest.raises(MVCError, match="train.conditioning"):
        make_config(overrides={"train.conditioning": "clip_image"})
    with pytest.raises(MVCError, match="train.lora_rank=0"):
        make_config(overrides={"train.conditioning": "caption_shape", "train.lora_rank": 4})
    with pytest.raises(MVCError, match="mixing.coarse_stage=embeds"):  # refused before fine-tuning, not after
        make_config(overrides={"train.conditioning": "image", "mixing.ops": ["coarse+fine"]})
    make_config(overrides={"train.conditioning": "image", "mixing.ops": ["fine"]})  # no coarse op: nothing to refuse
    make_config(overrides={"train.conditioning": "image_direction", "mixing.coarse_stage": "embeds"})
    assert SimpleNamespace(**{"c": make_config().train.conditioning}).c == "caption"  # MVC's by default


#################################################################################
#                         The shape condition (ControlNet)                      #
#################################################################################

def test_shape_maps_mark_edges_and_are_blank_on_a_flat_image():
    from mvc.diffusion.conditioning import shape_maps

    x = -torch.ones(2, 3, 16, 16)
    x[0, :, 4:12, 4:12] = 1.0  # a bright square on the first image, the second flat
    m = shape_maps(x)
    assert m.shape == (2, 1, 16, 16) and float(m.max()) == pytest.approx(1.0)
    assert float(m[0, 0, 8, 8]) == 0 and float(m[0, 0, 4, 8]) > 0.5  # inside flat, on the border an edge
    assert float(m[1].abs().max()) == 0
    assert torch.allclose(shape_maps(torch.flip(x, dims=[3])), torch.flip(m, dims=[3]))  # a flip flips the map


def test_the_controlnet_branch_starts_as_the_unet_alone_and_reads_the_map(components):
    from mvc.diffusion.conditioning import ShapeControlledUNet, build_controlnet
    from mvc.diffusion.models import vae_scale_factor

    unet = components["unet"]
    f = vae_scale_factor(components["vae"])
    both = ShapeControlledUNet(unet, build_controlnet(unet, f), f)
    x, t, emb = torch.randn(2, 8, 8, 8), torch.tensor([10, 500]), torch.randn(2, 16, 32)
    shape = torch.rand(2, 1, 8 * f, 8 * f)
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=emb).sample
        assert torch.allclose(both(x, t, emb, controlnet_cond=shape).sample, plain, atol=1e-5)  # zero convs
        for p in both.controlnet.controlnet_mid_block.parameters():
            p.add_(0.05)
        a = both(x, t, emb, controlnet_cond=shape).sample
        both.shape = shape[:1]  # sampling: one map per image, tiled over the batch's chunks
        b = both(x, t, emb).sample
    assert not torch.allclose(a, plain, atol=1e-4)
    assert torch.allclose(b, both(x, t, emb, controlnet_cond=shape[:1].repeat(2, 1, 1, 1)).sample, atol=1e-6)


def test_caption_shape_fine_tunes_both_saves_the_branch_and_generation_loads_it(tmp_path, components):
    from mvc.diffusion.conditioning import ShapeControlledUNet
    from mvc.diffusion.models import load_ip2p_pipeline
    from mvc.generation.generators import load_finetuned, make_generator

    res, comps = run_finetune(tmp_path, components, conditioning="caption_shape", max_steps=3)
    assert np.isfinite(res["losses"]).all()
    final = tmp_path / "mvc" / "final"
    assert (final / "controlnet" / "config.json").is_file() and (final / "unet" / "config.json").is_file()
    assert json.loads((final / "mvc_training.json").read_text())["conditioning"] == "caption_shape"
    trained = comps["unet"]
    assert isinstance(trained, ShapeControlledUNet)
    cfg = make_config(overrides={"run.output_dir": str(tmp_path), "generate.model_dir": str(final)})
    pipe = make_generator(cfg).load(str(final), "cpu", torch.float32)
    assert isinstance(pipe.unet, ShapeControlledUNet)
    assert isinstance(load_finetuned(final, "euler_ancestral").unet, ShapeControlledUNet)  # what the studies load
    for name, p in trained.controlnet.named_parameters():  # the saved branch is the trained one
        assert torch.allclose(dict(pipe.unet.controlnet.named_parameters())[name], p, atol=1e-6)
    # generation feeds each source's edge map with its caption, and records the conditioning
    cfg_over = {"run.output_dir": str(tmp_path), "generate.model_dir": str(final), "generate.num_inference_steps": 1,
                "generate.per_class": 3, "generate.batch_size": 3, "mixing.coarse_k": 2, "mixing.fine_m": 2,
                "mixing.fine_s": 2}
    seen = []
    real = ShapeControlledUNet.forward
    spy = lambda self, *a, **k: seen.append(None if self.shape is None else self.shape.clone()) or real(self, *a, **k)  # noqa: E731
    ShapeControlledUNet.forward = spy
    try:
        cfg = make_config(overrides=cfg_over)
        captions = {f"train/{i}": "a bright item" for i in range(6)}
        summary = gen.generate_synthetic(cfg, labelled=labelled_set(), captions=captions, progress=False)
    finally:
        ShapeControlledUNet.forward = real
    assert summary["images"] == 6 and seen and all(s is not None and s.shape[1:] == (1, 16, 16) for s in seen)
    recs = read_jsonl(tmp_path / "synthetic" / "metadata.jsonl")
    assert all(r["conditioning"] == "caption_shape" and r["caption"] == "a bright item" for r in recs)
    with pytest.raises(MVCError, match="without its ControlNet branch"):  # never silently without the branch
        gen.generate_synthetic(make_config(overrides={**dict(cfg_over), "generate.out_dir": str(tmp_path / "plain")}),
                               labelled=labelled_set(), captions=captions, progress=False,
                               pipe=load_ip2p_pipeline(final, "euler_ancestral"))


def test_every_conditioning_fits_the_sd15_shapes(tmp_path):
    """SD-1.5's structure (8x VAE, 77 positions, width from the config): the image grid is 8 x 8 after BOS, and the
    ControlNet branch reads a 256-px map and hands the U-Net residuals of its own shapes."""
    from mvc.diffusion.conditioning import ShapeControlledUNet, build_controlnet, shape_maps
    from mvc.diffusion.models import load_pipeline_components, vae_scale_factor, widen_conv_in
    from mvc.diffusion.standins import save_sd15_structured

    comps = load_pipeline_components(str(save_sd15_structured(tmp_path / "sd15")))
    unet, vae = widen_conv_in(comps["unet"]), comps["vae"]
    f, L = vae_scale_factor(vae), comps["tokenizer"].model_max_length
    assert f == 8 and L == 77 and token_grid(256 // f, L) == 8
    empty = torch.zeros(L, unet.config.cross_attention_dim)
    img = ImageContexts.build(torch.randn(2, 1, 4, 32, 32), vae.config.scaling_factor, empty, direction=True)
    assert img.lookup(torch.tensor([0]), torch.tensor([1]), torch.tensor([0])).shape == (1, 77, empty.shape[1])
    both = ShapeControlledUNet(unet, build_controlnet(unet, f), f)
    x = torch.randn(1, 8, 32, 32)
    with torch.no_grad():
        out = both(x, torch.tensor([10]), torch.randn(1, 77, empty.shape[1]),
                   controlnet_cond=shape_maps(torch.rand(1, 3, 256, 256) * 2 - 1)).sample
    assert out.shape == (1, 4, 32, 32)


def test_validation_of_a_shape_model_reads_the_condition_maps_and_leaves_none_behind(tmp_path, components):
    from mvc.diffusion.conditioning import ShapeControlledUNet

    seen = []
    real = ShapeControlledUNet.forward

    def spy(self, *a, **k):
        seen.append(None if self.shape is None else self.shape.clone())
        return real(self, *a, **k)

    ShapeControlledUNet.forward = spy
    try:
        _, comps = run_finetune(tmp_path, components, conditioning="caption_shape", max_steps=1, validate_every=1,
                                num_validation=2)
    finally:
        ShapeControlledUNet.forward = real
    grids = list((tmp_path / "mvc" / "validation").glob("step-*.png"))
    assert grids and any(s is not None and s.shape == (2, 1, 16, 16) for s in seen)  # the pipeline saw the maps
    assert comps["unet"].shape is None  # training's own calls pass theirs
