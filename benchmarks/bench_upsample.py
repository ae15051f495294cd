"""upsample_normalize: the reference (F.interpolate + min-max) against the C++ kernel on
this CPU, and against the Triton kernel where CUDA is present.

    python benchmarks/bench_upsample.py
"""
import torch

from _runner import BenchTable
from cnnviz_fast import upsample_normalize
from cnnviz_fast.reference import upsample_normalize_ref

SHAPES = [((8, 1, 7, 7), 224), ((32, 1, 14, 14), 224), ((8, 5, 7, 7), 224), ((64, 1, 28, 28), 112)]


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fast = "triton" if device == "cuda" else "cpp"
    table = BenchTable("upsample_normalize", device, dtype="float32")
    for shape, size in SHAPES:
        maps = torch.randn(shape, device=device)
        torch.testing.assert_close(upsample_normalize(maps, size, backend=fast),
                                   upsample_normalize_ref(maps, size), rtol=1e-4, atol=1e-5)
        case = f"{shape}->{size}"
        out_bytes = maps.numel() / (shape[2] * shape[3]) * size * size * 4
        for provider, backend in (("reference", "reference"), (fast, fast)):
            row = table.add(case, provider, lambda: upsample_normalize(maps, size, backend=backend))
            row["GB/s"] = out_bytes / row["p50_ms"] / 1e6
    table.report()


if __name__ == "__main__":
    main()
