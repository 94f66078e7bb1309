"""Co-visit counts: exact counts, leave-the-user-out, features, round trip (candidates from them:
tests/unit/test_pipeline.py)."""

import numpy as np

from recmodel.covisit import CoVisits

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


def test_save_and_load_round_trip(tmp_path):
    cv = CoVisits.from_users(KEYS, _users(np.random.default_rng(4)))
    cv.save(tmp_path / "covisit.npz")
    back = CoVisits.load(tmp_path / "covisit.npz")
    assert back.keys == KEYS
    assert np.array_equal(_to_dense(back), _to_dense(cv)) and np.array_equal(back.deg, cv.deg)
