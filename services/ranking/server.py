"""Ranking gRPC server: `python -m services.ranking.server --port 0 --port-file F`; with
--processes N (default: the cores it may use), N worker processes on the port."""

from __future__ import annotations

import os

# Candidate features are small matmuls: BLAS worker threads cost more than they save here
# (measured 21 ms vs 2.7 ms per request) and steal the cores gRPC needs. Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import dataclasses
import logging
import sys
from dataclasses import dataclass

from crossrec.common.v1 import common_pb2
from crossrec.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from recmodel import modelrepo
from services.common import flags, metrics
from services.common.admission import Admission
from services.common.errors import NotReady
from services.common.remote import EmbeddingRemote, FusionRemote
from services.common.flags import ServerConfig, flag, none_if_zero
from services.common.serve import (client_security, engine_call, serve, setup_logging,
                                   wait_for)
from services.common.validation import RawEvents
from services.common.workers import default_processes, supervise
from recmodel import attribution
from services.ranking.catalog import Catalog
from services.ranking.sqlite_catalog import SQLiteCatalog
from services.ranking.engine import (CROSS_PLATFORM, PERSONALISED, POPULARITY, Popularity,
                                     RankingEngine)
from recmodel.ranker import OnnxRanker, Ranker, RetrievalOrder

log = logging.getLogger("crossrec.ranking")
DEFAULT_PORT = 50053
# Worker processes also apply each other's catalogue writes this often in the background
# (every Recommend does first anyway), so that one no connection reaches stays current.
CATALOG_FOLLOW_S = 1.0
# RPCs accepted at once per worker: no more than its handler threads (64), so that no call
# waits in the thread pool's queue behind the admission queue; gRPC refuses the rest before
# any Python handler runs (bench/overload.py, services/ranking/README.md "Refusals").
MAX_CONCURRENT_RPCS = 64
# recmodel/attribution.py's group names -> crossrec.ranking.v1.Driver
DRIVERS = {attribution.TEXT: ranking_pb2.DRIVER_TEXT,
           attribution.COVISIT: ranking_pb2.DRIVER_COVISIT,
           attribution.POPULARITY: ranking_pb2.DRIVER_POPULARITY,
           attribution.HISTORY: ranking_pb2.DRIVER_HISTORY}
# The engine's sources -> crossrec.ranking.v1.Source
SOURCES = {PERSONALISED: ranking_pb2.SOURCE_PERSONALISED,
           CROSS_PLATFORM: ranking_pb2.SOURCE_CROSS_PLATFORM,
           POPULARITY: ranking_pb2.SOURCE_POPULARITY_FALLBACK}


@dataclass(frozen=True)
class Config:
    """The ranking service's own flags (the shared ones: ServerConfig)."""

    processes: int = flag(help="worker processes serving the port (SO_REUSEPORT), each with "
                          "its own engine, catalogue copy, --threads and admission limits; "
                          "default: the cores this process may use (os.sched_getaffinity). 1: "
                          "one process, no supervising parent", default_factory=default_processes)
    catalog_store: str = flag("sqlite", "catalogue backend: sqlite (one file: this replica's "
                              "worker processes) or redis (shared by every replica)")
    catalog_path: str = flag("var/ranking/catalog.sqlite3",
                             "catalogue SQLite file (--catalog-store sqlite)")
    catalog_redis_url: str = flag("redis://127.0.0.1:6379/0",
                                  "Redis holding the shared catalogue (--catalog-store redis); "
                                  "redis+cluster://HOST:PORT for a Redis Cluster (the "
                                  "catalogue is one slot)")
    embedding_address: str = flag("127.0.0.1:50051", "embedding service host:port")
    fusion_address: str = flag("127.0.0.1:50052", "fusion service host:port")
    model_repo: str = flag("models", "model repository directory")
    model_version: int | None = flag(0, "ranker version; 0 = the highest", convert=none_if_zero)
    allow_no_ranker: bool = flag(False, "without a trained ranker, keep the retrieval order "
                                 "instead of refusing to start")
    index: str = flag("auto", "auto (pca up to --hnsw-threshold items, hnsw above; see "
                      "recmodel/index.py), exact, pca, fp16, sq8, ivf or hnsw")
    hnsw_threshold: int = flag(200_000, "items per platform above which auto is HNSW")
    max_k: int = flag(1000, "largest k a Recommend call may ask for")
    fusion_fallback: bool = flag(False, "when fusion is unreachable, answer with popular items "
                                 "flagged degraded instead of UNAVAILABLE")
    popularity_refresh_s: float = flag(10.0, "how often item popularity is re-read")
    dependency_wait_s: float = flag(120.0, "how long to wait at start for embedding")
    max_active_recommends: int = flag(4, "Recommend calls computed at once per worker process "
                                      "(the engine holds the GIL: more only adds contention, "
                                      "see services/common/admission.py)")
    max_waiting_recommends: int = flag(32, "Recommend calls waiting for a slot at most, per "
                                       "worker process (each within its deadline); more are "
                                       "refused with RESOURCE_EXHAUSTED")

    def __post_init__(self):
        if self.processes < 1:
            raise ValueError(f"--processes must be at least 1, got {self.processes}")


def open_catalog(config: Config, dim: int, projection=None) -> Catalog:
    """The catalogue backend; `projection` is the ranker's retrieval projection (index pca)."""
    if config.catalog_store == "sqlite":
        return SQLiteCatalog(config.catalog_path, dim, config.index, config.hnsw_threshold,
                             projection)
    if config.catalog_store == "redis":
        from services.ranking.redis_catalog import RedisCatalog
        return RedisCatalog(config.catalog_redis_url, dim, config.index, config.hnsw_threshold,
                            projection=projection)
    raise ValueError(f"--catalog-store must be sqlite or redis, got {config.catalog_store!r}")


def load_ranker(config: Config) -> Ranker:
    try:
        return OnnxRanker(modelrepo.resolve(config.model_repo, "ranker", config.model_version))
    except FileNotFoundError as err:
        if not config.allow_no_ranker:
            raise SystemExit(f"{err}. Refusing to start without a trained ranker; pass "
                             "--allow-no-ranker to keep the retrieval order instead") from None
        log.warning("no trained ranker: candidates keep their retrieval order")
        return RetrievalOrder()


# A ranker whose co-visit counts know fewer of the stored catalogue's items than this share
# was trained for another catalogue: its co-visit features would be zeros for nearly every
# candidate, and its scores meaningless. A catalogue of fewer than MIN_JUDGED_ITEMS is not
# judged (tests and demos run the real ranker over a few made-up items).
MIN_KNOWN_SHARE, MIN_JUDGED_ITEMS = 0.5, 1000


def check_trained_for(ranker: Ranker, catalog: Catalog) -> None:
    """Refuse (ValueError) a ranker trained for another catalogue than the one stored: when
    most stored items are unknown to its co-visit counts. An empty catalogue passes (it is
    being loaded), and so does one below MIN_JUDGED_ITEMS; new items unknown to the counts
    are normal, a minority of them."""
    covisit = ranker.covisit
    platforms = catalog.platforms()
    total = sum(catalog.size(p) for p in platforms)
    if covisit is None or total < MIN_JUDGED_ITEMS:
        return
    known = sum((p, i) in covisit.row_of for p in platforms for i in catalog.item_ids(p))
    if known < MIN_KNOWN_SHARE * total:
        raise ValueError(
            f"ranker v{ranker.version} was trained on {ranker.meta.get('dataset', '?')!r} "
            f"({len(covisit):,} items), but only {known:,} of this catalogue's {total:,} items "
            "are among them: it was trained for another catalogue. Export a ranker for this "
            "one (make models DATASET=...) or point --model-repo at its models")


class RankingServicer(ranking_pb2_grpc.RankingServiceServicer):
    def __init__(self, admission: Admission | None = None):
        self.engine: RankingEngine | None = None
        self.admission = admission or Admission("recommend", 4, 32)

    def _ready(self) -> RankingEngine:
        if self.engine is None:
            raise NotReady("ranking service is still loading")
        return self.engine

    def UpsertItems(self, request, context):
        raw = [dict(item_id=i.item_id, platform=i.platform, title=i.title,
                    attributes=dict(i.attributes)) for i in request.items]
        n = engine_call(context, lambda: self._ready().upsert_items(raw, context.time_remaining()))
        return ranking_pb2.UpsertItemsResponse(upserted=n)

    def DeleteItems(self, request, context):
        n = engine_call(context, lambda: self._ready().delete_items(
            request.platform, list(request.item_ids), context.time_remaining()))
        return ranking_pb2.DeleteItemsResponse(deleted=n)

    def _recommend(self, request, context):
        with self.admission.slot(context.time_remaining()):
            engine = self._ready()
            engine.catalog.refresh()  # what other worker processes acknowledged: served now
            return engine.recommend(
                request.user_id, request.platform, request.k, request.exclude_seen,
                RawEvents(request.session_events), request.diversify, request.diversity_lambda,
                context.time_remaining())

    def Recommend(self, request, context):
        result = engine_call(context, self._recommend, request, context)
        return ranking_pb2.RecommendResponse(
            items=[ranking_pb2.Recommendation(
                item_id=r.item_id, platform=request.platform, title=r.title, score=r.score,
                source=SOURCES[r.source], explanation=r.explanation,
                contributions=[ranking_pb2.Contribution(platform=p, item_id=i, item_text=t,
                                                        similarity=s, co_users=n)
                               for p, i, t, s, n in r.contributions],
                driver=DRIVERS.get(r.driver, ranking_pb2.DRIVER_UNSPECIFIED),
                attributions=[ranking_pb2.Attribution(driver=DRIVERS[g], contribution=v)
                              for g, v in r.attributions])
                for r in result.items],
            source=SOURCES[result.source], platform_weights=result.platform_weights,
            models=[common_pb2.ModelRef(name=n, version=v) for n, v in result.models if n],
            degraded=result.degraded, degraded_reason=result.degraded_reason)


def parse_args(argv=None) -> tuple[ServerConfig, Config]:
    return flags.parse(argv, ServerConfig, Config, description=__doc__,
                       defaults={"port": DEFAULT_PORT, "max_concurrent_rpcs": MAX_CONCURRENT_RPCS})


def main(argv=None) -> int:
    server_config, config = parse_args(argv)
    setup_logging(server_config.log_level)
    log.info("config", extra={"fields": {**vars(config), "threads": server_config.threads}})
    if config.processes == 1:
        return run(server_config, config)

    def run_worker(worker, port: int) -> int:
        setup_logging(server_config.log_level, worker=worker.index)
        return run(dataclasses.replace(server_config, port=port), config, worker)

    return supervise("ranking", config.processes, server_config, run_worker)


def run(server_config: ServerConfig, config: Config, worker=None) -> int:
    """One ranking server process: the only one, or one of the workers (`worker`)."""
    ranker = load_ranker(config)
    servicer = RankingServicer(Admission("recommend", config.max_active_recommends,
                                         config.max_waiting_recommends))

    def register(server):
        ranking_pb2_grpc.add_RankingServiceServicer_to_server(servicer, server)
        return [ranking_pb2.DESCRIPTOR.services_by_name["RankingService"].full_name]

    def load():
        security = client_security(server_config)
        embed = EmbeddingRemote(config.embedding_address, security)
        name, version, dim = wait_for(embed.model, config.dependency_wait_s,
                                      f"embedding service at {config.embedding_address}")
        fusion = FusionRemote(config.fusion_address, security)
        catalog = open_catalog(config, dim, ranker.projection)
        check_trained_for(ranker, catalog)
        if worker is not None:
            catalog.follow(CATALOG_FOLLOW_S)
        popularity = Popularity(fusion.item_stats, catalog, config.popularity_refresh_s)
        popularity.start()
        servicer.engine = RankingEngine(catalog, embed, fusion.profile, ranker, popularity,
                                        max_k=config.max_k,
                                        fusion_fallback=config.fusion_fallback,
                                        embedder=(name, version))
        metrics.MODEL_INFO.labels("ranking", ranker.name).info({"version": str(ranker.version)})
        metrics.MODEL_VERSION.labels("ranking", ranker.name).set(ranker.version)
        for platform in catalog.platforms():
            metrics.CATALOG_ITEMS.labels(platform).set(catalog.size(platform))
        log.info("catalogue loaded", extra={"fields": {
            p: catalog.size(p) for p in catalog.platforms()}})
        return servicer.engine

    return serve("ranking", server_config, register, load, worker=worker)


if __name__ == "__main__":
    sys.exit(main())
