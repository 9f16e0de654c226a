"""Test-wide settings: no network, a `slow` marker, the `one_thread` fixture, and the miniature full-profile run
of tests/smoke/test_smoke_full.py started in the background when its test is selected."""

import os
import sys
import tempfile
from pathlib import Path

# No test may touch the network: the hub is offline, and so is torchvision's downloader.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

_THREADS = pytest.StashKey[int]()  # torch's thread count before the background run started


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: ~10 s or more on 2 CPU cores (subprocesses, several processes, whole pipelines); `pytest -m \"not slow\"` is the quick loop")


def pytest_collection_finish(session):
    """Start the miniature full-profile run of tests/smoke/test_smoke_full.py in the background when its test is selected.

    It is a few minutes of processes of its own on one core; the rest of the suite runs in this process on the
    other one (one torch thread from here on: a second OpenMP thread would spin-wait against the background run).
    Its test waits for it and checks it where it stands in the order.
    """
    if session.config.option.collectonly or not session.items:
        return
    module = next((i.module for i in session.items if getattr(i, "module", None) is not None
                   and i.module.__name__.endswith("test_smoke_full")), None)
    if module is None:
        return
    factory = getattr(session.config, "_tmp_path_factory", None)  # pytest's basetemp, as tmp_path_factory gives it

    def root() -> Path:
        return factory.mktemp("smoke_background") if factory is not None else Path(tempfile.mkdtemp(prefix="mvc-smoke-"))

    if module.start_background(session.items, root):
        import torch

        session.config.stash[_THREADS] = torch.get_num_threads()
        torch.set_num_threads(1)


def pytest_sessionfinish(session, exitstatus):
    """End the background run if its test did not take it (the session stopped early)."""
    module = sys.modules.get("tests.smoke.test_smoke_full")
    if module is not None and hasattr(module, "stop_background"):
        module.stop_background()
    threads = session.config.stash.get(_THREADS, None)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


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


@pytest.fixture
def fresh_accelerate():
    """accelerate's process-wide state (a singleton that keeps its precision) reset before and after a test."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
