"""On a CUDA device (skipped without one: CI has no GPU): the RNG record holds CUDA's states, the tiny base builds
there in every precision, and fine-tuning, textual inversion and DreamBooth train there, a resumed run ending where
the uninterrupted one does. Micro scale: well under a minute on one GPU."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import micro_argv, unet_weights, write_fashion_idx

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@contextlib.contextmanager
def accelerator(precision: str):
    """A fresh accelerate state with `precision` on the default device (CUDA here), reset again after."""
    from accelerate.state import AcceleratorState, GradientState

    from mvc.core.distributed import make_accelerator

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        yield make_accelerator(precision)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


@contextlib.contextmanager
def on_cuda():
    """Assert that the body allocated CUDA memory (it ran there)."""
    torch.cuda.reset_peak_memory_stats()
    yield
    assert torch.cuda.max_memory_allocated() > 0


def close(a: dict, b: dict) -> None:
    """Two state dicts equal up to float summation order (Adam may flip the sign of a ~0 gradient's update)."""
    assert set(a) == set(b)
    d = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])
    assert d.mean().item() < 1e-5 and (d > 1e-5).float().mean().item() < 0.03 and d.max().item() < 5e-3, d.max()


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """Fixture data, the micro config of a method, its labelled subset and pool, and the micro tiny base (built on
    CUDA, cached for the module)."""
    import generate_mvc
    from mvc.core.config import parse_args
    from mvc.data import load_splits
    from mvc.diffusion.inputs import base_source

    root = tmp_path_factory.mktemp("cuda")
    data = write_fashion_idx(root / "data")

    def config(run: Path, *extra: str):
        return parse_args(generate_mvc.build_parser("x"), micro_argv(data, run, root / "cache", *extra))[0]

    cfg = config(root / "run")
    labelled, pool, _ = load_splits(cfg.data)
    with on_cuda():
        base = base_source(cfg, pool, root / "run", False, CUDA, "no")
    return type("Micro", (), {"config": staticmethod(config), "labelled": labelled, "pool": pool, "base": base,
                              "cfg": cfg, "root": root})


#################################################################################
#                                  RNG record                                   #
#################################################################################

def test_the_rng_record_holds_and_restores_cudas_states(tmp_path):
    from mvc.core.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state

    torch.cuda.manual_seed_all(1)
    torch.randn(3, device=CUDA)
    path = save_checkpoint(tmp_path, 1, {"rng": rng_state()}, {})
    expected = torch.randn(5, device=CUDA).cpu()
    torch.cuda.manual_seed_all(2)
    state = load_checkpoint(path)["rng"]
    assert len(state["cuda"]) == torch.cuda.device_count()
    set_rng_state(state)
    assert torch.equal(torch.randn(5, device=CUDA).cpu(), expected)


#################################################################################
#                                  Tiny base                                    #
#################################################################################

@pytest.mark.parametrize("precision", ["no", "bf16", "fp16"])
def test_the_tiny_base_builds_on_cuda(micro, tmp_path, precision):
    """Pretrained on CUDA (with EMA and min-SNR, bf16 autocast, fp16's loss scaler): finite losses, recorded device
    and precision, the fp32 base under the CPU's key, the caller's CUDA RNG untouched, and it samples."""
    import dataclasses

    from diffusers import StableDiffusionPipeline

    from mvc.diffusion.tiny import get_tiny_base, tiny_base_key

    cfg = dataclasses.replace(micro.cfg.tiny, cache_dir=str(tmp_path), ema_decay=0.9, snr_gamma=5.0, unet_steps=30,
                              vae_steps=30)
    before = torch.cuda.get_rng_state()
    with on_cuda():
        folder = get_tiny_base(cfg, micro.pool, progress=False, device=CUDA, precision=precision)
    assert torch.equal(torch.cuda.get_rng_state(), before)
    info = json.loads((folder / "tiny_base.json").read_text())
    assert info["device"] == "cuda" and info["mixed_precision"] == precision
    assert np.isfinite(info["vae_mse"]) and np.isfinite(info["unet_loss"])
    assert folder.name == tiny_base_key(cfg, micro.pool, "attributes", precision)
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False).to(CUDA)
    image = pipe("a dark object", num_inference_steps=2, output_type="np").images[0]
    assert np.isfinite(image).all()


def test_a_tiny_base_build_killed_on_cuda_resumes_to_the_uninterrupted_one(micro, tmp_path, monkeypatch):
    """Killed at U-Net step 25 of 30 (a checkpoint every 10): the build resumed on CUDA (AdamW and the EMA's foreach
    update on the device, their states reloaded there) ends where the straight one does, up to summation order."""
    import dataclasses

    from mvc.diffusion.tiny import get_tiny_base
    from tests.diffusion.test_tiny import Killed, base_tensors, crash_at_unet_step

    cfg = dataclasses.replace(micro.cfg.tiny, ema_decay=0.9, snr_gamma=5.0, unet_steps=30, vae_steps=30,
                              checkpoint_every=10)
    a, b = (dataclasses.replace(cfg, cache_dir=str(tmp_path / run)) for run in ("a", "b"))
    with on_cuda():
        straight = get_tiny_base(a, micro.pool, progress=False, device=CUDA)
        with monkeypatch.context() as m:
            crash_at_unet_step(m, 25)
            with pytest.raises(Killed):
                get_tiny_base(b, micro.pool, progress=False, device=CUDA)
        resumed = get_tiny_base(b, micro.pool, progress=False, device=CUDA)
    info = json.loads((resumed / "tiny_base.json").read_text())
    assert info["resumes"] == 1 and info["device"] == "cuda"
    close(base_tensors(straight), base_tensors(resumed))


#################################################################################
#                                  Fine-tuning                                  #
#################################################################################

def test_finetuning_on_cuda_resumes_to_the_uninterrupted_run(tmp_path):
    """With EMA: 4 straight steps == 2, then a resume to 4; the checkpoints hold CUDA's RNG states."""
    from mvc.core.checkpoint import list_checkpoints, load_checkpoint
    from tests.diffusion.test_finetune import build_components, run_finetune

    comps = build_components()
    kw = {"use_ema": True, "ema_decay": 0.9, "checkpoint_every": 2}
    with accelerator("no"), on_cuda():
        ref, _ = run_finetune(tmp_path / "a", comps, max_steps=4, **kw)
        run_finetune(tmp_path / "b", comps, max_steps=2, **kw)
        res, _ = run_finetune(tmp_path / "b", comps, resume="latest", max_steps=4, **kw)
    assert np.allclose(res["losses"], ref["losses"][2:], rtol=1e-4, atol=1e-6)
    close(unet_weights(tmp_path / "a/mvc/final"), unet_weights(tmp_path / "b/mvc/final"))
    ckpt = load_checkpoint(list_checkpoints(tmp_path / "b/mvc/checkpoints")[-1])
    assert len(ckpt["rng"]["cuda"]) == torch.cuda.device_count()


#################################################################################
#                        Textual inversion and DreamBooth                       #
#################################################################################

def test_textual_inversion_on_cuda_resumes_to_the_uninterrupted_run(micro, tmp_path):
    """4 straight steps == 2 steps, then continued to 4; under bf16 it trains too and records its precision."""
    from safetensors.torch import load_file

    from mvc.diffusion import textual_inversion as ti

    def learn(run: str, precision: str, *extra: str) -> Path:
        cfg = micro.config(tmp_path / run, "--generate.method=textual_inversion", *extra)
        with accelerator(precision) as acc, on_cuda():
            return ti.ensure_embeddings(cfg, micro.labelled, micro.base, 16, accelerator=acc, progress=False)

    straight = learn("a", "no")
    learn("b", "no", "--textual_inversion.steps=2")
    resumed = learn("b", "no")
    a, b = (load_file(str(f / ti.EMBEDS_FILE)) for f in (straight, resumed))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    half = learn("c", "bf16")
    info = ti.read_info(half)
    assert info["trained_on"]["mixed_precision"] == "bf16" and np.isfinite(info["final_loss"])
    assert all(torch.isfinite(v).all() for v in load_file(str(half / ti.EMBEDS_FILE)).values())


def test_dreambooth_on_cuda_resumes_to_the_uninterrupted_run(micro, tmp_path):
    """4 straight steps == 2 steps (the final folder then removed: a run killed after its checkpoint), resumed to 4;
    LoRA under fp16 (accelerate's loss scaler) trains too."""
    from mvc.core.utils import read_jsonl
    from mvc.diffusion.dreambooth import get_dreambooth, make_concepts

    concepts = make_concepts(micro.labelled)

    def train(run: str, precision: str, *extra: str) -> Path:
        cfg = micro.config(tmp_path / run, "--generate.method=dreambooth", *extra)
        with accelerator(precision), on_cuda():
            return get_dreambooth(cfg, micro.labelled, concepts, micro.base, progress=False)

    straight = train("a", "no")
    shutil.rmtree(train("b", "no", "--dreambooth.max_steps=2"))
    resumed = train("b", "no")
    close(unet_weights(straight), unet_weights(resumed))
    lora = train("c", "fp16", "--dreambooth.lora_rank=2", "--dreambooth.lr=1e-2")
    losses = [r["dreambooth/loss"] for r in read_jsonl(lora.parent / "log.jsonl")]
    assert len(losses) == 4 and np.isfinite(losses).all()
    assert json.loads((lora / "mvc_training.json").read_text())["settings"]["mixed_precision"] == "fp16"
