"""Common runner of the benchmarks: side-by-side timings in one run, as ratios.

Each script builds a ``BenchTable``, calls ``add(case, provider, fn)`` for the baseline and
then for each contender (the first provider added for a case is its baseline), and ends with
``report()``: a fixed-width table on stdout and the same rows as JSON in
``benchmarks/results/`` with device, versions, git commit and date.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def measure(fn, device="cpu", min_run_time=1.0, once=False):
    """(p50, p20, p80) in milliseconds: triton's do_bench on CUDA, torch's Timer on CPU;
    ``once``: a single call (for runs of minutes, where repeats cost more than they tell)."""
    cuda = torch.device(device).type == "cuda"
    if once:
        sync = torch.cuda.synchronize if cuda else (lambda _device: None)
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        ms = (time.perf_counter() - start) * 1e3
        return ms, ms, ms
    if cuda:
        from triton.testing import do_bench
        p50, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return p50, p20, p80
    from torch.utils.benchmark import Timer
    # Timer runs on one thread unless told: time on the process's threads, as the JSON records
    m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    times = np.asarray(m.times) * 1e3
    return float(np.median(times)), float(np.percentile(times, 20)), float(np.percentile(times, 80))


def device_name(device="cpu"):
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _versions():
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "captum", "torchcam", "zennit", "faiss", "sklearn", "openTSNE"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # a peer that is missing or fails to import is reported as absent
            out[name] = None
    return out


class BenchTable:
    """Rows of (case, provider, p50/p20/p80 ms, ratio to the case's baseline, extra columns)."""

    def __init__(self, name: str, device="cpu", **meta):
        self.name, self.device, self.meta, self.rows = name, str(device), meta, []
        self._baseline = {}

    def add(self, case: str, provider: str, fn, baseline: bool = False, min_run_time=1.0, once=False, **extra):
        """Time ``fn``; the case's first provider (or one with baseline=True) is its baseline."""
        p50, p20, p80 = measure(fn, self.device, min_run_time, once)
        return self._row(case, provider, p50, p20, p80, baseline, **extra)

    def add_interleaved(self, case: str, providers: dict, repeats: int = 30, **extra):
        """Time the ``providers`` (name -> fn; the first is the baseline) in alternation, one
        call of each per round, the order reversed every round, on the threads torch has now
        (as ``add``'s Timer): under a shared CPU every side sees the same load, and a
        call slowed by the one before it (measured: gram right after the reference's bmm) is
        not always the same side's. Rows as ``add``'s, with the minimum (``min_ms``) and the
        thread count beside the percentiles."""
        times = {name: [] for name in providers}
        for fn in providers.values():  # warm-up
            fn()
        order = list(providers.items())
        for _ in range(repeats):
            order.reverse()  # A B B A ...: neither side always runs right after the other
            for name, fn in order:
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1e3)
        rows = []
        for i, (name, ms) in enumerate(times.items()):
            ms = np.asarray(ms)
            rows.append(self._row(case, name, float(np.median(ms)), float(np.percentile(ms, 20)),
                                  float(np.percentile(ms, 80)), i == 0, min_ms=float(ms.min()),
                                  threads=torch.get_num_threads(), **extra))
        return rows

    def _row(self, case, provider, p50, p20, p80, baseline, **extra):
        if baseline or case not in self._baseline:
            self._baseline[case] = p50
        row = dict(case=case, provider=provider, p50_ms=p50, p20_ms=p20, p80_ms=p80,
                   vs_baseline=self._baseline[case] / p50, **extra)
        self.rows.append(row)
        print(f"  {case:<28} {provider:<26} {p50:10.3f} ms  {row['vs_baseline']:6.2f}x", flush=True)
        return row

    def report(self, note: str = ""):
        threads = torch.get_num_threads()
        header = f"op={self.name} device={device_name(self.device)} ({threads} threads)"
        extra_keys = sorted({k for r in self.rows for k in r} -
                            {"case", "provider", "p50_ms", "p20_ms", "p80_ms", "vs_baseline"})
        print("\n" + header + (f"  {note}" if note else ""))
        print(f"{'case':<28} {'provider':<26} {'p50_ms':>10} {'p20_ms':>10} {'p80_ms':>10} {'speedup':>8} "
              + " ".join(f"{k:>12}" for k in extra_keys))
        for r in self.rows:
            cols = " ".join(f"{_fmt(r.get(k)):>12}" for k in extra_keys)
            print(f"{r['case']:<28} {r['provider']:<26} {r['p50_ms']:10.3f} {r['p20_ms']:10.3f} "
                  f"{r['p80_ms']:10.3f} {r['vs_baseline']:7.2f}x {cols}")
        now = _dt.datetime.now(_dt.timezone.utc)
        doc = dict(benchmark=self.name, device=device_name(self.device), device_type=torch.device(self.device).type,
                   threads=threads, date=now.isoformat(timespec="seconds"), commit=_git_commit(),
                   versions=_versions(), note=note, meta=self.meta, rows=self.rows)
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{self.name}-{torch.device(self.device).type}.json"
        _atomic_write_json(path, doc)
        print(f"wrote {path.relative_to(RESULTS.parent.parent)}")
        return path


def _fmt(v):
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _atomic_write_json(path: Path, doc):
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)
