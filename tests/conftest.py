"""Test-wide settings: no network, a `slow` marker, and the `one_thread` fixture."""

import os

# No test may touch the network: the hub is offline, and so is torchvision's downloader.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~30 s on 2 CPU cores")


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's in-process work on one torch thread (restored after, also when set-up fails).

    Micro models gain nothing from a second thread, and on a loaded 2-core machine the OpenMP
    spin-waits of a second thread make each U-Net call ~10x slower.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
