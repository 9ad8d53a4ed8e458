"""Test-wide settings.

The suite runs thousands of tiny ops; on a 2-core CI machine torch's intra-op threads contend with each
other (and with pytest) and make them up to 10x slower, so every test runs single-threaded.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _single_threaded_torch():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
