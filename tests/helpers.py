"""Shared by the tests: which backends run here, and comparisons that explain failures."""
import pytest
import torch

import cnnviz_fast

# float32 tolerance (FlagGems' table); atol is scaled by the reduction length where one exists.
RTOL = {torch.float32: 1.3e-6, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}


def fast_backends():
    """pytest params of the fast backends, the Triton one under the `triton` marker."""
    status = cnnviz_fast.backends()
    return [
        pytest.param("cpp", marks=pytest.mark.skipif(not status["cpp"]["available"],
                                                     reason=status["cpp"]["detail"])),
        pytest.param("triton", marks=pytest.mark.triton),
    ]


def assert_close(actual, expected, rtol=1.3e-6, atol=1e-6, what="result"):
    """torch.testing-style check that names the first mismatch and any NaN/Inf."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    bad_a = (~torch.isfinite(a)).nonzero()
    assert not len(bad_a) or torch.equal(~torch.isfinite(a), ~torch.isfinite(e)), \
        f"{what}: non-finite values at {bad_a[:5].tolist()}"
    err = (a - e).abs()
    ok = err <= atol + rtol * e.abs()
    ok |= ~torch.isfinite(e) & (a == e)
    if not bool(ok.all()):
        idx = tuple((~ok).nonzero()[0].tolist())
        raise AssertionError(f"{what}: {int((~ok).sum())} of {ok.numel()} differ; first at {idx}: "
                             f"got {a[idx].item():.9g}, expected {e[idx].item():.9g}, "
                             f"max abs err {err.max().item():.3g}")


def occluded_outputs(model, image, baseline, positions, window):
    """The definition: the model on copies of ``image`` with each window set to ``baseline``."""
    wh, ww = window
    x = image.repeat(len(positions), 1, 1, 1)
    for i, (t, l) in enumerate(positions.tolist()):
        x[i, :, t:t + wh, l:l + ww] = baseline[:, t:t + wh, l:l + ww]
    with torch.no_grad():
        return model(x)


def k_target_columns(explain, x, targets):
    """``explain(x, targets)`` for ``[B, k]`` targets, checked to stack one map per target
    (``[B, k, *x.shape[1:]]``), and ``explain(x, targets[:, j])`` for every column j."""
    stacked = explain(x, targets)
    assert stacked.shape == (*targets.shape, *x.shape[1:]), f"stacked shape {tuple(stacked.shape)}"
    return stacked, [explain(x, targets[:, j]) for j in range(targets.shape[1])]
