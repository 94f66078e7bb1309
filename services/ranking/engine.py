"""Ranking engine: catalogue upserts, candidate retrieval, re-ranking, explanations."""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from services.common import metrics
from services.common.errors import DOWNSTREAM_BUDGET_SHARE, BudgetSpent, InvalidInput, NotReady
from services.common.events import MAX_SESSION_EVENTS, check_id, check_platform
from services.common.text import compose_item_text
from services.ranking.catalog import Catalog, CatalogItem
from services.ranking.covisit import merge_candidates
from services.ranking.features import UserContext, candidate_features, popularity_features

log = logging.getLogger("crossrec.ranking")

PERSONALISED, CROSS_PLATFORM, POPULARITY = 1, 2, 3  # crossrec.ranking.v1.Source
MAX_BATCH_ITEMS = 1000
MAX_TITLE_CHARS = 2048
MAX_ATTRIBUTES, MAX_ATTRIBUTE_CHARS = 16, 2048
RECENT_EVENTS = 50


@dataclass
class Recommendation:
    item_id: str
    title: str
    score: float
    source: int
    explanation: str
    contributions: list[tuple[str, str, str, float]] = field(default_factory=list)


@dataclass
class RecommendResult:
    items: list[Recommendation]
    source: int
    platform_weights: dict[str, float]
    models: list[tuple[str, int]]
    degraded: bool = False
    degraded_reason: str = ""


class Popularity:
    """Per-platform item event counts from fusion, refreshed in the background."""

    def __init__(self, stats_fn: Callable[[str], list[tuple[str, int, int]]],
                 catalog: Catalog, refresh_s: float):
        self._stats_fn, self._catalog, self.refresh_s = stats_fn, catalog, refresh_s
        self._counts: dict[str, dict[str, int]] = {}
        self._features: dict[str, dict[str, tuple[float, float]]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> None:
        for platform in self._catalog.platforms():
            try:
                stats = self._stats_fn(platform)
            except Exception as err:  # noqa: BLE001 - stale popularity beats none
                log.warning("popularity refresh failed", extra={"fields": {"error": str(err)}})
                return
            counts = {item_id: n for item_id, n, _ in stats}
            ids = self._catalog.item_ids(platform)
            log_pop, pct = popularity_features([counts.get(i, 0) for i in ids])
            self._counts[platform] = counts
            self._features[platform] = dict(zip(ids, zip(log_pop.tolist(), pct.tolist())))

    def start(self) -> None:
        self.refresh()

        def loop():
            while not self._stop.wait(self.refresh_s):
                self.refresh()
        self._thread = threading.Thread(target=loop, name="popularity", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def count(self, platform: str, item_id: str) -> int:
        return self._counts.get(platform, {}).get(item_id, 0)

    def features(self, platform: str, item_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        table = self._features.get(platform, {})
        pairs = [table.get(i, (0.0, 0.0)) for i in item_ids]
        arr = np.asarray(pairs, np.float32).reshape(len(item_ids), 2)
        return arr[:, 0], arr[:, 1]

    def top(self, platform: str, k: int, exclude: set[str]) -> list[tuple[str, int]]:
        """Most popular catalogue items (by events), then the rest of the catalogue."""
        counts = self._counts.get(platform, {})
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])
        out = [(i, n) for i, n in ranked if i not in exclude and self._catalog.get(platform, i)]
        if len(out) < k:
            seen = {i for i, _ in out} | exclude
            out += [(i, 0) for i in self._catalog.item_ids(platform) if i not in seen][:k]
        return out[:k]


class RankingEngine:
    """Plain-Python core of the ranking service (no grpc). Thread-safe.

    `embed(texts, budget_s)` -> float32 [n, dim]; `profile(user_id, platform, session_events,
    recent_limit, budget_s)` -> services.common.remote.RemoteProfile; `ranker.score(features)`.
    """

    def __init__(self, catalog: Catalog, embed, profile, ranker, popularity: Popularity,
                 max_k: int = 1000, fusion_fallback: bool = False,
                 embedder: tuple[str, int] = ("", 0)):
        self.catalog, self.embed, self.profile_fn = catalog, embed, profile
        self.ranker, self.popularity, self.max_k = ranker, popularity, max_k
        self.fusion_fallback = fusion_fallback
        self.embedder = embedder

    # --- catalogue ------------------------------------------------------------------------
    def upsert_items(self, raw: list[dict], budget_s: float | None = None) -> int:
        """Validate, embed (only new or changed texts) and store items; all-or-nothing."""
        started = time.monotonic()
        if not raw:
            raise InvalidInput("items must hold at least 1 item, got 0")
        if len(raw) > MAX_BATCH_ITEMS:
            raise InvalidInput(f"items must hold at most {MAX_BATCH_ITEMS} items, got {len(raw)}")
        items = []
        for n, r in enumerate(raw):
            f = f"items[{n}]"
            check_id(r["item_id"], f"{f}.item_id")
            check_platform(r["platform"], f"{f}.platform")
            title = r["title"].strip()
            if not title or len(title) > MAX_TITLE_CHARS:
                raise InvalidInput(f"{f}.title must hold 1..{MAX_TITLE_CHARS} characters, "
                                   f"got {len(title)}")
            attrs = dict(r.get("attributes") or {})
            if len(attrs) > MAX_ATTRIBUTES:
                raise InvalidInput(f"{f}.attributes must hold at most {MAX_ATTRIBUTES} entries, "
                                   f"got {len(attrs)}")
            for key, value in attrs.items():
                if len(value) > MAX_ATTRIBUTE_CHARS or len(key) > MAX_ATTRIBUTE_CHARS:
                    raise InvalidInput(f"{f}.attributes[{key[:40]!r}] must be at most "
                                       f"{MAX_ATTRIBUTE_CHARS} characters")
            text = compose_item_text(title, attrs)
            if not compose_item_text(title):
                raise InvalidInput(f"{f}.title must hold visible text, got only whitespace or "
                                   "control characters")
            items.append(CatalogItem(r["item_id"], r["platform"], title, attrs, text))
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
            vectors[todo] = self.embed([items[n].text for n in todo],
                                       None if budget_s is None
                                       else budget_s * DOWNSTREAM_BUDGET_SHARE)
        self.catalog.upsert(items, vectors, _left(budget_s, started))
        for platform in {it.platform for it in items}:
            metrics.CATALOG_ITEMS.labels(platform).set(self.catalog.size(platform))
        return len(items)

    def delete_items(self, platform: str, item_ids: list[str],
                     budget_s: float | None = None) -> int:
        check_platform(platform)
        if not item_ids or len(item_ids) > MAX_BATCH_ITEMS:
            raise InvalidInput(f"item_ids must hold 1..{MAX_BATCH_ITEMS} ids, got {len(item_ids)}")
        return self.catalog.delete(platform, item_ids, budget_s)

    # --- recommend ------------------------------------------------------------------------
    def recommend(self, user_id: str, platform: str, k: int, exclude_seen: bool = False,
                  session_events: list[dict] = (), diversify: bool = False,
                  diversity_lambda: float = 0.0, budget_s: float | None = None
                  ) -> RecommendResult:
        started = time.monotonic()
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
            with metrics.RANKING_STAGE_SECONDS.labels("profile").time():
                profile = self.profile_fn(user_id, platform, session_events[:],
                                          RECENT_EVENTS,
                                          None if budget_s is None
                                          else budget_s * DOWNSTREAM_BUDGET_SHARE)
        except NotReady as err:
            if not self.fusion_fallback:
                raise
            return self._popular(platform, k, set(), models, degraded=str(err))
        models.insert(0, profile.model)
        seen = {i for p, i, _ in profile.recent if p == platform}
        if not profile.known or profile.for_platform is None:
            return self._popular(platform, k, seen if exclude_seen else set(), models)
        source = PERSONALISED if profile.counts.get(platform, 0) else CROSS_PLATFORM
        if budget_s is not None and time.monotonic() - started > budget_s:
            raise BudgetSpent("deadline passed after the profile was read")

        index = self.catalog.index(platform)
        exclude = seen if exclude_seen else set()
        user = UserContext(platform, profile.for_platform, profile.fused,
                           profile.per_platform, profile.counts,
                           [(p, i) for p, i, _ in profile.recent], profile.recent_vectors)
        covisit = self.ranker.covisit
        with metrics.RANKING_STAGE_SECONDS.labels("retrieve").time():
            n = max(self.ranker.candidates, k)
            ids, _ = index.search(profile.for_platform, n, exclude)
            if covisit is not None:
                sums = covisit.user_sums(user.history_keys, platform)
                extra = covisit.top(sums, platform, self.ranker.covisit_candidates,
                                    lambda r: self._listed(platform, covisit.keys[r][1],
                                                           exclude))
                ids = merge_candidates(ids, [covisit.keys[r][1] for r in extra], n,
                                       self.ranker.covisit_candidates)
            ids, vectors = index.live_vectors(ids)
        with metrics.RANKING_STAGE_SECONDS.labels("rank").time():
            log_pop, pop_pct = self.popularity.features(platform, ids)
            cov = (None if covisit is None else
                   covisit.features(sums, covisit.rows([(platform, i) for i in ids])))
            scores = self.ranker.score(candidate_features(user, ids, vectors, log_pop, pop_pct,
                                                          cov))
        metrics.RANKING_SOURCE.labels("cross_platform" if source == CROSS_PLATFORM
                                      else "personalised").inc()
        order = np.argsort(-scores, kind="stable")
        if diversify:
            order = mmr(order, scores, vectors, k, diversity_lambda or 0.7)
        items = [self._explain(ids[j], platform, float(scores[j]), vectors[j], source, profile)
                 for j in order[:k]]
        return RecommendResult(items, source, profile.weights, models)

    def _listed(self, platform: str, item_id: str, exclude: set[str]) -> bool:
        return item_id not in exclude and self.catalog.get(platform, item_id) is not None

    def _popular(self, platform, k, exclude, models, degraded: str = "") -> RecommendResult:
        items = []
        for item_id, count in self.popularity.top(platform, k, exclude):
            item = self.catalog.get(platform, item_id)
            items.append(Recommendation(item_id, item.title, float(math.log1p(count)), POPULARITY,
                                        f"popular on {platform} ({count} interactions)"))
        reason = f"fusion unavailable, popularity fallback: {degraded}" if degraded else ""
        metrics.RANKING_SOURCE.labels("popularity").inc()
        return RecommendResult(items, POPULARITY, {}, models, bool(degraded), reason)

    def _explain(self, item_id, platform, score, vector, source, profile) -> Recommendation:
        title = self.catalog.get(platform, item_id).title
        contributions = []
        if profile.recent_vectors is not None and len(profile.recent):
            sims = profile.recent_vectors @ vector
            for j in np.argsort(-sims)[:3]:
                p, i, text = profile.recent[j]
                contributions.append((p, i, text[:120], float(sims[j])))
        if contributions:
            p, _, text, _ = contributions[0]
            lead = "similar to" if source == PERSONALISED else f"from your {p} history: like"
            extra = {c[0] for c in contributions[1:]} - {p}
            also = f"; also your {', '.join(sorted(extra))} history" if extra else ""
            explanation = f"{lead} '{text[:60]}' ({p}){also}"
        else:
            explanation = "close to your profile"
        return Recommendation(item_id, title, score, source, explanation, contributions)

    def close(self) -> None:
        self.popularity.stop()
        self.catalog.close()


def _left(budget_s: float | None, started: float) -> float | None:
    """What is left of a call's budget that began at `started` (time.monotonic)."""
    if budget_s is None:
        return None
    left = budget_s - (time.monotonic() - started)
    if left <= 0:
        raise BudgetSpent("deadline passed before the catalogue write")
    return left


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
