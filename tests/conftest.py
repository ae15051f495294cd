import os

# Triton's interpreter runs kernels on CPU tensors only if set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    no_cuda = pytest.mark.skip(reason="needs a CUDA device")
    no_triton = pytest.mark.skip(reason="triton is not installed")
    has_triton = importlib.util.find_spec("triton") is not None
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)
        if "triton" in item.keywords and not has_triton:
            item.add_marker(no_triton)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
