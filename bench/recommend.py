"""Recommend benchmark (in-process, no gRPC): latency of RankingEngine.recommend at the real
catalogue size, and the retrieval index kinds compared by what users see: the end NDCG@10 of
the whole Recommend pipeline on the validation users. Writes bench/results/recommend.{json,png}.

    .venv/bin/python -m bench.recommend [--requests 300] [--synthetic-items 1000000]

Part 1: the real Amazon Arts/Office catalogue (38,396 items, real vectors from the exported
encoder), 300 real users ingested into an in-process FusionEngine (SQLite, trained user
tower); Recommend (k=10, the serving default index, trained ranker) for random users and
platforms; p50/p95/p99 of the whole call (profile fusion included).

Part 2: every index kind of recmodel/index.py (exact float32, pca, fp16, sq8, ivf,
hnsw) under services/ranking/pipeline.rank with the trained tower and ranker, on the protocol-A
validation cases (warm and cold platform, as `make evaluate`): NDCG@10 and HR@10 of the whole
pipeline, relative to exact float32, and the latency of the search for the ranker's 1,000
candidates. Then the same at --synthetic-items on the office platform: its real items plus
synthetic ones, each a real vector plus Gaussian noise (sigma 0.05 per dimension before
re-normalising), so the neighbourhood structure is that of real titles, with the office cases
(their targets are real items, the synthetic ones are distractors). The queries are real
users' for_platform vectors, which sit far from every item (the 10th and 11th best differ by
~0.001): a recall@10 of near-tied neighbours says little, the end NDCG@10 says what users get.
"""

from __future__ import annotations

import os

# Idle BLAS workers must not spin on the shared cores between timed calls.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "1")

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import (MODEL_REPO, RESULTS, command_line, cpu_model, git_sha, percentiles,
                          write_results)
from dataio import AMAZON, item_texts, read_items, user_events
from export.item_vectors import item_vectors
from recmodel import modelrepo, pipeline
from recmodel.index import (EXACT, HNSW, IVF, IVF_NPROBE, KINDS, PCA, PCA_SHORTLIST, SQ_RESCORE,
                            PlatformIndex)
from recmodel.ranker import OnnxRanker
from recmodel.user_model import OnnxUserModel
from services.common.remote import RemoteProfile
from services.fusion.engine import FusionEngine
from services.fusion.sqlite_store import SQLiteProfileStore
from services.ranking.catalog import CatalogItem
from services.ranking.sqlite_catalog import SQLiteCatalog
from services.ranking.engine import Popularity, RankingEngine


def latency(ms: list[float]) -> dict:
    """Percentiles, mean and count of latencies in milliseconds."""
    return {**percentiles(ms), "mean_ms": round(float(np.mean(ms)), 3), "n": len(ms)}


def as_remote(fusion: FusionEngine):
    """FusionEngine.profile shaped like FusionRemote.profile (what ranking calls over gRPC)."""
    def profile(user_id, platform, session, recent_limit, budget_s, item_vectors=True):
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
    return latency(latencies)


def real_catalog_latency(repo: str, tmp: Path, n_requests: int, seed: int):
    """Part 1; returns (results, profile function, user ids, ranker, popularity, vectors,
    fusion store to close)."""
    keys, vectors = item_vectors(AMAZON, repo)
    lookup = {k: v for k, v in zip(keys, vectors)}
    rows = read_items(AMAZON)
    ranker = OnnxRanker(modelrepo.resolve(repo, "ranker"))
    catalog = SQLiteCatalog(tmp / "catalog.sqlite3", vectors.shape[1], projection=ranker.projection)
    items = [CatalogItem(r["item_id"], r["platform"], r["title"], r["attributes"], "")
             for r in rows]
    catalog.upsert(items, np.stack([lookup[(r["platform"], r["item_id"])] for r in rows]))
    store = SQLiteProfileStore(tmp / "fusion.sqlite3")
    texts = item_texts(AMAZON)
    store.put_items({k: (texts[k], v) for k, v in lookup.items()})
    users = user_events(AMAZON, users=300)
    fusion = FusionEngine(store, lambda texts, budget=None: None,
                          OnnxUserModel(modelrepo.resolve(repo, "user_tower")), vectors.shape[1])
    for events in users.values():
        store.append(fusion.validate(events, "events"))
    popularity = Popularity(lambda p: store.item_stats(p, 100_000), catalog, 3600)
    popularity.refresh()
    profile = as_remote(fusion)
    engine = RankingEngine(catalog, None, profile, ranker, popularity)
    ids = list(users)
    result = {"catalogue_items": len(rows), "users": len(users), "k": 10,
              "index": catalog.index("office").kind,
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


def end_quality(tables: dict, contexts: list, targets: list[int], ranker, k: int = 10) -> dict:
    """NDCG@10 / HR@10 of the whole served pipeline (pipeline.rank: retrieval by each table's
    index, co-visit merge, features, the trained ranker) over (user context, target row)
    cases, and the p50/p99 of the retrieval search itself (1,000 candidates)."""
    gains, hits, search_ms = [], [], []
    for ctx, target in zip(contexts, targets):
        table = tables[ctx.target_platform]
        t = time.perf_counter()
        table.snapshot.search(ctx.for_platform, ranker.candidates)
        search_ms.append((time.perf_counter() - t) * 1000)
        ranked = pipeline.rank(ctx, table, ranker.covisit, ranker, ranker.candidates,
                               ranker.covisit_candidates)
        hit = np.flatnonzero(ranked.rows[:k] == target)
        gains.append(1 / np.log2(hit[0] + 2) if len(hit) else 0.0)
        hits.append(bool(len(hit)))
    return {"ndcg@10": round(float(np.mean(gains)), 5), "hr@10": round(float(np.mean(hits)), 5),
            "cases": len(gains), "search": latency(search_ms)}


def index_tables(data, kind: str, extra: dict | None = None) -> dict:
    """Per platform the pipeline table on an index of `kind` (recmodel/index.py) over
    the real catalogue, plus `extra[platform]` = synthetic vectors appended after it."""
    tables = {}
    for p, rows in data.catalogue.items():
        index = PlatformIndex(data.vecs.shape[1], kind, projection=data.projection)
        ids = [data.ids[r][1] for r in rows]
        index.upsert(ids, data.vecs[rows])
        counts = data.counts[rows]
        more = (extra or {}).get(p)
        if more is not None:
            for c0 in range(0, len(more), 100_000):
                part = more[c0:c0 + 100_000]
                index.upsert([f"syn{c0 + i}" for i in range(len(part))], part)
            counts = np.concatenate([counts, np.zeros(len(more))])
        tables[p] = pipeline.item_table(p, index.snapshot(), counts, data.covisit)
    return tables


def index_comparison(repo: str, n_items: int, cases_per_setting: int, big_cases: int,
                     seed: int) -> dict:
    """Part 2 (see the module docstring): each index kind by the end NDCG@10 of the whole
    Recommend pipeline against exact float32, at the real catalogue and at n_items."""
    from export import cases as ev
    from export import rank_data as rk

    data = ev.default_data(repo)
    ranker = OnnxRanker(modelrepo.resolve(repo, "ranker"))
    data = rk.replace(data, covisit=ranker.covisit, projection=ranker.projection)
    tower = rk.load_user_model(repo)
    cases = []
    users = ev.validation_users(data)
    for setting in ("warm", "cold"):
        cases += ev.build_cases("A", setting, users, data)[:cases_per_setting]
    contexts = [rk.user_context(tower, data, c.query) for c in cases]
    targets = [data.local[c.query.target_row] for c in cases]
    out = {"real": {"items": len(data.ids), "cases": len(cases), "kinds": {}}}
    all_tables = {}
    for kind in KINDS:
        started = time.perf_counter()
        all_tables[kind] = tables = index_tables(data, kind)
        build_s = time.perf_counter() - started
        out["real"]["kinds"][kind] = {"build_s": round(build_s, 1),
                                      "searched_as": searched_as(tables),
                                      **end_quality(tables, contexts, targets, ranker)}
        print(f"  {kind:6s} real catalogue: {out['real']['kinds'][kind]}", flush=True)
    # Latency again with the kinds interleaved query by query, so every kind sees the same
    # machine load (the 2 cores are shared): the figures to compare kinds by.
    interleaved = {kind: [] for kind in KINDS}
    for ctx in contexts:
        for kind in KINDS:
            snap = all_tables[kind][ctx.target_platform].snapshot
            t = time.perf_counter()
            snap.search(ctx.for_platform, ranker.candidates)
            interleaved[kind].append((time.perf_counter() - t) * 1000)
    for kind in KINDS:
        out["real"]["kinds"][kind]["search_interleaved"] = latency(interleaved[kind])
    del all_tables
    relative(out["real"]["kinds"])
    if not n_items:
        return out
    # n_items on the office platform: its real items plus synthetic ones (real vectors plus
    # noise); office cases only, so every query searches the large index.
    office = [i for i, c in enumerate(cases) if c.platform == "office"][:big_cases]
    n_real = len(data.catalogue["office"])
    synthetic = synthetic_catalogue(data.vecs, n_items - n_real, seed)
    big = {"items": n_items, "platform": "office", "cases": len(office), "kinds": {}}
    for kind in (EXACT, IVF, HNSW, PCA):
        started = time.perf_counter()
        tables = index_tables(data, kind, {"office": synthetic})
        build_s = time.perf_counter() - started
        big["kinds"][kind] = {"build_s": round(build_s, 1), "searched_as": searched_as(tables),
                              **end_quality(
            tables, [contexts[i] for i in office], [targets[i] for i in office], ranker)}
        print(f"  {kind:6s} {n_items:,} items: {big['kinds'][kind]}", flush=True)
        del tables
    relative(big["kinds"])
    out["synthetic"] = big
    return out


def searched_as(tables: dict) -> str:
    """The kind the tables' snapshots search with (ivf below IVF_MIN_ROWS rows is exact)."""
    kinds = {t.snapshot.kind if t.snapshot.faiss is not None or t.snapshot.kind in (EXACT, PCA)
             else EXACT for t in tables.values()}
    return ",".join(sorted(kinds))


def relative(kinds: dict) -> None:
    """Each kind's NDCG@10 relative to exact float32's, in place."""
    exact = kinds[EXACT]["ndcg@10"]
    for row in kinds.values():
        row["ndcg_vs_exact"] = round(row["ndcg@10"] / exact - 1, 4) if exact else None


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    parts = [("real", "real catalogue")] + ([("synthetic", "synthetic")]
                                            if "synthetic" in results["indexes"] else [])
    fig, axes = plt.subplots(1, len(parts), figsize=(7 * len(parts), 4.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], parts):
        part = results["indexes"][key]
        for kind, row in part["kinds"].items():
            ax.scatter(row["search"]["p99_ms"], row["ndcg@10"], s=40)
            ax.annotate(f"{kind} ({row['ndcg_vs_exact']:+.1%})",
                        (row["search"]["p99_ms"], row["ndcg@10"]), fontsize=8)
        exact = part["kinds"][EXACT]["ndcg@10"]
        ax.axhline(exact * 0.99, color="grey", ls="--", lw=1, label="exact - 1%")
        ax.set_xscale("log")
        ax.set_xlabel("search p99, 1,000 candidates (ms, log)")
        ax.set_ylabel("end NDCG@10 of Recommend")
        ax.set_title(f"{label}: {part['items']:,} items, {part['cases']} cases")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--synthetic-items", type=int, default=1_000_000)
    parser.add_argument("--cases", type=int, default=1716,
                        help="validation cases per setting (warm, cold) at the real catalogue")
    parser.add_argument("--synthetic-cases", type=int, default=300,
                        help="office cases ranked against the synthetic catalogue")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-repo", default=MODEL_REPO)
    args = parser.parse_args(argv)
    results = {"command": command_line(), "git_sha": git_sha(),
               "cpus": os.cpu_count(), "cpu": cpu_model(),
               "index_params": {"pca_shortlist": PCA_SHORTLIST, "sq_rescore": SQ_RESCORE,
                                "ivf_nprobe": IVF_NPROBE, "hnsw_ef_search": 128}}
    with tempfile.TemporaryDirectory() as tmp:
        print("real catalogue: in-process Recommend latency", flush=True)
        results["real_catalogue"], *_, store = real_catalog_latency(
            args.model_repo, Path(tmp), args.requests, args.seed)
        print(json.dumps(results["real_catalogue"]), flush=True)
        store.close()
    print("index kinds by the end NDCG@10 of Recommend", flush=True)
    results["indexes"] = index_comparison(args.model_repo, args.synthetic_items, args.cases,
                                          args.synthetic_cases, args.seed)
    write_results(RESULTS / "recommend.json", results)
    plot(results, RESULTS / "recommend.png")
    print(f"wrote {RESULTS / 'recommend.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
