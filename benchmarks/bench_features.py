"""Feature space on this CPU: neighbour search (cnnviz-fast FeatureIndex auto, faiss flat,
scikit-learn brute force) and t-SNE (openTSNE through cnnviz_fast.tsne, scikit-learn TSNE).

    PYTHONPATH=. python benchmarks/bench_features.py            # N = 100k, 1M; t-SNE 10k, 50k
    PYTHONPATH=. python benchmarks/bench_features.py --quick    # N = 20k; t-SNE 2k

Vectors: synthetic clustered float32, D=512, 1,000 Gaussian clusters (centres N(0, 1),
within-cluster sigma 0.5); 1,000 queries drawn fresh from the same clusters, k=10.
Search rows time the 1,000-query batch (p50 of repeated runs, torch Timer; QPS from p50);
build_s is one run of construction (for auto: staging, k-means, filling the lists and the
nprobe measurement); recall@10 is against faiss flat, itself checked against torch.cdist.
t-SNE rows are single runs (p20 = p50 = p80); scikit-learn's TSNE runs in a child process
killed after --sklearn-tsne-timeout seconds, reported as a lower bound.
"""
import argparse
import gc
import multiprocessing as mp
import time

import numpy as np
import torch

from _runner import BenchTable
from cnnviz_fast import FeatureIndex, tsne

D, CLUSTERS, K, QUERIES = 512, 1000, 10, 1000


def clustered(n, d, clusters, seed, sigma=0.5, chunk=100_000):
    """float32 [n, d] points of Gaussian clusters and their labels, generated in chunks."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(12345).standard_normal((clusters, d), dtype=np.float32)
    labels = rng.integers(0, clusters, n)
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        out[s:e] = centres[labels[s:e]] + sigma * rng.standard_normal((e - s, d), dtype=np.float32)
    return out, labels


def recall(found, truth):
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found.tolist(), truth.tolist())]))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def search_rows(table, n, x, q):
    import faiss
    from sklearn.neighbors import NearestNeighbors
    case = f"search N={n // 1000}k D={D} k={K}"
    xt, qt = torch.from_numpy(x), torch.from_numpy(q)

    flat, build = timed(lambda: faiss.IndexFlatL2(D))
    _, add_s = timed(lambda: flat.add(x))
    _, truth = flat.search(q, K)
    # correctness once: faiss flat against torch brute force on 50 queries
    ref = torch.cdist(qt[:50].double(), xt.double()).topk(K, largest=False).indices.numpy()
    assert recall(truth[:50], ref) >= 0.999, "faiss flat disagrees with torch.cdist"

    def add_row(provider, fn, build_s, found):
        row = table.add(case, provider, fn, min_run_time=2.0, build_s=build_s, recall10=recall(found, truth))
        row["QPS"] = QUERIES / (row["p50_ms"] / 1e3)
        return row

    nn_ = NearestNeighbors(n_neighbors=K, algorithm="brute")
    _, fit_s = timed(lambda: nn_.fit(x))
    found = nn_.kneighbors(q, K, return_distance=False)
    sk = add_row("sklearn brute", lambda: nn_.kneighbors(q, K), fit_s, found)
    del nn_
    add_row("faiss flat", lambda: flat.search(q, K), build + add_s, truth)
    del flat
    gc.collect()

    def build_auto():
        return FeatureIndex(D, kind="auto").add(xt).build()
    index, auto_s = timed(build_auto)
    found = index.search(qt, K).ids.numpy()
    row = add_row("cnnviz-fast auto", lambda: index.search(qt, K), auto_s, found)
    row.update(kind=index.built_kind, nprobe=index.nprobe, measured_recall=index.measured_recall,
               QPS_vs_sklearn=row["QPS"] / sk["QPS"])
    del index
    gc.collect()
    return row


def _sklearn_tsne(x, seed, conn):
    from sklearn.manifold import TSNE
    start = time.perf_counter()
    y = TSNE(2, perplexity=30, max_iter=750, init="pca", random_state=seed, n_jobs=2).fit_transform(x)
    conn.send((time.perf_counter() - start, y))


def knn_agreement(y, labels, k=5):
    """Share of each point's 5 nearest 2-D neighbours with its cluster label."""
    yt = torch.as_tensor(np.asarray(y), dtype=torch.float32)
    d = torch.cdist(yt, yt).fill_diagonal_(float("inf"))
    nearest = d.topk(k, largest=False).indices
    lab = torch.as_tensor(labels)
    return float((lab[nearest] == lab[:, None]).float().mean())


def single_run_row(table, case, provider, seconds, **extra):
    """A one-shot timing as a table row (too slow to repeat); the case's first row is its baseline."""
    ms = seconds * 1e3
    base = next((r["p50_ms"] for r in table.rows if r["case"] == case), ms)
    row = dict(case=case, provider=provider, p50_ms=ms, p20_ms=ms, p80_ms=ms, vs_baseline=base / ms, **extra)
    table.rows.append(row)
    print(f"  {case:<28} {provider:<26} {ms:10.1f} ms  {row['vs_baseline']:6.2f}x", flush=True)
    return row


def tsne_rows(table, n, timeout):
    x, labels = clustered(n, 50, 10, seed=7, sigma=1.5)
    case = f"tsne N={n // 1000}k D=50"
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_sklearn_tsne, args=(x, 0, child))
    proc.start()
    if parent.poll(timeout):
        seconds, y = parent.recv()
        single_run_row(table, case, "sklearn TSNE (bh)", seconds, knn5=knn_agreement(y, labels))
    else:
        single_run_row(table, case, "sklearn TSNE (bh)", float(timeout), knn5=None, note=f">{timeout}s, killed")
    proc.kill()
    proc.join()
    y, seconds = timed(lambda: tsne(torch.from_numpy(x), perplexity=30, seed=0))
    single_run_row(table, case, "cnnviz-fast tsne (openTSNE)", seconds, knn5=knn_agreement(y, labels))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N=20k and t-SNE 2k only")
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    parser.add_argument("--tsne-sizes", type=int, nargs="*", default=None)
    parser.add_argument("--sklearn-tsne-timeout", type=float, default=300.0)
    args = parser.parse_args()
    sizes = args.sizes or ([20_000] if args.quick else [100_000, 1_000_000])
    tsne_sizes = args.tsne_sizes if args.tsne_sizes is not None else ([2_000] if args.quick else [10_000, 50_000])
    table = BenchTable("features", "cpu", dim=D, clusters=CLUSTERS, queries=QUERIES, k=K, quick=args.quick)
    q, _ = clustered(QUERIES, D, CLUSTERS, seed=1)
    for n in sizes:
        x, _ = clustered(n, D, CLUSTERS, seed=0)
        search_rows(table, n, x, q)
        del x
        gc.collect()
    for n in tsne_sizes:
        tsne_rows(table, n, args.sklearn_tsne_timeout)
    table.report(note="shared machine (~8 engineers on 2 cores): timings are noisy")


if __name__ == "__main__":
    main()
