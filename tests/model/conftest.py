import numpy as np
import pytest
import torch

from model.fmnist import DEFAULT_SOURCE
from model.taxonomy import load_taxonomy

HAVE_FMNIST = (DEFAULT_SOURCE / "t10k-images-idx3-ubyte.gz").is_file() or (DEFAULT_SOURCE / "t10k-images-idx3-ubyte").is_file()


@pytest.fixture
def fmnist():
    """Skip (with the reason) where the Fashion-MNIST IDX files are not installed."""
    if not HAVE_FMNIST:
        pytest.skip(f"Fashion-MNIST IDX files not in {DEFAULT_SOURCE} (apt-get install dataset-fashion-mnist)")


@pytest.fixture(autouse=True)
def _few_threads():
    """The model tests share two cores with everything else; keep torch to two threads and seeded."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    np.random.seed(0)
    yield


@pytest.fixture(scope="session")
def fm_tax():
    return load_taxonomy("fashion-mnist")


@pytest.fixture(scope="session")
def ml_tax():
    return load_taxonomy("styles-multilabel")
