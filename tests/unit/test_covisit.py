"""Co-visit counts: exact counts, leave-the-user-out, features, candidate merging, round trip."""

import numpy as np

from services.ranking.covisit import CoVisits, merge_candidates

ARTS, OFFICE = "arts_crafts", "office"
KEYS = [(ARTS, f"a{i}") for i in range(6)] + [(OFFICE, f"o{i}") for i in range(6)]


def _users(rng, n_users=40):
    return [rng.choice(len(KEYS), size=rng.integers(1, 8)) for _ in range(n_users)]


def _dense(users):
    """Brute-force counts[i, j] = users with both i and j (i != j), and deg."""
    c = np.zeros((len(KEYS), len(KEYS)))
    deg = np.zeros(len(KEYS))
    for rows in users:
        items = np.unique(rows)
        deg[items] += 1
        for i in items:
            for j in items:
                if i != j:
                    c[i, j] += 1
    return c, deg


def _to_dense(cv):
    out = np.zeros((len(cv), len(cv)))
    for r in range(len(cv)):
        lo, hi = cv.indptr[r], cv.indptr[r + 1]
        out[r, cv.indices[lo:hi]] = cv.counts[lo:hi]
    return out


def test_counts_equal_brute_force_and_repeats_count_once_per_user():
    users = _users(np.random.default_rng(0))
    users.append(np.array([0, 0, 0, 7]))  # one user, a repeated item: pair (0, 7) counts once
    cv = CoVisits.from_users(KEYS, users)
    dense, deg = _dense(users)
    assert np.array_equal(_to_dense(cv), dense)
    assert np.array_equal(cv.deg, deg)
    assert np.array_equal(_to_dense(cv), _to_dense(cv).T)


def test_sums_split_history_by_platform_and_ignore_unknown_items():
    users = _users(np.random.default_rng(1))
    cv = CoVisits.from_users(KEYS, users)
    dense, _ = _dense(users)
    history = [(OFFICE, "o1"), (ARTS, "a2"), (ARTS, "a2"), ("news", "unknown")]
    same, other, *_ = cv.user_sums(history, ARTS)
    row = cv.row_of
    assert np.allclose(same, dense[row[(ARTS, "a2")]])
    assert np.allclose(other, dense[row[(OFFICE, "o1")]])


def test_leaving_a_user_out_equals_counting_without_that_user():
    users = _users(np.random.default_rng(2))
    me = np.array([0, 3, 7, 9, 9])
    with_me = CoVisits.from_users(KEYS, users + [me])
    without = CoVisits.from_users(KEYS, users)
    history = [KEYS[r] for r in me[:3]]  # the user's first items predict the rest
    for target in (ARTS, OFFICE):
        got = with_me.user_sums(history, target, own_rows=me)
        want = without.user_sums(history, target)
        for g, w in zip(got, want):
            assert np.allclose(g, w)


def test_features_are_zero_for_items_the_counts_do_not_know():
    cv = CoVisits.from_users(KEYS, _users(np.random.default_rng(3)))
    sums = cv.user_sums([(ARTS, "a0"), (OFFICE, "o0")], OFFICE)
    rows = cv.rows([(OFFICE, "o1"), (OFFICE, "new-item")])
    feats = cv.features(sums, rows)
    assert feats.shape == (2, 5) and not feats[1].any()
    r = rows[0]
    same, other, deg, last = sums.same[r], sums.other[r], sums.deg[r], sums.last[r]
    assert np.allclose(feats[0, :3], [np.log1p(same), np.log1p(other),
                                      np.log1p((same + other) / np.sqrt(deg + 1))])
    assert feats[0, 4] == np.float32(np.log1p(last))


def test_cosine_and_newest_item_sums_follow_their_definitions():
    users = _users(np.random.default_rng(5))
    cv = CoVisits.from_users(KEYS, users)
    dense, deg = _dense(users)
    history = [(OFFICE, "o3"), (ARTS, "a1"), (OFFICE, "o3")]  # newest first
    sums = cv.user_sums(history, ARTS)
    i, j = cv.row_of[(OFFICE, "o3")], cv.row_of[(ARTS, "a1")]
    want = dense[i] / np.sqrt(max(deg[i], 1)) + dense[j] / np.sqrt(max(deg[j], 1))
    assert np.allclose(sums.cos, want, rtol=1e-5)
    assert np.array_equal(sums.last, dense[i])


def test_top_keeps_the_platform_positive_scores_and_the_filter():
    users = [np.array([0, 6, 7]), np.array([0, 6]), np.array([0, 8])]
    cv = CoVisits.from_users(KEYS, users)
    sums = cv.user_sums([(ARTS, "a0")], OFFICE)
    assert cv.top(sums, OFFICE, 10) == [6, 7, 8]  # o0 twice; o1, o2 once each (tie by row)
    assert cv.top(sums, OFFICE, 10, allowed=lambda r: r != 6) == [7, 8]
    assert cv.top(sums, ARTS, 10) == []            # nothing co-visited on arts_crafts
    assert cv.top(sums, OFFICE, 0) == []


def test_merge_puts_covisit_items_in_place_of_the_last_dense_ones():
    dense = ["d0", "d1", "d2", "d3", "d4", "d5"]
    assert merge_candidates(dense, ["c0", "d0", "c1"], 5, 2) == ["d0", "d1", "d2", "c0", "c1"]
    # Too few co-visit items: the dense list fills up; nothing appears twice.
    assert merge_candidates(dense, ["d4"], 5, 2) == ["d0", "d1", "d2", "d4", "d3"]
    assert merge_candidates(dense, [], 5, 2) == dense[:5]
    assert merge_candidates(dense[:2], ["c0"], 5, 2) == ["d0", "d1", "c0"]


def test_save_and_load_round_trip(tmp_path):
    cv = CoVisits.from_users(KEYS, _users(np.random.default_rng(4)))
    cv.save(tmp_path / "covisit.npz")
    back = CoVisits.load(tmp_path / "covisit.npz")
    assert back.keys == KEYS
    assert np.array_equal(_to_dense(back), _to_dense(cv)) and np.array_equal(back.deg, cv.deg)


def test_top_gives_the_full_sort_order_when_it_sorts_only_the_best_few():
    rng = np.random.default_rng(6)
    users = [rng.choice(len(KEYS), size=6) for _ in range(300)]
    cv = CoVisits.from_users(KEYS, users)
    sums = cv.user_sums([(ARTS, "a0"), (OFFICE, "o1")], OFFICE)
    full = cv._take(cv._platform_rows[OFFICE], (sums.same + sums.other)[cv._platform_rows[OFFICE]]
                    / np.sqrt(sums.deg[cv._platform_rows[OFFICE]] + 1), 6, None)
    assert cv.top(sums, OFFICE, 1) == full[:1]       # sorts 4 of 6, ties included
    assert cv.top(sums, OFFICE, 6) == full
    # A filter rejecting the best ones falls back to the whole list.
    assert cv.top(sums, OFFICE, 1, allowed=lambda r: r == full[-1]) == full[-1:]
