"""recmodel/attribution.py: exact Shapley values of the ranker's score over feature
groups, and the explanation written from the largest one."""

from __future__ import annotations

import numpy as np
import pytest

from recmodel import modelrepo
from recmodel import attribution
from recmodel.attribution import COVISIT, GROUPS, HISTORY, NAMES, POPULARITY, TEXT
from recmodel.features import FEATURES, N_FEATURES
from recmodel.ranker import OnnxRanker


def test_every_feature_is_in_exactly_one_group():
    assert sorted(f for names in GROUPS.values() for f in names) == sorted(FEATURES)


def test_an_additive_score_gets_each_groups_own_change():
    """For f(x) = w.x, group g's Shapley value is w_g . (x_g - b_g): exact, no sampling."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal(N_FEATURES)
    x, b = rng.standard_normal((5, N_FEATURES)), rng.standard_normal(N_FEATURES)
    values = attribution.shapley(lambda rows: rows @ w, x.astype(np.float32),
                                 b.astype(np.float32))
    for g, name in enumerate(NAMES):
        cols = [FEATURES.index(f) for f in GROUPS[name]]
        want = (x.astype(np.float32)[:, cols] - b.astype(np.float32)[cols]) @ w[cols]
        np.testing.assert_allclose(values[:, g], want, rtol=1e-5, atol=1e-5)


def test_an_interaction_is_split_evenly_between_its_two_groups():
    """f = popularity feature x co-visit feature: each group gets half of the product."""
    pop, cov = FEATURES.index("log_pop"), FEATURES.index("covisit_knn")

    def score(rows):
        return rows[:, pop] * rows[:, cov]

    x = np.zeros((1, N_FEATURES), np.float32)
    x[0, pop], x[0, cov] = 2.0, 3.0
    values = attribution.shapley(score, x, np.zeros(N_FEATURES, np.float32))[0]
    assert values[NAMES.index(POPULARITY)] == pytest.approx(3.0)
    assert values[NAMES.index(COVISIT)] == pytest.approx(3.0)
    assert values[NAMES.index(TEXT)] == values[NAMES.index(HISTORY)] == 0.0


def test_the_real_rankers_shares_add_up_to_its_score_minus_the_baselines(model_repo):
    ranker = OnnxRanker(modelrepo.resolve(model_repo, "ranker"))
    rng = np.random.default_rng(1)
    candidates = np.abs(rng.standard_normal((200, N_FEATURES))).astype(np.float32)
    baseline = candidates.mean(0)
    values = attribution.shapley(ranker.score, candidates[:10], baseline)
    got = ranker.score(candidates[:10]) - ranker.score(baseline[None])[0]
    np.testing.assert_allclose(values.sum(1), got, atol=1e-4)


HISTORY_ITEMS = [("office", "h1", "blue gel pens"), ("arts_crafts", "h2", "acrylic paint set")]


def test_an_item_covisitation_drove_is_explained_by_its_co_users():
    line, contributions = attribution.explain(
        COVISIT, "office", False, HISTORY_ITEMS, np.array([0.2, 0.6]), np.array([37, 0]), 0,
        False)
    assert line == "chosen by 37 users who also chose 'blue gel pens' (office)"
    assert contributions == [("office", "h1", "blue gel pens", pytest.approx(0.2), 37)]
    assert attribution.explain(COVISIT, "office", False, HISTORY_ITEMS, np.array([0.2, 0.6]),
                               np.array([1, 0]), 0, False)[0].startswith("chosen by 1 user who")


def test_text_popularity_and_own_history_drivers_each_say_so():
    sims = np.array([0.2, 0.6])
    line, contributions = attribution.explain(TEXT, "office", False, HISTORY_ITEMS, sims,
                                              None, 0, False)
    assert line.startswith("similar to 'acrylic paint set' (arts_crafts)")
    assert [c[1] for c in contributions] == ["h2", "h1"]
    assert attribution.explain(POPULARITY, "office", False, HISTORY_ITEMS, sims, None, 120,
                               False)[0] == "popular on office (120 interactions)"
    assert attribution.explain(HISTORY, "office", False, HISTORY_ITEMS, sims, None, 0,
                               True)[0] == "in your office history"
    # Co-visitation named as the driver with no co-visit count to show: the text line.
    assert attribution.explain(COVISIT, "office", True, HISTORY_ITEMS, sims,
                               np.zeros(2, int), 0, False)[0].startswith(
        "from your arts_crafts history: like")
