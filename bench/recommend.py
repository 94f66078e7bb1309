"""Recommend benchmark (in-process, no gRPC): latency of RankingEngine.recommend at the real
catalogue size, and nearest-neighbour retrieval on a 1M-item catalogue, HNSW vs exact.
Writes bench/results/recommend.{json,png}.

    .venv/bin/python bench/recommend.py [--requests 300] [--synthetic-items 1000000]

Part 1: the real Amazon Arts/Office catalogue (38,396 items, real vectors from the exported
encoder), 300 real users ingested into an in-process FusionEngine (SQLite, trained user
tower); Recommend (k=10, exact retrieval of the ranker's candidate count, trained ranker) for
random users and platforms; p50/p95/p99 of the whole call (profile fusion included).

Part 2: a 1M-item catalogue made from the real item vectors: each synthetic item is a real
vector plus Gaussian noise (sigma 0.05 per dimension before re-normalising), so its
neighbourhood structure is that of real titles (HNSW recall is meaningless on uniform random
vectors). Queries are real users' vectors. Exact = numpy matmul over all rows; HNSW = faiss
IndexHNSWFlat (M 32, efConstruction 200, efSearch 256). Reports build time, per-query latency
and recall@10 of HNSW against exact.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "gen"), str(REPO)]
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "1")

import numpy as np  # noqa: E402

from clients.datasets import AMAZON, item_texts, read_items, user_events  # noqa: E402
from export.item_vectors import item_vectors  # noqa: E402
from services.common import modelrepo  # noqa: E402
from services.common.remote import RemoteProfile  # noqa: E402
from services.fusion.engine import FusionEngine  # noqa: E402
from services.fusion.model import OnnxUserModel  # noqa: E402
from services.fusion.store import SQLiteStore  # noqa: E402
from services.ranking.catalog import Catalog, CatalogItem  # noqa: E402
from services.ranking.engine import Popularity, RankingEngine  # noqa: E402
from services.ranking.index import EXACT, HNSW, PlatformIndex  # noqa: E402
from services.ranking.ranker import OnnxRanker  # noqa: E402

RESULTS = REPO / "bench" / "results"


def percentiles(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"p50_ms": round(float(np.percentile(a, 50)), 3),
            "p95_ms": round(float(np.percentile(a, 95)), 3),
            "p99_ms": round(float(np.percentile(a, 99)), 3),
            "mean_ms": round(float(a.mean()), 3), "n": len(ms)}


def as_remote(fusion: FusionEngine):
    """FusionEngine.profile shaped like FusionRemote.profile (what ranking calls over gRPC)."""
    def profile(user_id, platform, session, recent_limit, budget_s):
        p = fusion.profile(user_id, platform, session, recent_limit, budget_s)
        recent = [(e.platform, e.item_id, e.item_text) for e, _, _ in p.recent]
        return RemoteProfile(
            known=p.known, for_platform=p.for_platform_vector, fused=p.fused,
            per_platform={v.platform: v.vector for v in p.platforms},
            counts={v.platform: v.event_count for v in p.platforms},
            weights={v.platform: v.fusion_weight for v in p.platforms}, recent=recent,
            recent_vectors=np.stack([v for _, v, _ in p.recent]) if p.recent else None,
            model=(fusion.model.name, fusion.model.version))
    return profile


def real_catalog_latency(repo: str, tmp: Path, n_requests: int, seed: int):
    keys, vectors = item_vectors(AMAZON, repo)
    lookup = {k: v for k, v in zip(keys, vectors)}
    rows = read_items(AMAZON)
    catalog = Catalog(tmp / "catalog.sqlite3", vectors.shape[1])
    items = [CatalogItem(r["item_id"], r["platform"], r["title"], r["attributes"], "")
             for r in rows]
    catalog.upsert(items, np.stack([lookup[(r["platform"], r["item_id"])] for r in rows]))
    store = SQLiteStore(tmp / "fusion.sqlite3")
    texts = item_texts(AMAZON)
    store.put_items({k: (texts[k], v) for k, v in lookup.items()})
    users = user_events(AMAZON, users=300)
    fusion = FusionEngine(store, lambda texts, budget=None: None,
                          OnnxUserModel(modelrepo.resolve(repo, "user_tower")), vectors.shape[1])
    for events in users.values():
        store.append(fusion.validate(events, "events"))
    popularity = Popularity(lambda p: store.item_stats(p, 100_000), catalog, 3600)
    popularity.refresh()
    engine = RankingEngine(catalog, None, as_remote(fusion),
                           OnnxRanker(modelrepo.resolve(repo, "ranker")), popularity)
    rng = random.Random(seed)
    ids = list(users)
    for _ in range(20):  # warm-up
        engine.recommend(rng.choice(ids), "office", 10)
    latencies = []
    for _ in range(n_requests):
        user, platform = rng.choice(ids), rng.choice(["office", "arts_crafts"])
        started = time.perf_counter()
        engine.recommend(user, platform, 10, exclude_seen=True)
        latencies.append((time.perf_counter() - started) * 1000)
    queries = [as_remote(fusion)(u, "office", [], 0, None).for_platform for u in ids[:200]]
    store.close()
    return {"catalogue_items": len(rows), "users": len(users), "k": 10,
            "candidates": engine.ranker.candidates,
            **percentiles(latencies)}, queries, vectors


def synthetic_ann(base: np.ndarray, queries: list[np.ndarray], n_items: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    print(f"  building a {n_items:,}-item catalogue from {len(base):,} real vectors", flush=True)
    vectors = np.empty((n_items, base.shape[1]), np.float32)
    for start in range(0, n_items, 100_000):
        n = min(100_000, n_items - start)
        chunk = base[rng.integers(0, len(base), n)] + rng.normal(0, 0.05, (n, base.shape[1]))
        vectors[start:start + n] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    ids = [str(i) for i in range(n_items)]
    out = {"items": n_items, "queries": len(queries), "k": 10}
    for kind in (EXACT, HNSW):
        started = time.perf_counter()
        index = PlatformIndex(base.shape[1], kind)
        index.upsert(ids, vectors)
        out[f"{kind}_build_s"] = round(time.perf_counter() - started, 1)
        print(f"  {kind}: built in {out[f'{kind}_build_s']} s", flush=True)
        latencies, results = [], []
        for q in queries:
            started = time.perf_counter()
            results.append(index.search(q, 10)[0])
            latencies.append((time.perf_counter() - started) * 1000)
        out[kind] = percentiles(latencies)
        out[f"{kind}_results"] = results
    exact, hnsw = out.pop(f"{EXACT}_results"), out.pop(f"{HNSW}_results")
    out["hnsw_recall_at_10"] = round(float(np.mean(
        [len(set(a) & set(b)) / 10 for a, b in zip(exact, hnsw)])), 4)
    out["hnsw_speedup_p50"] = round(out[EXACT]["p50_ms"] / out[HNSW]["p50_ms"], 1)
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    real = results["real_catalogue"]
    axes[0].bar(["p50", "p95", "p99"], [real["p50_ms"], real["p95_ms"], real["p99_ms"]])
    axes[0].set_ylabel("ms")
    axes[0].set_title(f"Recommend in-process, {real['catalogue_items']:,} real items")
    syn = results.get("synthetic_1m")
    if syn:
        kinds = [EXACT, HNSW]
        axes[1].bar([f"{k}\np50" for k in kinds] + [f"{k}\np99" for k in kinds],
                    [syn[k]["p50_ms"] for k in kinds] + [syn[k]["p99_ms"] for k in kinds],
                    color=["#4c72b0", "#dd8452"] * 2)
        axes[1].set_yscale("log")
        axes[1].set_ylabel("ms per query (log)")
        axes[1].set_title(f"top-10 of {syn['items']:,} items: HNSW recall@10 "
                          f"{syn['hnsw_recall_at_10']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--synthetic-items", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-repo", default=os.environ.get("CROSSREC_MODEL_REPO",
                                                               str(REPO / "models")))
    args = parser.parse_args(argv)
    results = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
               "git_sha": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                         capture_output=True, text=True).stdout.strip(),
               "cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine()}
    with tempfile.TemporaryDirectory() as tmp:
        print("real catalogue: in-process Recommend latency", flush=True)
        results["real_catalogue"], queries, base = real_catalog_latency(
            args.model_repo, Path(tmp), args.requests, args.seed)
        print(json.dumps(results["real_catalogue"]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "recommend.json").write_text(json.dumps(results, indent=2) + "\n")  # part 1 kept
    if args.synthetic_items:
        print("synthetic catalogue: HNSW vs exact", flush=True)
        results["synthetic_1m"] = synthetic_ann(base, queries, args.synthetic_items, args.seed)
        print(json.dumps(results["synthetic_1m"]), flush=True)
        results["targets"] = {"hnsw_recall_at_10": 0.95,
                              "met": results["synthetic_1m"]["hnsw_recall_at_10"] >= 0.95}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "recommend.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, RESULTS / "recommend.png")
    print(f"wrote {RESULTS / 'recommend.json'} and recommend.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
