"""dataio: CSV files by path, the one reading of a data row as an event (any column layout,
the shared layout by default), the real datasets; and a CSV of another layout loaded into a
fusion engine."""

import csv
import gzip
import time

import pytest

from dataio import (AMAZON, AMAZON_ORIGIN_MS, MOVIELENS, EventColumns, action_and_weight,
                    item_texts, iter_events, open_csv, read_items, read_items_csv, time_ms,
                    to_event)
from recmodel.events import ACTION_INTERACT, ACTION_RATE, DEFAULT_WEIGHT
from services.embedding.engine import EmbeddingEngine
from services.fusion.engine import FusionEngine
from recmodel.user_model import BaselineUserModel
from services.fusion.sqlite_store import SQLiteProfileStore

PURCHASE, VIEW = 5, 1


@pytest.mark.parametrize("value, expected", [
    ("interact", (ACTION_INTERACT, None)),
    ("", (ACTION_INTERACT, None)),
    ("bought it", (ACTION_INTERACT, None)),
    ("4", (ACTION_RATE, 4.0)),
    (" 4.5 ", (ACTION_RATE, 4.5)),
    ("-1", (ACTION_RATE, -1.0)),  # refused by validation, not read as an interaction
    ("Purchase", (PURCHASE, None)),
    ("view", (VIEW, None)),
    ("rate", (ACTION_RATE, None)),
])
def test_the_action_column_is_a_rating_an_action_name_or_an_interaction(value, expected):
    assert action_and_weight(value) == expected


@pytest.mark.parametrize("value", ["nan", "inf", "-Infinity"])
def test_a_rating_that_is_not_finite_cannot_be_read(value):
    with pytest.raises(ValueError, match="finite"):
        action_and_weight(value)


def test_times_are_unix_seconds_milliseconds_or_iso_8601():
    assert time_ms("978300760") == 978_300_760_000
    assert time_ms("978300760.5") == 978_300_760_500
    assert time_ms("978300760123", "ms") == 978_300_760_123
    assert time_ms("2001-01-01T00:00:00") == 978_307_200_000
    assert time_ms("2001-01-01T01:00:00+01:00") == 978_307_200_000
    with pytest.raises(ValueError):
        time_ms("yesterday")
    with pytest.raises(ValueError):
        time_ms("inf")


def test_shared_rows_read_as_before_the_column_mapping():
    amazon = next(iter_events(AMAZON))
    texts = item_texts(AMAZON)
    assert to_event(amazon, texts) == dict(
        event_id=f"{amazon['user_id']}:0", user_id=amazon["user_id"], platform="arts_crafts",
        action=ACTION_INTERACT, item_id="0", item_text=texts[("arts_crafts", "0")],
        event_time_ms=AMAZON_ORIGIN_MS, weight=None)
    movie = next(iter_events(MOVIELENS))
    event = to_event(movie, {})
    assert (event["action"], event["weight"], event["event_time_ms"]) == (
        ACTION_RATE, 5.0, 978_300_760_000)
    assert event["event_id"].startswith(f"{movie['user_id']}:978300760000:")


def test_a_row_without_time_or_order_cannot_be_read():
    with pytest.raises(ValueError, match="no time"):
        to_event({"user_id": "u", "platform": "office", "item_id": "1",
                  "rating_or_action": "interact"}, {})


OTHER = EventColumns(user="customer", item="sku", fixed_platform="office", action="kind",
                     time="ts", time_unit="ms", weight="strength", text="title",
                     event_id="id")


def test_other_columns_map_onto_the_same_event_fields():
    assert OTHER.required() == ("customer", "sku", "kind", "strength", "title", "id")
    row = {"customer": "c1", "sku": "s9", "kind": "purchase", "ts": "1700000000000",
           "strength": "", "title": "red stapler", "id": ""}
    event = to_event(row, {}, OTHER)
    assert event.pop("event_id").startswith("c1:1700000000000:")  # derived: no id given
    assert event == dict(user_id="c1", platform="office", action=PURCHASE, item_id="s9",
                         item_text="red stapler", event_time_ms=1_700_000_000_000, weight=None)
    row.update(strength="2.5", id="e-1", title="")
    event = to_event(row, {("office", "s9"): "stapler from the catalogue"}, OTHER)
    assert (event["weight"], event["event_id"], event["item_text"]) == (
        2.5, "e-1", "stapler from the catalogue")
    fixed_action = EventColumns(user="customer", item="sku", fixed_platform="office",
                                fixed_action="view", time="ts", time_unit="ms")
    assert to_event(row, {}, fixed_action)["action"] == VIEW


def test_items_csv_rows_keep_non_empty_text_columns(tmp_path):
    path = tmp_path / "items.csv.gz"
    with gzip.open(path, "wt", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([["item_id", "platform", "title", "brand", "colour"],
                                 ["1", "office", "stapler, red", "acme", ""]])
    assert list(read_items_csv(path)) == [{"item_id": "1", "platform": "office",
                                           "title": "stapler, red",
                                           "attributes": {"brand": "acme"}}]
    (tmp_path / "bad.csv").write_text("id,title\n1,x\n")
    with pytest.raises(ValueError, match="missing column.s. item_id, platform in the header"):
        list(read_items_csv(tmp_path / "bad.csv"))
    with pytest.raises(FileNotFoundError, match="no such file: "):
        open_csv(tmp_path / "none.csv")


def test_the_shared_catalogue_reads_with_attributes():
    items = read_items(MOVIELENS)
    assert len(items) == 3883 and items[0]["title"] == "Toy Story"
    assert set(items[0]["attributes"]) == {"release_year", "genres"}


def test_a_csv_of_another_layout_loads_into_a_fusion_engine(tmp_path, encoder_dir):
    """Unix milliseconds, a weight column, item text in the file, no platform column."""
    path = tmp_path / "clicks.csv"
    now_ms = int(time.time() * 1000)
    rows = [["customer", "sku", "kind", "ts", "strength", "title", "id"],
            ["c1", "s1", "purchase", str(now_ms - 3000), "", "red stapler", "e1"],
            ["c1", "s2", "view", str(now_ms - 2000), "0.5", "blue gel pens", "e2"],
            ["c1", "s3", "3", str(now_ms - 1000), "", "desk lamp", "e3"]]
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)
    with open_csv(path) as f:
        events = [to_event(r, {}, OTHER) for r in csv.DictReader(f)]
    encoder = EmbeddingEngine(encoder_dir, device="cpu")
    engine = FusionEngine(SQLiteProfileStore(tmp_path / "p.sqlite3"),
                          lambda texts, budget_s=None: encoder.embed(texts)[0],
                          BaselineUserModel(), dim=384)
    try:
        assert engine.ingest(events) == (3, 0, 0)
        assert engine.ingest(events) == (0, 3, 0)  # the id column dedupes a reload
        profile = engine.profile("c1", "office", recent_limit=3)
    finally:
        engine.close()
    assert profile.known and profile.total_events == 3
    assert [p.platform for p in profile.platforms] == ["office"]
    assert [(e.event_id, e.action, e.weight, e.item_text) for e, _, _ in profile.recent] == [
        ("e3", ACTION_RATE, 3.0, "desk lamp"), ("e2", VIEW, 0.5, "blue gel pens"),
        ("e1", PURCHASE, DEFAULT_WEIGHT[PURCHASE], "red stapler")]
