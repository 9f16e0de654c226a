"""Fixture writers shared by several test modules: idx files, a micro Fashion-MNIST root, micro CLI args."""

from __future__ import annotations

import contextlib
import gzip
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
MICRO = ROOT / "configs" / "micro.yaml"


def write_idx(path: Path, arr: np.ndarray, magic: int, gz: bool = False) -> None:
    """One idx file: magic, dims (big-endian uint32), then the uint8 payload; gzip-compressed if `gz`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    raw += np.ascontiguousarray(arr, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def write_fashion_idx(root: Path, train_per_class: int = 6, test_per_class: int = 2, size: int = 16,
                      seed: int = 0) -> Path:
    """A Fashion-MNIST data root (`<root>/fashion_mnist/*-idx?-ubyte`) with all 10 classes.

    Class c is a bright block whose height and brightness grow with c, jittered per image, so the
    attribute captions differ between images. Returns `root`.
    """
    rng = np.random.default_rng(seed)
    folder = root / "fashion_mnist"
    for prefix, per in (("train", train_per_class), ("t10k", test_per_class)):
        labels = np.repeat(np.arange(10), per).astype(np.uint8)
        images = rng.integers(0, 30, (len(labels), size, size)).astype(np.uint8)
        for i, c in enumerate(labels):
            h = 3 + int(c) + int(rng.integers(0, 3))
            w = int(rng.integers(4, size - 2))
            y0, x0 = int(rng.integers(0, size - min(h, size - 1))), int(rng.integers(0, size - w + 1))
            images[i, y0:y0 + h, x0:x0 + w] = 120 + 12 * int(c) + int(rng.integers(0, 10))
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, 2051)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, 2049)
    return root


def micro_argv(data_root: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    """CLI arguments of the micro profile on the fixture data, writing to `out` and caching under `cache`
    (never in the repository's outputs/)."""
    return ["--config", str(MICRO), f"--data.root={data_root}", f"--run.output_dir={out}",
            f"--tiny.cache_dir={cache}", f"--evaluate.cache_dir={Path(cache) / 'reference'}", *extra]


def unet_weights(final_dir: Path) -> dict[str, torch.Tensor]:
    """Tensors of the saved U-Net (safetensors) of a fine-tuned pipeline folder."""
    from safetensors.torch import load_file

    files = sorted((Path(final_dir) / "unet").glob("*.safetensors"))
    assert files, f"no safetensors U-Net in {final_dir}"
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out


def max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference between two state dicts with the same keys."""
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def write_random_ip2p(path: Path, tiny_cfg, words=()) -> Path:
    """A random InstructPix2Pix folder of the tiny shape `tiny_cfg`, saved the way train_mvc.py saves one."""
    from mvc.diffusion.models import ip2p_pipeline
    from mvc.diffusion.tiny import build_tiny_components

    torch.manual_seed(0)
    comps = build_tiny_components(tiny_cfg, list(words), in_channels=8)
    ip2p_pipeline(comps, comps["unet"]).save_pretrained(path)
    return path


@contextlib.contextmanager
def no_hang(seconds: int = 60):
    """Fail (TimeoutError) instead of hanging when the body blocks, e.g. reading a FIFO nobody writes to."""
    def hang(signum, frame):
        raise TimeoutError(f"blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def torchrun_two(script: Path, *args: str, timeout: int) -> subprocess.CompletedProcess:
    """`script args...` in 2 CPU processes under torch.distributed.run (gloo), one torch thread each, the repository
    on PYTHONPATH, on a free port (so parallel test runs do not collide); its output captured as text."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           str(script), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
