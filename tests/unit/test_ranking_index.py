"""PlatformIndex (exact and HNSW) and SQLiteCatalog on real item vectors."""

import numpy as np
import pytest

from services.ranking.catalog import CatalogItem
from services.ranking.sqlite_catalog import SQLiteCatalog
from recmodel.index import EXACT, HNSW, PlatformIndex


@pytest.fixture(scope="module")
def real_vectors(encoder_dir, titles):
    from recmodel.encoder import Encoder
    from dataio import sample_titles
    engine = Encoder(encoder_dir, device="cpu")
    texts = sample_titles(1500, seed=3)
    return texts, engine.run_sorted(engine.tokenize(texts), 64)


def brute_force(vectors, query, k):
    return list(np.argsort(-(vectors @ query), kind="stable")[:k])


def test_exact_search_matches_brute_force(real_vectors):
    texts, vectors = real_vectors
    index = PlatformIndex(vectors.shape[1], EXACT)
    index.upsert([str(i) for i in range(len(texts))], vectors)
    ids, scores = index.search(vectors[7], 10)
    assert ids == [str(i) for i in brute_force(vectors, vectors[7], 10)]
    assert ids[0] == "7" and abs(scores[0] - 1) < 1e-5


def test_hnsw_recall_at_10_on_real_vectors_is_high(real_vectors):
    texts, vectors = real_vectors
    index = PlatformIndex(vectors.shape[1], HNSW)
    index.upsert([str(i) for i in range(len(texts))], vectors)
    hits = 0
    for q in range(0, 1500, 15):
        got = set(index.search(vectors[q], 10)[0])
        hits += len(got & {str(i) for i in brute_force(vectors, vectors[q], 10)})
    assert hits / (100 * 10) >= 0.95


@pytest.mark.parametrize("kind", [EXACT, HNSW])
def test_replaced_deleted_and_excluded_items_never_come_back(real_vectors, kind):
    texts, vectors = real_vectors
    index = PlatformIndex(vectors.shape[1], kind)
    index.upsert([str(i) for i in range(100)], vectors[:100])
    index.upsert(["5"], vectors[50:51])            # item 5 now has item 50's vector
    assert index.delete(["50", "nope"]) == 1
    ids, _ = index.search(vectors[50], 5, exclude={"51"})
    assert ids[0] == "5" and "50" not in ids and "51" not in ids
    assert len(index) == 99 and len(ids) == 5


def test_compaction_keeps_every_live_item(real_vectors):
    texts, vectors = real_vectors
    index = PlatformIndex(vectors.shape[1], EXACT)
    ids = [str(i) for i in range(1500)]
    index.upsert(ids, vectors)
    index.delete(ids[:1200])                      # past a quarter: rebuilt without tombstones
    assert len(index) == 300 and len(index.snapshot().ids) == 300
    assert index.search(vectors[1300], 1)[0] == ["1300"]


def test_catalog_survives_reopening_and_replaces_items(tmp_path, real_vectors):
    texts, vectors = real_vectors
    catalog = SQLiteCatalog(tmp_path / "c.sqlite3", vectors.shape[1])
    catalog.upsert([CatalogItem(str(i), "office", texts[i], {"brand": "b"}, texts[i])
                    for i in range(20)], vectors[:20])
    catalog.upsert([CatalogItem("3", "office", "renamed", {}, "renamed")], vectors[10:11])
    assert catalog.delete("office", ["4", "unknown"]) == 1
    catalog.close()
    reopened = SQLiteCatalog(tmp_path / "c.sqlite3", vectors.shape[1])
    assert reopened.size("office") == 19 and reopened.get("office", "3").title == "renamed"
    assert reopened.get("office", "0").attributes == {"brand": "b"}
    np.testing.assert_array_equal(reopened.index("office").vectors(["3"])[0], vectors[10])
    assert reopened.platforms() == ["office"]


def test_auto_index_switches_to_hnsw_past_the_threshold(tmp_path, real_vectors):
    texts, vectors = real_vectors
    catalog = SQLiteCatalog(tmp_path / "c.sqlite3", vectors.shape[1], hnsw_threshold=100)
    catalog.upsert([CatalogItem(str(i), "p", "t", {}, "t") for i in range(50)], vectors[:50])
    assert catalog.index("p").kind == EXACT
    catalog.upsert([CatalogItem(str(i), "p", "t", {}, "t") for i in range(50, 150)],
                   vectors[50:150])
    assert catalog.index("p").kind == HNSW and len(catalog.index("p")) == 150
