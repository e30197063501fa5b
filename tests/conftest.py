import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CIFAR_ZIP = SHARED / "data" / "cifar10-jpg.zip"
AKAMASTER = SHARED / "models" / "akamaster-cifar10-resnet"

needs_cifar = pytest.mark.skipif(not CIFAR_ZIP.is_file(), reason=f"{CIFAR_ZIP} is not available")
needs_akamaster = pytest.mark.skipif(not AKAMASTER.is_dir(), reason=f"{AKAMASTER} is not available")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The tests run small forward passes, where extra intra-op threads only contend (badly so on a busy machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _ctrl_c_as_at_a_terminal():
    """A suite started in the background (`make test &` in a script) inherits SIGINT ignored, and so would every
    command it starts; the interruption tests need Ctrl-C to mean what it means at a terminal."""
    import signal

    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture(autouse=True, scope="session")
def _quiet_cache(tmp_path_factory):
    """Keep decoded datasets in the user's cache (shared across runs) unless a test overrides it."""
    os.environ.setdefault("REASSEMBLY_CACHE", str(Path.home() / ".cache" / "reassembly"))
