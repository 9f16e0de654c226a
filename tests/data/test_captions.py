"""Captioners (BLIP-2 tiny random model through the real loading path, attribute words), the
caption cache (rerun, resume after interruption) and prompt templates."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mvc.core.config import CaptionConfig
from mvc.core.utils import MVCError
from mvc.data import ArraySource, ImageDataset
from mvc.data.captions import (
    CAPTIONERS,
    AttributeCaptioner,
    Captioner,
    TemplateCaptioner,
    build_captioner,
    caption_cache_path,
    caption_dataset,
    list_captioners,
)
from mvc.data.prompts import make_prompt, validate_template
from mvc.diffusion.tokenizer import BASE_WORDS


def toy_dataset(n=10, size=28, seed=0):
    """n grayscale images with a random bright rectangle on black, labels cycling over 3 classes."""
    rng = np.random.default_rng(seed)
    arr = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        y0, x0 = rng.integers(0, size // 2, 2)
        h, w = rng.integers(4, size // 2, 2)
        arr[i, y0:y0 + h, x0:x0 + w] = rng.integers(60, 255)
    return ImageDataset("toy", "train", ["cat", "dog", "eel"], np.arange(n) % 3,
                        [f"train/{i:05d}" for i in range(n)], ArraySource(arr))


def rgb(arr):
    return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")


#################################################################################
#                                   Prompts                                     #
#################################################################################

def test_default_template_and_make_prompt():
    t = CaptionConfig().prompt_template
    assert validate_template(t) == t
    assert make_prompt(t, " a dark small object ", "sandal") == "a dark small object, a photo of class type sandal"


@pytest.mark.parametrize("bad, words", [
    ("{caption} only", "lacks {label}"),
    ("a photo of {label}", "lacks {caption}"),
    ("{caption} {label} {style}", "unknown placeholder(s) {style}"),
    ("{caption}, {label", "malformed"),
    ("{caption} {label} {0}", "unknown placeholder(s) {0}"),
])
def test_bad_templates_are_one_line_errors(bad, words):
    with pytest.raises(MVCError) as e:
        validate_template(bad)
    assert words in str(e.value) and "\n" not in str(e.value)


#################################################################################
#                              Attribute captions                               #
#################################################################################

def test_registry_lists_all_captioners_and_rejects_unknown():
    assert set(list_captioners()) == {"blip2", "lavis", "attributes", "template"}
    with pytest.raises(MVCError, match="unknown captioner"):
        build_captioner(SimpleNamespace(captioner="nope"))


def test_attribute_words_are_true_of_the_image():
    cap = AttributeCaptioner()
    dark_small = np.zeros((28, 28))
    dark_small[12:16, 11:15] = 70  # a dim 4x4 square: dark, small, square, flat, symmetric
    bright_wide = np.zeros((28, 28))
    bright_wide[5:23, 1:27] = 240  # a bright 26x18 bar (60% of the image): bright, large, wide
    tall = np.zeros((28, 28))
    tall[2:26, 11:17] = 160  # a 6x24 column
    checker = np.zeros((28, 28))
    checker[4:24, 4:24] = np.where((np.add.outer(np.arange(20), np.arange(20)) % 2) == 0, 250, 90)
    lopsided = np.zeros((28, 28))
    lopsided[4:24, 4:8] = 250  # an L shape: heavy on the left
    lopsided[20:24, 4:24] = 250
    c = [set(s.split()) for s in cap([rgb(a) for a in (dark_small, bright_wide, tall, checker, lopsided)])]
    assert {"dark", "small", "square", "smooth", "symmetric"} <= c[0]
    assert {"bright", "large", "wide", "smooth", "symmetric"} <= c[1]
    assert {"tall"} <= c[2] and "wide" not in c[2]
    assert "textured" in c[3] and "smooth" not in c[3]
    assert "asymmetric" in c[4]


def test_attribute_captions_are_label_free_and_in_the_base_vocabulary():
    ds = toy_dataset(12)
    caps = AttributeCaptioner()([ds.load_image(i) for i in range(len(ds))])
    words = {w for c in caps for w in c.split()}
    assert words <= set(BASE_WORDS)  # every word is a whole token of the tiny tokenizer
    assert not words & {"cat", "dog", "eel", "class", "type"}
    assert len(set(caps)) > 1  # captions really depend on the pixels


#################################################################################
#                                  Cache                                        #
#################################################################################

class CountingCaptioner(Captioner):
    """Captions 'img <mean>' and counts calls; raises once `fail_after` images were captioned."""

    name = "counting"

    def __init__(self, fail_after=None):
        self.seen, self.fail_after = 0, fail_after

    def __call__(self, images):
        if self.fail_after is not None and self.seen >= self.fail_after:
            raise KeyboardInterrupt
        self.seen += len(images)
        return [f"img {np.asarray(im).mean():.2f}" for im in images]


def test_cache_path_is_keyed_by_captioner_and_fingerprint(tmp_path):
    ds = toy_dataset(4)
    p = caption_cache_path(tmp_path, "attributes", ds)
    assert p == tmp_path / "captions" / f"attributes-{ds.fingerprint()}.jsonl"
    assert caption_cache_path(tmp_path, "attributes", ds.subset([0, 1])) != p
    # a captioner object names its file by its cache key: the settings that change its captions
    assert caption_cache_path(tmp_path, AttributeCaptioner(), ds) == p
    one, two = TemplateCaptioner("an image"), TemplateCaptioner("a photo")
    assert caption_cache_path(tmp_path, one, ds) != caption_cache_path(tmp_path, two, ds)
    assert caption_cache_path(tmp_path, one, ds) == caption_cache_path(tmp_path, TemplateCaptioner("an image"), ds)


def test_caption_cache_rerun_and_resume(tmp_path):
    ds = toy_dataset(10)
    path = tmp_path / "caps.jsonl"
    first = CountingCaptioner(fail_after=4)
    with pytest.raises(KeyboardInterrupt):
        caption_dataset(ds, first, path, batch_size=2, progress=False)
    assert first.seen == 4 and len(path.read_text().splitlines()) == 4  # flushed per batch
    with open(path, "a") as f:
        f.write('{"id": "train/00004", "capt')  # a torn last line from a crash mid-write
    second = CountingCaptioner()
    caps = caption_dataset(ds, second, path, batch_size=2, progress=False)
    assert second.seen == 6  # only the ids not done before
    assert list(caps) == ds.ids
    assert caps == {ds.ids[i]: f"img {np.asarray(ds.load_image(i)).mean():.2f}" for i in range(10)}
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert sorted(r["id"] for r in lines) == sorted(ds.ids)
    third = CountingCaptioner()
    assert caption_dataset(ds, third, path, batch_size=2, progress=False) == caps and third.seen == 0
    # a subset reads its ids from the same file
    assert caption_dataset(ds.subset([3, 7]), third, path, progress=False) == {ds.ids[3]: caps[ds.ids[3]],
                                                                             ds.ids[7]: caps[ds.ids[7]]}


def test_sharded_captioning_splits_the_work_and_merges_one_cache(tmp_path):
    """Two processes (threads here, with a real barrier) each caption half of the missing images into their
    own shard; both then read the one merged cache. Shards an interrupted run left count as captioned."""
    import threading

    from mvc.data.captions import shard_files

    ds = toy_dataset(10)
    path = tmp_path / "caps.jsonl"
    caption_dataset(ds.subset([0, 1]), CountingCaptioner(), path, progress=False)  # 2 cached before
    barrier = threading.Barrier(2, timeout=60)
    capts, results = [CountingCaptioner(), CountingCaptioner()], [None, None]

    def worker(rank):
        results[rank] = caption_dataset(ds, capts[rank], path, batch_size=3, progress=False, rank=rank, world=2,
                                        barrier=barrier.wait)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [c.seen for c in capts] == [4, 4]  # the 8 missing images, split in two
    assert results[0] == results[1] and list(results[0]) == ds.ids and not shard_files(path)
    assert sorted(json.loads(x)["id"] for x in path.read_text().splitlines()) == sorted(ds.ids)
    # an interrupted sharded run left a shard: a one-process rerun reads it, merges it, captions the rest
    more = toy_dataset(12)
    (tmp_path / "caps.rank1.jsonl").write_text(json.dumps({"id": more.ids[10], "caption": "from a shard"}) + "\n")
    third = CountingCaptioner()
    caps = caption_dataset(more, third, path, progress=False)
    assert third.seen == 1 and caps[more.ids[10]] == "from a shard" and not shard_files(path)


def test_caption_cache_with_a_broken_record_is_an_error(tmp_path):
    path = tmp_path / "caps.jsonl"
    path.write_text('{"id": "x"}\n')
    with pytest.raises(MVCError, match="delete the file"):
        caption_dataset(toy_dataset(2), CountingCaptioner(), path, progress=False)


#################################################################################
#                                 BLIP-2, LAVIS                                 #
#################################################################################

def test_blip2_tiny_random_model_through_the_real_loading_path(tmp_path):
    from mvc.diffusion.standins import save_small_blip2

    folder = save_small_blip2(tmp_path / "tiny-blip2")  # random weights, BLIP-2's classes, a small config
    cfg = CaptionConfig(captioner="blip2", model_id=str(folder), max_new_tokens=5)
    captioner = build_captioner(cfg)
    assert captioner.name == "blip2" and captioner._model is None  # loaded on first use only
    assert captioner.model.dtype == torch.float32  # CPU: full precision
    ds = toy_dataset(5)
    caps = caption_dataset(ds, captioner, caption_cache_path(tmp_path, captioner, ds), batch_size=2,
                           progress=False)
    assert list(caps) == ds.ids and all(isinstance(c, str) for c in caps.values())
    # greedy decoding: the same image gives the same caption, alone or in a batch
    again = captioner([ds.load_image(3), ds.load_image(0)])
    assert again == [caps[ds.ids[3]], caps[ds.ids[0]]]
    # a later stage with every caption cached never loads the model
    fresh = build_captioner(cfg)
    assert caption_dataset(ds, fresh, caption_cache_path(tmp_path, fresh, ds), progress=False) == caps
    assert fresh._model is None
    # another model or caption length is another cache file: old captions are never reused for it
    shutil.copytree(folder, tmp_path / "other-blip2")
    for other in (CaptionConfig(captioner="blip2", model_id=str(tmp_path / "other-blip2"), max_new_tokens=5),
                  CaptionConfig(captioner="blip2", model_id=str(folder), max_new_tokens=6)):
        assert caption_cache_path(tmp_path, build_captioner(other), ds) != caption_cache_path(tmp_path, fresh, ds)
    # at most max_new_tokens new tokens per caption
    assert all(len(captioner.processor.tokenizer(c, add_special_tokens=False).input_ids) <= 5 for c in again)
    # captions.dtype: half precision when asked (the default on CUDA), batched greedy captions still come out
    half = build_captioner(CaptionConfig(captioner="blip2", model_id=str(folder), max_new_tokens=5, dtype="bf16"))
    assert half.model.dtype == torch.bfloat16 and len(half([ds.load_image(0), ds.load_image(1)])) == 2


def test_blip2_missing_folder_and_offline_hub_id_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(MVCError, match="no folder"):
        build_captioner(CaptionConfig(captioner="blip2", model_id=str(tmp_path / "nope")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MVCError, match="cannot load BLIP-2") as e:
        build_captioner(CaptionConfig(captioner="blip2", model_id="nobody-here/no-such-model-xyz")).load()
    assert "\n" not in str(e.value)


FAKE_LAVIS = """
# Stands in for salesforce-lavis in its own environment: the real package's entry point and call signature.
import torch


class _Model:
    def generate(self, samples, use_nucleus_sampling=False, num_beams=1, max_length=30):
        return [f"a lavis caption of brightness {float(x.mean()):.3f}" for x in samples["image"]]


def _eval(im):
    return torch.tensor(__import__("numpy").asarray(im.resize((8, 8)), dtype="float32") / 255.0).permute(2, 0, 1)


def load_model_and_preprocess(name, model_type, is_eval=False, device="cpu"):
    assert (name, model_type, is_eval) == ("blip2_opt", "caption_coco_opt2.7b", True)
    return _Model(), {"eval": _eval}, {}
"""


def test_lavis_hand_off_captions_from_its_environment_are_read_without_lavis(tmp_path, monkeypatch):
    """The LAVIS environment runs caption_mvc.py with captioner=lavis; the main stack (no lavis installed)
    reads that caption file as a cache hit with the same settings, and asks for the environment only
    for an image that has no caption."""
    import importlib.util
    import os
    import subprocess
    import sys

    import caption_mvc
    from mvc.core.config import build_parser, parse_args
    from mvc.data import load_splits
    from mvc.data.captions import load_captions
    from tests.helpers import ROOT, micro_argv, write_fashion_idx

    assert importlib.util.find_spec("lavis") is None  # this stack never has it
    env_dir = tmp_path / "lavis-env"
    (env_dir / "lavis").mkdir(parents=True)
    (env_dir / "lavis" / "__init__.py").write_text("")
    (env_dir / "lavis" / "models.py").write_text(FAKE_LAVIS)
    data = write_fashion_idx(tmp_path / "data")
    argv = micro_argv(data, tmp_path / "out", tmp_path / "cache", "--captions.captioner=lavis")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(env_dir), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "caption_mvc.py", *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    files = list((tmp_path / "out" / "captions").glob("lavis-*.jsonl"))
    assert len(files) == 1
    written = {rec["id"]: rec["caption"] for rec in map(json.loads, files[0].read_text().splitlines())}
    assert len(written) == 20 and all(c.startswith("a lavis caption") for c in written.values())

    caps = caption_mvc.cli(argv)  # the main stack, in this process: every caption is a cache hit
    assert caps == written and "lavis" not in sys.modules
    cfg, _ = parse_args(build_parser("x"), argv)
    labelled = load_splits(cfg.data)[0]
    assert load_captions(cfg, labelled) == written
    # an image the LAVIS run did not caption: one line that says where to caption it
    files[0].write_text("".join(json.dumps({"id": k, "caption": v}) + "\n" for k, v in list(written.items())[1:]))
    with pytest.raises(MVCError, match="LAVIS environment") as e:
        load_captions(cfg, labelled)
    assert "docs/lavis.md" in str(e.value) and "\n" not in str(e.value)


def test_template_captioner_uses_the_configured_text():
    cap = CAPTIONERS.get("template")(CaptionConfig(template_text="a picture"))
    assert cap([rgb(np.zeros((4, 4)))] * 3) == ["a picture"] * 3
