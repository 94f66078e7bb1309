"""Ranking engine: catalogue upserts, candidate retrieval, re-ranking, explanations."""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from services.common import metrics, tracing
from services.common.deadlines import deadline, downstream_deadline, time_left
from services.common.errors import InvalidInput, NotReady
from services.common.validation import (MAX_BATCH_ITEMS, MAX_SESSION_EVENTS, check_id,
                                        check_platform, validate_item)
from services.ranking.catalog import Catalog, CatalogItem
from recmodel import attribution, pipeline
from recmodel.features import FEATURES, UserContext
from recmodel.ranker import Ranker

log = logging.getLogger("crossrec.ranking")

# Why an item was recommended; the servicer maps each to crossrec.ranking.v1.Source (server.py
# SOURCES), and the names are the client's Source values.
PERSONALISED, CROSS_PLATFORM, POPULARITY = "personalised", "cross_platform", "popularity_fallback"
SEEN = FEATURES.index("seen")


@dataclass
class Recommendation:
    item_id: str
    title: str
    score: float
    source: str  # PERSONALISED, CROSS_PLATFORM or POPULARITY
    explanation: str
    # (platform, item_id, text, cosine, co-visit users) of the history items that show it
    contributions: list[tuple[str, str, str, float, int]] = field(default_factory=list)
    driver: str = ""  # attribution.NAMES: the feature group that lifted it most; "": none
    attributions: list[tuple[str, float]] = field(default_factory=list)  # largest first


@dataclass
class RecommendResult:
    items: list[Recommendation]
    source: str  # PERSONALISED, CROSS_PLATFORM or POPULARITY
    platform_weights: dict[str, float]
    models: list[tuple[str, int]]
    degraded: bool = False
    degraded_reason: str = ""


class Popularity:
    """Per-platform item event counts from fusion, refreshed in the background; `generation`
    changes with every refresh (the engine's item tables are rebuilt then)."""

    def __init__(self, stats_fn: Callable[[str], list[tuple[str, int, int]]],
                 catalog: Catalog, refresh_s: float):
        self._stats_fn, self._catalog, self.refresh_s = stats_fn, catalog, refresh_s
        self._counts: dict[str, dict[str, int]] = {}
        self._ranked: dict[str, list[tuple[str, int]]] = {}
        self.generation = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> None:
        counts = {}
        for platform in self._catalog.platforms():
            try:
                stats = self._stats_fn(platform)
            except Exception as err:  # noqa: BLE001 - stale popularity beats none
                log.warning("popularity refresh failed", extra={"fields": {"error": str(err)}})
                return
            counts[platform] = {item_id: n for item_id, n, _ in stats}
        if counts != self._counts:
            self._ranked = {p: sorted(c.items(), key=lambda kv: -kv[1]) for p, c in counts.items()}
            self._counts = counts
            self.generation += 1

    def start(self) -> None:
        self.refresh()

        def loop():
            while not self._stop.wait(self.refresh_s):
                self.refresh()
        self._thread = threading.Thread(target=loop, name="popularity", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def counts(self, platform: str, item_ids: list[str]) -> np.ndarray:
        """float64 event counts of `item_ids` (0 for an item fusion has no events of)."""
        table = self._counts.get(platform, {})
        return np.fromiter((table.get(i, 0) for i in item_ids), np.float64, len(item_ids))

    def top(self, platform: str, k: int, exclude: set[str]) -> list[tuple[str, int]]:
        """Most popular catalogue items (by events), then the rest of the catalogue."""
        out = []
        for i, n in self._ranked.get(platform, []):
            if i not in exclude and self._catalog.get(platform, i):
                out.append((i, n))
                if len(out) == k:
                    return out
        if len(out) < k:
            seen = {i for i, _ in out} | exclude
            out += [(i, 0) for i in self._catalog.item_ids(platform) if i not in seen][:k]
        return out[:k]


class RankingEngine:
    """Plain-Python core of the ranking service (no grpc). Thread-safe.

    `embed(texts, budget_s)` -> float32 [n, dim]; `profile(user_id, platform, session_events,
    recent_limit, budget_s)` -> services.common.remote.RemoteProfile; `ranker.score(features)`.
    """

    def __init__(self, catalog: Catalog, embed, profile, ranker: Ranker, popularity: Popularity,
                 max_k: int = 1000, fusion_fallback: bool = False,
                 embedder: tuple[str, int] = ("", 0)):
        self.catalog, self.embed, self.profile_fn = catalog, embed, profile
        self.ranker, self.popularity, self.max_k = ranker, popularity, max_k
        self.fusion_fallback = fusion_fallback
        self.embedder = embedder
        # The history window the ranker was trained on (its meta.json): the user tower's
        # newest events, asked of fusion with the profile.
        self.history_events = ranker.history_events
        self._tables: dict[str, tuple[tuple, pipeline.ItemTable]] = {}

    # --- catalogue ------------------------------------------------------------------------
    def upsert_items(self, raw: list[dict], budget_s: float | None = None) -> int:
        """Validate, embed (only new or changed texts) and store items; all-or-nothing.
        A (platform, item_id) repeated in the batch: the last one wins, stored once. Returns
        the number of distinct items stored."""
        end = deadline(budget_s)
        if not raw:
            raise InvalidInput("items must hold at least 1 item, got 0")
        if len(raw) > MAX_BATCH_ITEMS:
            raise InvalidInput(f"items must hold at most {MAX_BATCH_ITEMS} items, got {len(raw)}")
        items = [CatalogItem(r["item_id"], r["platform"],
                             *validate_item(r["item_id"], r["platform"], r["title"],
                                            r.get("attributes"), field=f"items[{n}]"))
                 for n, r in enumerate(raw)]
        # One rule for a repeated id, the same as PlatformIndex.upsert's and the catalogues'
        # (SQLite INSERT OR REPLACE, Redis HSET in order): the last one wins. Applied here so
        # that the catalogue, its index and the count returned see each item once.
        last = {(it.platform, it.item_id): n for n, it in enumerate(items)}
        if len(last) < len(items):
            items = [items[n] for n in sorted(last.values())]
        vectors = np.zeros((len(items), self.catalog.dim), np.float32)
        todo = []
        for n, it in enumerate(items):
            old = self.catalog.get(it.platform, it.item_id)
            kept, vec = (self.catalog.index(it.platform).live_vectors([it.item_id])
                         if old is not None and old.text == it.text else ([], None))
            if kept:  # the same text: keep its vector (unless deleted meanwhile)
                vectors[n] = vec[0]
            else:
                todo.append(n)
        if todo:
            # The downstream share is taken as the embedding call starts: validation and the
            # vector look-up are not charged to it.
            vectors[todo] = self.embed([items[n].text for n in todo], time_left(
                downstream_deadline(budget_s), "the item texts were embedded"))
        self.catalog.upsert(items, vectors, time_left(end, "the catalogue write"))
        for platform in {it.platform for it in items}:
            metrics.CATALOG_ITEMS.labels(platform).set(self.catalog.size(platform))
        return len(items)

    def delete_items(self, platform: str, item_ids: list[str],
                     budget_s: float | None = None) -> int:
        check_platform(platform)
        if not item_ids or len(item_ids) > MAX_BATCH_ITEMS:
            raise InvalidInput(f"item_ids must hold 1..{MAX_BATCH_ITEMS} ids, got {len(item_ids)}")
        for n, item_id in enumerate(item_ids):
            check_id(item_id, f"item_ids[{n}]")
        return self.catalog.delete(platform, item_ids, budget_s)

    # --- recommend ------------------------------------------------------------------------
    def recommend(self, user_id: str, platform: str, k: int, exclude_seen: bool = False,
                  session_events: list[dict] = (), diversify: bool = False,
                  diversity_lambda: float = 0.0, budget_s: float | None = None
                  ) -> RecommendResult:
        end = deadline(budget_s)
        if not user_id and not session_events:
            raise InvalidInput("user_id is required unless session_events are given")
        check_id(user_id, "user_id", required=False)
        if len(session_events) > MAX_SESSION_EVENTS:
            raise InvalidInput(f"session_events must hold at most {MAX_SESSION_EVENTS} events, "
                               f"got {len(session_events)}")
        check_platform(platform)
        if self.catalog.size(platform) == 0:
            raise InvalidInput(f"platform {platform!r} has no catalogue; known platforms: "
                               f"{self.catalog.platforms()}")
        if not 1 <= k <= self.max_k:
            raise InvalidInput(f"k must be in 1..{self.max_k}, got {k}")
        if not (0.0 <= diversity_lambda <= 1.0) or math.isnan(diversity_lambda):
            raise InvalidInput(f"diversity_lambda must be in [0, 1], got {diversity_lambda}")
        models = [self.embedder, (self.ranker.name, self.ranker.version)]
        try:
            with tracing.stage(metrics.RANKING_STAGE_SECONDS, "profile"):
                profile = self._profile(user_id, platform, session_events, budget_s)
        except NotReady as err:
            if not self.fusion_fallback:
                raise
            return self._popular(platform, k, set(), models, degraded=str(err))
        models.insert(0, profile.model)
        if not profile.known or profile.for_platform is None:
            seen = {i for p, i, _ in profile.recent if p == platform}
            return self._popular(platform, k, seen if exclude_seen else set(), models)
        source = PERSONALISED if profile.counts.get(platform, 0) else CROSS_PLATFORM
        time_left(end, "the candidates were retrieved")

        table = self.item_table(platform)
        user = UserContext(platform, profile.for_platform, profile.fused,
                           profile.per_platform, profile.counts,
                           [(p, i) for p, i, _ in profile.recent], profile.recent_vectors)
        covisit = self.ranker.covisit
        with tracing.stage(metrics.RANKING_STAGE_SECONDS, "retrieve"):
            cands = pipeline.candidates(user, table, covisit, max(self.ranker.candidates, k),
                                        self.ranker.covisit_candidates, exclude_seen)
        with tracing.stage(metrics.RANKING_STAGE_SECONDS, "rank"):
            ranked = pipeline.order(user, table, cands, covisit, self.ranker)
        metrics.RANKING_SOURCE.labels(source).inc()
        rows, scores, feats = ranked.rows, ranked.scores, ranked.features
        if diversify:
            order = mmr(np.arange(len(rows)), scores, table.vectors[rows], k,
                        diversity_lambda or 0.7)
            rows, scores, feats = rows[order], scores[order], feats[order]
        with tracing.stage(metrics.RANKING_STAGE_SECONDS, "explain"):
            items = self._explain_all(table, rows[:k], scores[:k], feats[:k],
                                      ranked.features.mean(0), source, profile)
        return RecommendResult(items, source, profile.weights, models)

    def _explain_all(self, table: pipeline.ItemTable, rows, scores, feats, mean_features,
                     source: str, profile) -> list[Recommendation]:
        """The returned items, each with its score's attribution (against the mean
        candidate's features) and the explanation written from it."""
        shares = (attribution.shapley(self.ranker.score, feats, mean_features)
                  if self.ranker.explains and len(rows) else None)
        covisit = self.ranker.covisit
        history_rows = (covisit.rows([(p, i) for p, i, _ in profile.recent])
                        if covisit is not None else None)
        ids = table.snapshot.ids
        return [self._explain(ids[r], table.platform, float(scores[n]), table.vectors[r],
                              source, profile, None if shares is None else shares[n],
                              bool(feats[n, SEEN]), int(table.covisit_row[r]), history_rows)
                for n, r in enumerate(rows.tolist())]

    def _profile(self, user_id: str, platform: str, session_events, budget_s: float | None):
        """The user's profile from fusion, asked without the recent items' vectors: they are
        looked up in this catalogue (the vectors the pipeline's training and evaluation use
        for history items too), so the answer is a tenth of the size. Only when the catalogue
        lacks a recent item (a session item it does not list, one deleted since) is fusion
        asked again, with the vectors."""
        profile = self.profile_fn(user_id, platform, session_events[:], self.history_events,
                                  _profile_share(budget_s), item_vectors=False)
        if profile.recent and profile.recent_vectors is None:
            profile.recent_vectors = self._catalogue_vectors(
                [(p, i) for p, i, _ in profile.recent])
            if profile.recent_vectors is None:
                profile = self.profile_fn(user_id, platform, session_events[:],
                                          self.history_events, _profile_share(budget_s),
                                          item_vectors=True)
        return profile

    def _catalogue_vectors(self, keys: list[tuple[str, str]]) -> np.ndarray | None:
        """float32 [n, dim] catalogue vectors of (platform, item_id) keys; None if any is
        not in the catalogue."""
        out = np.empty((len(keys), self.catalog.dim), np.float32)
        snapshots = {}
        for n, (p, i) in enumerate(keys):
            if p not in snapshots:
                index = self.catalog.index(p)
                snapshots[p] = index.snapshot() if index is not None else None
            snap = snapshots[p]
            row = None if snap is None else snap.row_of.get(i)
            if row is None:
                return None
            out[n] = snap.vectors[row]
        return out

    def item_table(self, platform: str) -> pipeline.ItemTable:
        """The platform's catalogue as pipeline arrays, rebuilt only when the index or the
        popularity changed since the last call (a rebuild is O(items); a request is not)."""
        snapshot = self.catalog.index(platform).snapshot()
        key = (snapshot.generation, id(snapshot), self.popularity.generation)
        cached = self._tables.get(platform)
        if cached is not None and cached[0] == key:
            return cached[1]
        table = pipeline.item_table(platform, snapshot,
                                    self.popularity.counts(platform, snapshot.ids),
                                    self.ranker.covisit)
        self._tables[platform] = (key, table)
        return table

    def _popular(self, platform, k, exclude, models, degraded: str = "") -> RecommendResult:
        items = []
        for item_id, count in self.popularity.top(platform, k, exclude):
            item = self.catalog.get(platform, item_id)
            items.append(Recommendation(item_id, item.title, float(math.log1p(count)), POPULARITY,
                                        f"popular on {platform} ({count} interactions)"))
        reason = f"fusion unavailable, popularity fallback: {degraded}" if degraded else ""
        metrics.RANKING_SOURCE.labels("popularity").inc()
        return RecommendResult(items, POPULARITY, {}, models, bool(degraded), reason)

    def _explain(self, item_id, platform, score, vector, source, profile, shares, seen: bool,
                 covisit_row: int, history_rows) -> Recommendation:
        """One returned item: its driver (the feature group with the largest Shapley share,
        recmodel/attribution.py) and the line and history items that show it."""
        title = self.catalog.get(platform, item_id).title
        driver = "" if shares is None else attribution.NAMES[int(np.argmax(shares))]
        sims = (profile.recent_vectors @ vector
                if profile.recent_vectors is not None and len(profile.recent) else None)
        co_users = (self.ranker.covisit.pair_counts(covisit_row, history_rows)
                    if driver == attribution.COVISIT and history_rows is not None else None)
        popularity = (int(self.popularity.counts(platform, [item_id])[0])
                      if driver == attribution.POPULARITY else 0)
        explanation, contributions = attribution.explain(
            driver, platform, source == CROSS_PLATFORM, profile.recent, sims, co_users,
            popularity, seen)
        shared = ([] if shares is None else
                  sorted(zip(attribution.NAMES, shares.tolist()), key=lambda g: -g[1]))
        return Recommendation(item_id, title, score, source, explanation, contributions,
                              driver, shared)

    def close(self) -> None:
        self.popularity.stop()
        self.catalog.close()


def _profile_share(budget_s: float | None) -> float | None:
    """Timeout of one profile call: a downstream share of the budget as the call starts (the
    second call, when the catalogue lacks a recent item, gets a share of its own)."""
    return time_left(downstream_deadline(budget_s), "the profile was read")


def mmr(order: np.ndarray, scores: np.ndarray, vectors: np.ndarray, k: int,
        lam: float) -> np.ndarray:
    """Maximal marginal relevance over the ranked candidates: lam * relevance (scaled to
    [0, 1]) - (1 - lam) * the highest cosine to an item already picked."""
    rel = scores - scores.min()
    rel = rel / rel.max() if rel.max() > 0 else rel
    picked, left = [], list(order)
    closest = np.full(len(scores), -1.0, np.float32)
    while left and len(picked) < k:
        best = max(left, key=lambda j: lam * rel[j] - (1 - lam) * max(closest[j], 0.0))
        picked.append(best)
        left.remove(best)
        closest = np.maximum(closest, vectors @ vectors[best])
    return np.asarray(picked + left, dtype=int)
