import os

import pytest
import torch

os.environ.setdefault("DDMKIT_QUIET", "1")
torch.set_num_threads(1)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
