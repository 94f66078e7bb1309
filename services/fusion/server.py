"""Fusion gRPC server: `python -m services.fusion.server --port 0 --port-file F`."""

from __future__ import annotations

import os

# The hot path's numpy work is small (one user's events); BLAS worker threads would only
# compete with gRPC and ONNX Runtime for the cores. Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import logging
import sys
from dataclasses import dataclass

from crossrec.common.v1 import common_pb2
from crossrec.fusion.v1 import fusion_pb2, fusion_pb2_grpc
from recmodel import modelrepo
from services.common import flags, metrics
from services.common.errors import NotReady
from services.common.remote import EmbeddingRemote
from services.common.security import ConfigError, read_secret
from services.common.flags import ServerConfig, flag, none_if_zero
from services.common.serve import (client_security, engine_call, serve, setup_logging,
                                   wait_for)
from services.common.wire import packed_floats
from services.common.validation import RawEvents
from services.fusion.engine import MAX_NEW_SESSION_TEXTS, FusionEngine, Profile
from recmodel.user_model import BaselineUserModel, OnnxUserModel
from services.fusion.pseudonym import MIN_KEY_CHARS, PseudonymousStore
from services.fusion.sqlite_store import SQLiteProfileStore
from services.fusion.store import ProfileStore

log = logging.getLogger("crossrec.fusion")
DEFAULT_PORT = 50052


@dataclass(frozen=True)
class Config:
    """The fusion service's own flags (the shared ones: ServerConfig)."""

    store: str = flag("sqlite", "profile store backend: sqlite or redis")
    sqlite_path: str = flag("var/fusion/profiles.sqlite3", "SQLite database file")
    redis_url: str = flag("redis://127.0.0.1:6379/0",
                          "Redis URL (--store redis): redis://, rediss://, unix:// for one "
                          "server; redis+cluster://HOST:PORT (rediss+cluster://) for a Redis "
                          "Cluster seeded by that node")
    redis_replica_acks: int = flag(0, "acknowledge an Ingest only once its writes reached this "
                                   "many replicas of each primary holding them (WAIT, 1 s); 0 = "
                                   "once fsynced on the primary")
    embedding_address: str = flag("127.0.0.1:50051", "embedding service host:port")
    model_repo: str = flag("models", "model repository directory")
    model_version: int | None = flag(0, "user_tower version; 0 = the highest",
                                     convert=none_if_zero)
    allow_baseline: bool = flag(False, "serve the untrained time-decayed mean pooling if no "
                                "user model is exported")
    max_queue_batches: int = flag(1024, "ingest batches waiting for commit at most; more: "
                                  "RESOURCE_EXHAUSTED")
    item_cache_items: int = flag(50_000, "item vectors kept in memory (about 2 KB each) so that "
                                 "profile reads skip the store; SQLite only (a Redis store may "
                                 "be written by other replicas); 0 = off")
    session_cache_items: int = flag(10_000, "vectors of session items the store does not hold, "
                                    "kept in memory (up to ~4 KB each with their text) so that "
                                    "a repeated session embeds nothing; 0 = off")
    max_new_session_texts: int = flag(MAX_NEW_SESSION_TEXTS, "distinct session items per "
                                      "GetProfile/Recommend whose text may be embedded during "
                                      "the call; more: INVALID_ARGUMENT")
    user_vector_cache_items: int = flag(10_000, "user-model answers kept in memory (about 7 KB "
                                        "each), keyed by a digest of the model's whole input, "
                                        "so a profile whose window is unchanged costs no model "
                                        "call; any store (no invalidation needed); 0 = off")
    dependency_wait_s: float = flag(120.0, "how long to wait at start for the embedding service "
                                    "(health stays NOT_SERVING)")
    user_id_key_file: str = flag("", "file holding a secret key (>= 16 characters; 32 random "
                                 "bytes, base64, recommended): user ids are stored as their "
                                 "HMAC-SHA-256 under it, never as sent "
                                 "(services/fusion/pseudonym.py); keep it for the life of the "
                                 "store. Empty: ids stored as sent")


def open_store(config: Config, user_id_key: bytes | None = None) -> ProfileStore:
    """The configured backend; user ids stored as keyed hashes when `user_id_key` is given."""
    if config.store == "sqlite":
        store = SQLiteProfileStore(config.sqlite_path, max_queue_batches=config.max_queue_batches)
    elif config.store == "redis":
        from services.fusion.redis_store import RedisProfileStore
        store = RedisProfileStore(config.redis_url, replica_acks=config.redis_replica_acks)
    else:
        raise ValueError(f"--store must be sqlite or redis, got {config.store!r}")
    return PseudonymousStore(store, user_id_key) if user_id_key else store


def read_user_id_key(path: str) -> bytes | None:
    """The key of --user-id-key-file (None: ids stored as sent); ConfigError when the file
    is missing, unreadable, empty or too short."""
    if not path:
        return None
    return read_secret(path, "--user-id-key-file", MIN_KEY_CHARS).encode()


def load_user_model(config: Config):
    """The trained user tower, or the baseline only when --allow-baseline says so."""
    try:
        return OnnxUserModel(modelrepo.resolve(config.model_repo, "user_tower",
                                               config.model_version))
    except FileNotFoundError as err:
        if not config.allow_baseline:
            raise SystemExit(f"{err}. Refusing to start without a trained user model; pass "
                             "--allow-baseline to serve the untrained time-decayed mean "
                             "pooling baseline instead") from None
        log.warning("no trained user model: serving the untrained baseline (--allow-baseline)")
        return BaselineUserModel()


def _vec(v) -> list[float]:
    return [] if v is None else v.tolist()


_ITEM_VECTOR = fusion_pb2.ProfileEvent.DESCRIPTOR.fields_by_name["item_vector"].number


def _profile_event(e, vec) -> fusion_pb2.ProfileEvent:
    pb = fusion_pb2.ProfileEvent(event=common_pb2.BehaviorEvent(
        event_id=e.event_id, user_id=e.user_id, platform=e.platform, action=e.action,
        item_id=e.item_id, item_text=e.item_text, event_time_ms=e.event_time_ms,
        weight=e.weight))
    if vec is not None:
        pb.MergeFromString(packed_floats(_ITEM_VECTOR, vec))
    return pb


def profile_to_pb(p: Profile, model, item_vectors: bool = True
                  ) -> fusion_pb2.GetProfileResponse:
    return fusion_pb2.GetProfileResponse(
        user_id=p.user_id, known=p.known, dim=p.dim, total_events=p.total_events,
        platforms=[fusion_pb2.PlatformProfile(
            platform=v.platform, vector=v.vector.tolist(), event_count=v.event_count,
            last_seen_ms=v.last_seen_ms, fusion_weight=v.fusion_weight) for v in p.platforms],
        fused_vector=_vec(p.fused), for_platform=p.for_platform,
        for_platform_vector=_vec(p.for_platform_vector),
        model=common_pb2.ModelRef(name=model.name, version=model.version),
        baseline=model.baseline,
        recent_events=[_profile_event(e, vec if item_vectors else None)
                       for e, vec, _ in p.recent])


class FusionServicer(fusion_pb2_grpc.FusionServiceServicer):
    def __init__(self):
        self.engine: FusionEngine | None = None

    def _ready(self) -> FusionEngine:
        if self.engine is None:
            raise NotReady("fusion service is still loading")
        return self.engine

    def Ingest(self, request, context):
        raw = RawEvents(request.events)
        accepted, dups, conflicts = engine_call(
            context, lambda: self._ready().ingest(raw, context.time_remaining()))
        return fusion_pb2.IngestResponse(accepted=accepted, duplicates=dups, conflicts=conflicts)

    def IngestStream(self, request_iterator, context):
        accepted = dups = conflicts = batches = 0
        for request in request_iterator:
            raw = RawEvents(request.events)
            a, d, c = engine_call(context, lambda raw=raw: self._ready().ingest(raw, None))
            accepted, dups, conflicts, batches = accepted + a, dups + d, conflicts + c, batches + 1
        return fusion_pb2.IngestStreamResponse(accepted=accepted, duplicates=dups,
                                               conflicts=conflicts, batches=batches)

    def GetProfile(self, request, context):
        session = RawEvents(request.session_events)
        engine = engine_call(context, self._ready)
        profile = engine_call(context, lambda: engine.profile(
            request.user_id, request.for_platform, session, request.recent_events_limit,
            context.time_remaining()))
        return profile_to_pb(profile, engine.model, not request.omit_item_vectors)

    def GetItemStats(self, request, context):
        stats = engine_call(context, lambda: self._ready().item_stats(
            request.platform, request.limit, context.time_remaining()))
        return fusion_pb2.GetItemStatsResponse(platform=request.platform, items=[
            fusion_pb2.ItemStat(item_id=i, event_count=c, last_event_ms=t) for i, c, t in stats])

    def DeleteUser(self, request, context):
        deleted = engine_call(context, lambda: self._ready().delete_user(
            request.user_id, context.time_remaining()))
        return fusion_pb2.DeleteUserResponse(deleted_events=deleted)


def parse_args(argv=None) -> tuple[ServerConfig, Config]:
    return flags.parse(argv, ServerConfig, Config, description=__doc__,
                       defaults={"port": DEFAULT_PORT})


def main(argv=None) -> int:
    server_config, config = parse_args(argv)
    setup_logging(server_config.log_level)
    log.info("config", extra={"fields": vars(config)})
    try:
        user_id_key = read_user_id_key(config.user_id_key_file)
    except ConfigError as err:
        log.error(str(err))
        return 2
    model = load_user_model(config)
    servicer = FusionServicer()

    def register(server):
        fusion_pb2_grpc.add_FusionServiceServicer_to_server(servicer, server)
        return [fusion_pb2.DESCRIPTOR.services_by_name["FusionService"].full_name]

    def load():
        embed = EmbeddingRemote(config.embedding_address, client_security(server_config))
        dim = wait_for(lambda: embed.model()[2], config.dependency_wait_s,
                       f"embedding service at {config.embedding_address}")
        servicer.engine = FusionEngine(
            open_store(config, user_id_key), embed, model, dim,
            item_cache_items=config.item_cache_items if config.store == "sqlite" else 0,
            session_cache_items=config.session_cache_items,
            max_new_session_texts=config.max_new_session_texts,
            user_vector_cache_items=config.user_vector_cache_items)
        metrics.MODEL_INFO.labels("fusion", model.name).info({
            "version": str(model.version), "baseline": str(model.baseline).lower(),
            "store": config.store, "pseudonymous_user_ids": str(bool(user_id_key)).lower()})
        return servicer.engine

    return serve("fusion", server_config, register, load)


if __name__ == "__main__":
    sys.exit(main())
