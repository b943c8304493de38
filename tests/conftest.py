"""Shared pytest fixtures."""
import os

# Before anything imports huggingface_hub (it reads this once): tests never reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from fixtures import make_tiny_omniglot, one_torch_thread


@pytest.fixture
def tiny_data_dir(tmp_path):
    """A data folder holding a tiny background zip: 2 alphabets x 3 characters x 4 drawers."""
    data_dir = tmp_path / "data"
    make_tiny_omniglot(data_dir)
    return data_dir


@pytest.fixture
def tiny_cache_dir(tmp_path):
    """An empty folder for decoded arrays."""
    return tmp_path / "cache"


@pytest.fixture
def one_thread():
    """torch on one CPU thread for the test (`fixtures.one_torch_thread`)."""
    with one_torch_thread():
        yield
