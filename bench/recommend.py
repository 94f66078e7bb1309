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
vectors). Queries are real users' for_platform vectors: they sit far from every item (mean
best cosine 0.28; the 10th and 11th best differ by ~0.001), which makes approximate search
much harder than item-to-item queries, so the recall of each efSearch is swept too. Exact = numpy matmul over all rows;
HNSW = faiss IndexHNSWFlat with the serving defaults of services/ranking/index.py. Reports
build time, per-query search latency and recall of HNSW against exact at k = 10 and at the
ranker's candidate count, and the whole in-process Recommend (same users, fusion and ranker
as part 1; the 1M items as the office catalogue, in memory) on each index.
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
from services.ranking.catalog import Catalog, CatalogItem, MemoryCatalog  # noqa: E402
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


def recommend_latency(engine: RankingEngine, ids: list[str], platforms: list[str],
                      n_requests: int, seed: int) -> dict:
    rng = random.Random(seed)
    for _ in range(20):  # warm-up
        engine.recommend(rng.choice(ids), platforms[0], 10)
    latencies = []
    for _ in range(n_requests):
        user, platform = rng.choice(ids), rng.choice(platforms)
        started = time.perf_counter()
        engine.recommend(user, platform, 10, exclude_seen=True)
        latencies.append((time.perf_counter() - started) * 1000)
    return percentiles(latencies)


def real_catalog_latency(repo: str, tmp: Path, n_requests: int, seed: int):
    """Part 1; returns (results, profile function, user ids, ranker, popularity, vectors,
    fusion store to close)."""
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
    ranker = OnnxRanker(modelrepo.resolve(repo, "ranker"))
    profile = as_remote(fusion)
    engine = RankingEngine(catalog, None, profile, ranker, popularity)
    ids = list(users)
    result = {"catalogue_items": len(rows), "users": len(users), "k": 10,
              "candidates": ranker.candidates,
              "covisit_candidates": ranker.covisit_candidates,
              **recommend_latency(engine, ids, ["office", "arts_crafts"], n_requests, seed)}
    return result, profile, ids, ranker, popularity, vectors, store


def synthetic_catalogue(base: np.ndarray, n_items: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    print(f"  building a {n_items:,}-item catalogue from {len(base):,} real vectors", flush=True)
    vectors = np.empty((n_items, base.shape[1]), np.float32)
    for start in range(0, n_items, 100_000):
        n = min(100_000, n_items - start)
        chunk = base[rng.integers(0, len(base), n)] + rng.normal(0, 0.05, (n, base.shape[1]))
        vectors[start:start + n] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return vectors


def synthetic_ann(base: np.ndarray, profile, user_ids: list[str], ranker, popularity,
                  n_items: int, n_requests: int, seed: int) -> dict:
    """Part 2 (see the module docstring)."""
    vectors = synthetic_catalogue(base, n_items, seed)
    item_ids = [f"syn{i}" for i in range(n_items)]
    items = [CatalogItem(i, "office", f"synthetic item {n}", {}, "")
             for n, i in enumerate(item_ids)]
    queries = [profile(u, "office", [], 0, None).for_platform for u in user_ids[:200]]
    probe = PlatformIndex(base.shape[1], HNSW)
    out = {"items": n_items, "queries": len(queries), "recall_ks": [10, ranker.candidates],
           "hnsw": {"M": probe.hnsw_m, "efConstruction": probe.ef_construction,
                    "efSearch": probe.ef_search}}
    results = {}
    for kind in (EXACT, HNSW):
        started = time.perf_counter()
        # In memory only: this part measures retrieval and ranking, not durability.
        catalog = MemoryCatalog(base.shape[1], index=kind)
        for c0 in range(0, n_items, 100_000):
            catalog._apply_upsert(items[c0:c0 + 100_000], vectors[c0:c0 + 100_000])
            print(f"    {kind}: {min(c0 + 100_000, n_items):,} items indexed, "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
        out[f"{kind}_build_s"] = round(time.perf_counter() - started, 1)
        index = catalog.index("office")
        for k in out["recall_ks"]:
            latencies, found = [], []
            for q in queries:
                t = time.perf_counter()
                found.append(index.search(q, k)[0])
                latencies.append((time.perf_counter() - t) * 1000)
            out[f"{kind}_search_k{k}"] = percentiles(latencies)
            results[(kind, k)] = found
        if kind == HNSW:
            out["hnsw_ef_sweep"] = ef_sweep(index, queries, out["recall_ks"], results)
        engine = RankingEngine(catalog, None, profile, ranker, popularity)
        out[f"{kind}_recommend"] = recommend_latency(engine, user_ids, ["office"],
                                                     n_requests, seed)
        print(f"  {kind}: built in {out[f'{kind}_build_s']} s; search k=10 p50 "
              f"{out[f'{kind}_search_k10']['p50_ms']} ms; Recommend p50 "
              f"{out[f'{kind}_recommend']['p50_ms']} ms", flush=True)
        del catalog, index, engine
    for k in out["recall_ks"]:
        out[f"hnsw_recall_at_{k}"] = round(float(np.mean(
            [len(set(a) & set(b)) / k for a, b in zip(results[(EXACT, k)],
                                                      results[(HNSW, k)])])), 4)
        out[f"hnsw_search_speedup_p50_k{k}"] = round(
            out[f"{EXACT}_search_k{k}"]["p50_ms"] / out[f"{HNSW}_search_k{k}"]["p50_ms"], 1)
    out["hnsw_recommend_speedup_p50"] = round(
        out[f"{EXACT}_recommend"]["p50_ms"] / out[f"{HNSW}_recommend"]["p50_ms"], 2)
    return out


EF_SWEEP = (128, 512, 2048, 8192)


def ef_sweep(index: PlatformIndex, queries, ks: list[int], results: dict) -> list[dict]:
    """HNSW recall against exact (results[(EXACT, k)]) and search latency at each efSearch:
    the price of recall on this index. Leaves the index's efSearch as it was."""
    default, rows = index.ef_search, []
    for ef in EF_SWEEP:
        index.ef_search = ef
        for k in ks:
            latencies, recall = [], []
            for q, want in zip(queries, results[(EXACT, k)]):
                t = time.perf_counter()
                got = index.search(q, k)[0]
                latencies.append((time.perf_counter() - t) * 1000)
                recall.append(len(set(got) & set(want)) / k)
            rows.append({"ef_search": max(ef, k), "k": k, "recall": round(float(np.mean(recall)), 4),
                         **percentiles(latencies)})
            print(f"    efSearch {max(ef, k)}: recall@{k} {rows[-1]['recall']:.3f}, p50 "
                  f"{rows[-1]['p50_ms']} ms", flush=True)
    index.ef_search = default
    return rows


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    real = results["real_catalogue"]
    axes[0].bar(["p50", "p95", "p99"], [real["p50_ms"], real["p95_ms"], real["p99_ms"]])
    axes[0].set_ylabel("ms")
    axes[0].set_title(f"Recommend in-process, {real['catalogue_items']:,} real items")
    syn = results.get("synthetic_1m")
    if syn:
        k = syn["recall_ks"][-1]
        labels = ["search k=10", f"search k={k}", "Recommend"]
        keys = ["search_k10", f"search_k{k}", "recommend"]
        x = np.arange(len(labels))
        for n, kind in enumerate([EXACT, HNSW]):
            axes[1].bar(x + (n - 0.5) * 0.38, [syn[f"{kind}_{key}"]["p50_ms"] for key in keys],
                        0.38, label=f"{kind} p50")
        axes[1].set_xticks(x, labels)
        axes[1].set_yscale("log")
        axes[1].set_ylabel("ms (log)")
        axes[1].legend()
        axes[1].set_title(f"{syn['items']:,} items: HNSW recall@10 "
                          f"{syn['hnsw_recall_at_10']:.3f}, @{k} {syn[f'hnsw_recall_at_{k}']:.3f}")
        sweep = syn.get("hnsw_ef_sweep", [])
        for k in syn["recall_ks"]:
            pts = [r for r in sweep if r["k"] == k]
            axes[2].plot([r["p50_ms"] for r in pts], [r["recall"] for r in pts], "o-",
                         label=f"recall@{k}")
            for r in pts:
                axes[2].annotate(f"ef {r['ef_search']}", (r["p50_ms"], r["recall"]),
                                 fontsize=7)
        axes[2].axhline(0.95, color="grey", ls="--", lw=1)
        axes[2].axvline(syn[f"{EXACT}_search_k10"]["p50_ms"], color="red", ls=":", lw=1,
                        label="exact search p50")
        axes[2].set_xscale("log")
        axes[2].set_xlabel("HNSW search p50 (ms, log)")
        axes[2].set_ylabel("recall vs exact")
        axes[2].legend(fontsize=8)
        axes[2].set_title("HNSW: recall bought by efSearch")
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
        results["real_catalogue"], profile, users, ranker, popularity, base, store = \
            real_catalog_latency(args.model_repo, Path(tmp), args.requests, args.seed)
        print(json.dumps(results["real_catalogue"]), flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "recommend.json").write_text(json.dumps(results, indent=2) + "\n")  # kept
        if args.synthetic_items:
            print("synthetic catalogue: HNSW vs exact", flush=True)
            results["synthetic_1m"] = synthetic_ann(base, profile, users, ranker, popularity,
                                                    args.synthetic_items, args.requests,
                                                    args.seed)
            print(json.dumps(results["synthetic_1m"]), flush=True)
            results["targets"] = {"hnsw_recall_at_10": 0.95,
                                  "met": results["synthetic_1m"]["hnsw_recall_at_10"] >= 0.95}
        store.close()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "recommend.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, RESULTS / "recommend.png")
    print(f"wrote {RESULTS / 'recommend.json'} and recommend.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
