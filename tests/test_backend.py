"""The dispatch pattern: explicit, environment and automatic backend choice."""
import os
import subprocess
import sys

import pytest
import torch

import cnnviz_fast
from cnnviz_fast import _backend


def test_import_does_not_import_triton_or_touch_cuda():
    code = ("import sys, torch\n"
            "calls = []\n"
            "torch.cuda.init = lambda *a: calls.append('init')\n"
            "torch.cuda.is_available = lambda *a: calls.append('is_available') or False\n"
            "import cnnviz_fast, cnnviz_fast.ops, cnnviz_fast.models, cnnviz_fast.data\n"
            "assert 'triton' not in sys.modules, 'triton was imported'\n"
            "assert not calls, calls\n"
            "print('clean')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "clean" in out.stdout, out.stderr


def test_backends_reports_each_with_detail():
    status = cnnviz_fast.backends()
    assert set(status) == {"reference", "cpp", "triton"}
    assert status["reference"]["available"] is True
    assert all(isinstance(v["detail"], str) and v["detail"] for v in status.values())


def test_environment_variable_chooses(monkeypatch):
    t = torch.zeros(1)
    monkeypatch.setenv("CNNVIZ_BACKEND", "reference")
    assert _backend.choose("op", t) == "reference"
    assert _backend.choose("op", t, backend="cpp") == "cpp"  # the argument wins
    monkeypatch.setenv("CNNVIZ_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"CNNVIZ_BACKEND \(environment variable\): expected one of"):
        _backend.choose("op", t)


def test_automatic_choice_on_cpu(monkeypatch):
    monkeypatch.delenv("CNNVIZ_BACKEND", raising=False)
    assert _backend.choose("op", torch.zeros(1)) == "cpp"
    assert _backend.choose("op", torch.zeros(1, dtype=torch.float64)) == "reference"


def test_missing_cpp_raises_by_name_and_falls_back_automatically(monkeypatch):
    monkeypatch.delenv("CNNVIZ_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "_cpp_status", lambda: (None, "extension not built"))
    assert _backend.choose("op", torch.zeros(1)) == "reference"
    with pytest.raises(RuntimeError, match="backend='cpp' is not available: extension not built"):
        _backend.choose("op", torch.zeros(1), backend="cpp")


def test_triton_by_name_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        _backend.choose("op", torch.zeros(1), backend="triton")
