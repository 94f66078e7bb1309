"""Co-visitation: how many training users interacted with both of two items (any platforms).

The collaborative signal the text-based user tower lacks: export/rank_data.py counts it over
the training users, writes it beside the ranker (models/ranker/<N>/covisit.npz), and the ranker
reads it as features (`CoVisits.features`) and as a second candidate source
(recmodel/pipeline.covisit_top). Numpy only:
serving loads it without torch or scipy.

Memory: the full symmetric count matrix (CSR, uint16 counts), ~30 MB for the 38,396-item
Amazon catalogue (4.6 M non-zeros). A catalogue a hundred times larger would keep only each
item's top neighbours; this one keeps every pair so that training and serving see the same
counts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

COVISIT_FILE = "covisit.npz"
N_COVISIT_FEATURES = 5


class Sums(NamedTuple):
    """A user's co-visit sums, float32 [n items] each: `same`/`other`, counts summed over
    the user's distinct history items on the target platform / on other platforms; `deg`,
    users per item; `cos`, counts[i, j] / sqrt(deg[i]) summed over all history items i (with
    1 / sqrt(deg[j]) applied in features(): cosine item-kNN); `last`, counts with the
    newest history item."""
    same: np.ndarray
    other: np.ndarray
    deg: np.ndarray
    cos: np.ndarray
    last: np.ndarray


class CoVisits:
    """counts[i, j] = training users with both items i and j (i != j), deg[i] = users with i.

    keys: (platform, item_id) of each row; indptr int64 [n+1], indices int32 [nnz],
    counts uint16 [nnz] (CSR, symmetric); deg float32 [n].
    """

    def __init__(self, keys: list[tuple[str, str]], indptr: np.ndarray, indices: np.ndarray,
                 counts: np.ndarray, deg: np.ndarray):
        self.keys = list(keys)
        self.indptr, self.indices = indptr, indices
        self.counts, self.deg = counts, deg.astype(np.float32)
        self.row_of = {key: r for r, key in enumerate(self.keys)}
        # Per row, a small code of its platform (platform_code(p)), for masks over rows.
        names, codes = np.unique(np.array([p for p, _ in self.keys], dtype=str),
                                 return_inverse=True)
        self._codes = {p: c for c, p in enumerate(names.tolist())}
        self.codes = codes.astype(np.int16)

    def __len__(self) -> int:
        return len(self.keys)

    def platform_code(self, platform: str) -> int:
        """The `codes` value of `platform`'s rows; -1 for a platform the counts do not know."""
        return self._codes.get(platform, -1)


    @classmethod
    def from_users(cls, keys: list[tuple[str, str]], user_rows: list[np.ndarray]) -> "CoVisits":
        """Counts over users' item rows (indices into `keys`; repeats count once per user):
        the off-diagonal of X^T X, X the binary user x item matrix (scipy, export only)."""
        from scipy.sparse import csr_matrix

        n = len(keys)
        items = [np.unique(np.asarray(rows, np.int64)) for rows in user_rows]
        users = np.repeat(np.arange(len(items)), [len(i) for i in items])
        cols = np.concatenate(items) if items else np.zeros(0, np.int64)
        x = csr_matrix((np.ones(len(cols), np.int32), (users, cols)), shape=(len(items), n))
        deg = np.bincount(cols, minlength=n).astype(np.float32)
        both = (x.T.tocsr() @ x).tocoo()
        off = both.row != both.col
        pairs = csr_matrix((both.data[off], (both.row[off], both.col[off])), shape=(n, n))
        pairs.sort_indices()
        indptr, cols, counts = pairs.indptr.astype(np.int64), pairs.indices, pairs.data
        if counts.max(initial=0) > np.iinfo(np.uint16).max:
            raise ValueError("a co-visit count exceeds uint16")
        return cls(keys, indptr, cols.astype(np.int32), counts.astype(np.uint16), deg)

    def save(self, path: str | os.PathLike) -> None:
        np.savez_compressed(path, platform=np.array([p for p, _ in self.keys]),
                            item_id=np.array([i for _, i in self.keys]), indptr=self.indptr,
                            indices=self.indices, counts=self.counts, deg=self.deg)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CoVisits":
        with np.load(Path(path)) as z:
            keys = list(zip(z["platform"].tolist(), z["item_id"].tolist()))
            return cls(keys, z["indptr"], z["indices"], z["counts"], z["deg"])

    def rows(self, keys) -> np.ndarray:
        """int64 row of each (platform, item_id); -1 for items the counts do not know."""
        return np.array([self.row_of.get(k, -1) for k in keys], np.int64)

    def pair_counts(self, row: int, others: np.ndarray) -> np.ndarray:
        """int64 [len(others)]: counts[row, j] for each row j of `others` (-1 rows: 0)."""
        out = np.zeros(len(others), np.int64)
        if row < 0 or not len(others):
            return out
        lo, hi = self.indptr[row], self.indptr[row + 1]
        cols, counts = self.indices[lo:hi], self.counts[lo:hi]
        at = np.searchsorted(cols, others)  # a CSR row's columns are ascending
        hit = (others >= 0) & (at < len(cols))
        hit[hit] = cols[at[hit]] == others[hit]
        out[hit] = counts[at[hit]]
        return out

    def sums(self, history_rows: np.ndarray, history_platforms: np.ndarray, target: str,
             own_rows: np.ndarray | None = None) -> "Sums":
        """Per item j, float32 [n] each (see Sums), over the user's distinct history items;
        history newest first. `own_rows` (training only): every item of a user whose events
        are inside the counts; that user's own contribution is taken out, so training sees
        what a user unknown to the counts would get."""
        n = len(self)
        deg = self.deg
        own = None
        if own_rows is not None and len(own_rows):
            own = np.unique(own_rows[own_rows >= 0])
            deg = deg.copy()
            deg[own] -= 1
        keep = history_rows >= 0
        hist, first = np.unique(history_rows[keep], return_index=True)
        plats = history_platforms[keep][first]
        newest = int(history_rows[keep][0]) if len(hist) else -1
        weight = 1.0 / np.sqrt(np.maximum(deg[hist], 1.0))
        # Every history item's CSR slice at once: entries [lo, hi) of each item, owner = the
        # history item an entry belongs to.
        lo, hi = self.indptr[hist], self.indptr[hist + 1]
        lens = hi - lo
        owner = np.repeat(np.arange(len(hist)), lens)
        entries = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens) + lo[owner]
        cols = self.indices[entries]
        counts = self.counts[entries].astype(np.float64)
        on_target = (plats == target)[owner]
        same = np.bincount(cols, counts * on_target, n).astype(np.float32)
        other = np.bincount(cols, counts * ~on_target, n).astype(np.float32)
        cos = np.bincount(cols, counts * weight[owner], n).astype(np.float32)
        last = np.zeros(n, np.float32)
        if newest >= 0:
            at = owner == int(np.searchsorted(hist, newest))
            last[cols[at]] = counts[at]
        if own is not None:
            # The user added 1 to counts[i, j] for every pair of their distinct items i != j,
            # and every history item is one of them.
            is_same = np.isin(own, hist[plats == target])
            is_other = np.isin(own, hist[plats != target])
            n_same = int((plats == target).sum())
            same[own] -= n_same - is_same
            other[own] -= len(hist) - n_same - is_other
            w_of = dict(zip(hist.tolist(), weight.tolist()))
            cos[own] -= weight.sum() - np.array([w_of.get(j, 0.0) for j in own.tolist()])
            last[own[own != newest]] -= 1 if newest >= 0 else 0
        return Sums(same, other, deg, cos, last)

    def user_sums(self, history_keys: list[tuple[str, str]], target: str,
                  own_rows: np.ndarray | None = None):
        """self.sums of a user's history (platform, item_id) keys, e.g. UserContext's."""
        return self.sums(self.rows(history_keys),
                         np.array([p for p, _ in history_keys], dtype=object), target, own_rows)

    def features(self, sums: "Sums", rows: np.ndarray) -> np.ndarray:
        """float32 [N, N_COVISIT_FEATURES] of candidate rows (-1: an item the counts do not
        know -> zeros): log1p of same, other, the item-kNN score (same + other) / sqrt(deg +
        1), the cosine score cos / sqrt(deg), and last (see Sums)."""
        out = np.zeros((len(rows), N_COVISIT_FEATURES), np.float32)
        known = rows >= 0
        r = rows[known]
        s, o = np.maximum(sums.same[r], 0), np.maximum(sums.other[r], 0)
        deg = np.maximum(sums.deg[r], 0)
        out[known, 0] = np.log1p(s)
        out[known, 1] = np.log1p(o)
        out[known, 2] = np.log1p((s + o) / np.sqrt(deg + 1))
        out[known, 3] = np.log1p(100 * np.maximum(sums.cos[r], 0) / np.sqrt(np.maximum(deg, 1)))
        out[known, 4] = np.log1p(np.maximum(sums.last[r], 0))
        return out
