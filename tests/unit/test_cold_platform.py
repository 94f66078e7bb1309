"""export/cold_platform.py's scorers on tiny hand-made data."""

import numpy as np
import scipy.sparse as sp

from export.cold_platform import fuse, positions, split_halves, user_knn_scores


def test_user_knn_ranks_the_nearest_neighbours_item_first():
    # Three training users; other-platform items 0..2, target-platform items 0..2.
    other = sp.csc_matrix(np.array([[1, 1, 0], [0, 0, 1], [1, 0, 1]], float))
    target = sp.csr_matrix(np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]], float))
    sizes = np.asarray(other.sum(1)).ravel()
    # The query shares items 0 and 1 with user 0 only (and item 0 with user 2).
    scores = user_knn_scores(np.array([0, 1, 1]), other, target, sizes, k=1, b=0.0)
    assert int(np.argmax(scores)) == 1
    assert scores[0] == 0 and scores[2] == 0
    every = user_knn_scores(np.array([0, 1]), other, target, sizes, k=0, b=0.0)
    assert every.tolist() == [0.0, 2.0, 1.0]


def test_fusion_with_full_weight_keeps_the_first_order():
    a = positions(np.array([0.1, 0.9, 0.5]))
    b = positions(np.array([0.9, 0.1, 0.5]))
    assert a.tolist() == [2, 0, 1]
    for params in ({"method": "rrf", "k0": 10, "w": 1.0}, {"method": "log_rank", "w": 1.0}):
        assert positions(fuse(a, b, params)).tolist() == a.tolist()


def test_halves_split_every_user_once_and_deterministically():
    users = [f"u{i}" for i in range(11)]
    h1, h2 = split_halves(users)
    assert h1.isdisjoint(h2) and h1 | h2 == set(users) and len(h1) == 5
    assert split_halves(list(reversed(users))) == (h1, h2)
