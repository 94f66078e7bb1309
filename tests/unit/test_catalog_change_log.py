"""The SQLite catalogue shared by several processes: what one writes, every other serves after
its next refresh(), deletes included; concurrent writers lose nothing; a process that fell
behind the trimmed change log reloads."""

from __future__ import annotations

import multiprocessing
import time

import numpy as np

from services.ranking import sqlite_catalog as catalog_module
from services.ranking.catalog import CatalogItem
from services.ranking.sqlite_catalog import SQLiteCatalog

DIM = 8


def unit_vectors(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def items(ids, platform="office", title="item") -> list[CatalogItem]:
    return [CatalogItem(i, platform, f"{title} {i}", {}, f"{title} {i}") for i in ids]


def test_an_upsert_and_a_delete_through_one_connection_show_on_another_after_refresh(tmp_path):
    path = tmp_path / "c.sqlite3"
    a, b = SQLiteCatalog(path, DIM, "exact"), SQLiteCatalog(path, DIM, "exact")
    try:
        a.upsert(items(["x", "y"]), unit_vectors(2, 1))
        assert b.get("office", "x") is None, "not before refresh: the test would prove nothing"
        b.refresh()
        assert b.get("office", "x").title == "item x" and b.size("office") == 2
        ids, _ = b.index("office").search(unit_vectors(2, 1)[0], 1)
        assert ids == ["x"]

        a.upsert(items(["x"], title="renamed"), unit_vectors(1, 2))
        assert b.delete("office", ["y", "never-there"]) == 1
        a.refresh()
        b.refresh()
        for view in (a, b):
            assert view.item_ids("office") == ["x"]
            assert view.get("office", "x").title == "renamed x"
            np.testing.assert_array_equal(view.index("office").vectors(["x"]),
                                          unit_vectors(1, 2))
    finally:
        a.close()
        b.close()


def test_refresh_with_nothing_new_changes_nothing(tmp_path):
    c = SQLiteCatalog(tmp_path / "c.sqlite3", DIM, "exact")
    try:
        c.upsert(items(["x"]), unit_vectors(1, 1))
        snapshot = c.index("office").snapshot()
        for _ in range(3):
            c.refresh()
        assert c.index("office").snapshot() is snapshot
    finally:
        c.close()


def _writer(path: str, worker: int, n: int) -> None:
    c = SQLiteCatalog(path, DIM, "exact")
    for k in range(n):
        c.upsert(items([f"w{worker}-{k}"]), unit_vectors(1, 100 * worker + k))
        if k % 3 == 2:
            c.delete("office", [f"w{worker}-{k - 1}"])
    c.close()


def _opener(path: str, start, out) -> None:
    start.wait(30)
    try:
        SQLiteCatalog(path, DIM, "exact").close()
        out.put("ok")
    except Exception as err:  # noqa: BLE001 - reported to the test
        out.put(repr(err))


def test_processes_opening_a_new_catalogue_file_together_all_succeed(tmp_path):
    """Worker processes start together on a file that does not exist yet: switching it to WAL
    at the same moment must not fail any of them ("database is locked")."""
    ctx = multiprocessing.get_context("fork")
    for trial in range(10):
        path = str(tmp_path / f"new-{trial}.sqlite3")
        start, out = ctx.Barrier(6), ctx.Queue()
        procs = [ctx.Process(target=_opener, args=(path, start, out)) for _ in range(6)]
        for p in procs:
            p.start()
        results = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(30)
        assert results == ["ok"] * 6, results


def test_concurrent_writer_processes_lose_no_write(tmp_path):
    path = str(tmp_path / "c.sqlite3")
    watcher = SQLiteCatalog(path, DIM, "exact")
    n, writers = 30, 4
    try:
        procs = [multiprocessing.get_context("fork").Process(target=_writer, args=(path, w, n))
                 for w in range(writers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert [p.exitcode for p in procs] == [0] * writers
        expected = {f"w{w}-{k}" for w in range(writers) for k in range(n)
                    if not (k % 3 == 1 and k + 1 < n)}
        watcher.refresh()
        assert set(watcher.item_ids("office")) == expected
        fresh = SQLiteCatalog(path, DIM, "exact")
        assert set(fresh.item_ids("office")) == expected
        fresh.close()
    finally:
        watcher.close()


def test_a_process_behind_the_trimmed_change_log_reloads_everything(tmp_path, monkeypatch):
    monkeypatch.setattr(catalog_module, "CHANGE_LOG_ROWS", 3)
    path = tmp_path / "c.sqlite3"
    a, b = SQLiteCatalog(path, DIM, "exact"), SQLiteCatalog(path, DIM, "exact")
    try:
        b.refresh()
        a.upsert(items(["gone"]), unit_vectors(1, 1))
        b.refresh()
        a.delete("office", ["gone"])
        a.upsert(items([f"i{k}" for k in range(5)]), unit_vectors(5, 2))
        b.refresh()
        assert sorted(b.item_ids("office")) == [f"i{k}" for k in range(5)]
    finally:
        a.close()
        b.close()


def test_a_following_catalogue_applies_another_connections_write_without_a_call(tmp_path):
    path = tmp_path / "c.sqlite3"
    a, b = SQLiteCatalog(path, DIM, "exact"), SQLiteCatalog(path, DIM, "exact")
    b.follow(0.02)
    try:
        a.upsert(items(["x"]), unit_vectors(1, 1))
        for _ in range(500):
            if b.get("office", "x") is not None:
                break
            time.sleep(0.01)
        assert b.get("office", "x") is not None
    finally:
        a.close()
        b.close()


# Writes whose ids sort unlike their order ("10" < "2" < "a"), a re-upsert (b moves to the
# end), a repeated id in one call (the last wins) and a delete: live rows in write order.
WRITES = [("upsert", ["b", "10", "2"]), ("upsert", ["a", "1", "b"]), ("upsert", ["c", "c"]),
          ("delete", ["10"])]
WRITE_ORDER = ["2", "a", "1", "b", "c"]


def live_rows(catalog) -> tuple[list[str], np.ndarray]:
    """(item ids, float32 vectors) of the platform's live index rows, in row order."""
    snap = catalog.index("office").snapshot()
    rows = np.flatnonzero(snap.alive)
    return [snap.ids[r] for r in rows], snap.vectors[rows]


def apply_writes(catalog, after_each=lambda: None) -> dict[str, np.ndarray]:
    """WRITES through `catalog`; each item's last vector."""
    last = {}
    for n, (op, ids) in enumerate(WRITES):
        if op == "upsert":
            vecs = unit_vectors(len(ids), 10 + n)
            catalog.upsert(items(ids, title=f"v{n}"), vecs)
            last.update(zip(ids, vecs))
        else:
            catalog.delete("office", ids)
        after_each()
    return last


def test_every_process_holds_the_rows_in_write_order_whatever_the_ids_sort_to(tmp_path):
    """The writer, a process that caught up write by write, one that caught up at the end
    and one that loaded the file: the same live rows in the same order, the order of the
    writes (SQLite returns rows in key order), so ties and scan sums agree on every one."""
    path = tmp_path / "c.sqlite3"
    writer, stepwise, late = (SQLiteCatalog(path, DIM, "exact") for _ in range(3))
    try:
        last = apply_writes(writer, stepwise.refresh)
        late.refresh()
        loaded = SQLiteCatalog(path, DIM, "exact")
        for view in (writer, stepwise, late, loaded):
            ids, vecs = live_rows(view)
            assert ids == WRITE_ORDER
            np.testing.assert_array_equal(vecs, np.stack([last[i] for i in ids]))
        loaded.close()
    finally:
        for view in (writer, stepwise, late):
            view.close()


def test_a_file_from_before_write_order_opens_and_new_writes_follow_its_items(tmp_path):
    """A catalogue file written before the `written` column: its items load first (in key
    order), and what is written from then on comes after them in write order."""
    import sqlite3

    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE items (platform TEXT NOT NULL, item_id TEXT NOT NULL, title TEXT NOT "
        "NULL, attributes TEXT NOT NULL, text TEXT NOT NULL, vector BLOB NOT NULL, PRIMARY KEY "
        "(platform, item_id)) WITHOUT ROWID; CREATE TABLE changes (seq INTEGER PRIMARY KEY "
        "AUTOINCREMENT, platform TEXT NOT NULL, item_id TEXT NOT NULL);")
    old.executemany("INSERT INTO items VALUES ('office', ?, ?, '{}', ?, ?)",
                    [(i, i, i, v.tobytes()) for i, v in zip(["z", "y"], unit_vectors(2, 1))])
    old.commit()
    old.close()
    a = SQLiteCatalog(path, DIM, "exact")
    try:
        assert live_rows(a)[0] == ["y", "z"]
        a.upsert(items(["x", "w"]), unit_vectors(2, 2))
        b = SQLiteCatalog(path, DIM, "exact")
        assert live_rows(a)[0] == live_rows(b)[0] == ["y", "z", "x", "w"]
        b.close()
    finally:
        a.close()
