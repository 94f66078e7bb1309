"""The shared input rules of services/common/validation.py and text.py: one id rule for every
RPC, visible texts, ratings, catalogue items, and the content digest that tells a conflict
from a re-send."""

import pytest

from services.common.errors import InvalidInput
from services.common.validation import (MAX_ATTRIBUTES, check_id, content_digest,
                                        validate_event, validate_item)
from recmodel.text import has_visible_text

NOW_MS = 1_700_000_000_000
BAD_IDS = {"NUL": "a\x00b", "newline": "a\nb", "ANSI escape": "\x1b[31mred\x1b[0m",
           "lone zero-width space": "\u200b", "bidi override": "abc\u202edef",
           "BOM": "\ufeffid", "only spaces": "   ", "tab": "a\tb", "DEL": "a\x7f",
           "line separator": "a\u2028b"}


def ev(**fields):
    base = dict(event_id="", user_id="u1", platform="office", action=2, item_id="i1",
                item_text="red stapler", event_time_ms=NOW_MS - 1000, weight=None)
    base.update(fields)
    return base


@pytest.mark.parametrize("value", BAD_IDS.values(), ids=BAD_IDS.keys())
def test_an_id_with_control_format_or_only_space_characters_is_refused_naming_the_field(value):
    with pytest.raises(InvalidInput) as err:
        check_id(value, "items[3].item_id")
    assert str(err.value).startswith("items[3].item_id ")
    assert value.strip() == "" or value not in str(err.value), "the bad id is not echoed"


@pytest.mark.parametrize("value", ["A7PVZNHRTX1J7", "4711", "user name", "müller",
                                   "\u00e9t\u00e9", "\U0001f642", "a" * 128, "x-y_z:1/2"])
def test_printable_ids_up_to_128_bytes_pass(value):
    check_id(value, "user_id")


def test_an_id_over_128_bytes_is_refused_also_when_it_is_10_megabytes():
    for value in ("\u00e9" * 65, "x" * 10_000_000):
        with pytest.raises(InvalidInput, match="item_ids\\[0\\] must be at most 128 bytes"):
            check_id(value, "item_ids[0]")


@pytest.mark.parametrize("field", ["user_id", "item_id", "event_id"])
def test_every_id_of_an_event_follows_the_rule(field):
    with pytest.raises(InvalidInput, match=f"events\\[0\\].{field} must hold printable"):
        validate_event(**ev(**{field: "bad\x1bid"}), field="events[0]", now_ms=NOW_MS)


@pytest.mark.parametrize("text", ["\u200b", "\ufeff\u200b\u200d", "\u202e", "\x00\u200b"])
def test_an_item_text_of_invisible_characters_only_is_refused(text):
    with pytest.raises(InvalidInput, match="events\\[0\\].item_text must be empty or hold"):
        validate_event(**ev(item_text=text), field="events[0]", now_ms=NOW_MS)


def test_visible_text_is_any_character_that_shows():
    assert has_visible_text("a\u200b") and has_visible_text("\U0001f642")
    assert has_visible_text("e\u0301")
    for blank in ("", " \t\n", "\x00\x01", "\u200b\u200c\u200d\u2060\ufeff", "\u00a0\u3000"):
        assert not has_visible_text(blank), repr(blank)


@pytest.mark.parametrize("weight", [0.5, 0.99, 5.01, 6.0, 100.0])
def test_a_rating_outside_1_to_5_is_refused_for_action_rate(weight):
    with pytest.raises(InvalidInput, match="events\\[2\\].weight is the rating .* 1..5"):
        validate_event(**ev(action=6, weight=weight), field="events[2]", now_ms=NOW_MS)


@pytest.mark.parametrize("weight,expected", [(1.0, 1.0), (4.5, 4.5), (5.0, 5.0), (None, 3.0)])
def test_ratings_in_1_to_5_and_an_unset_rating_pass(weight, expected):
    event = validate_event(**ev(action=6, weight=weight), field="e", now_ms=NOW_MS)
    assert event.weight == expected


def test_other_actions_keep_weights_up_to_100():
    assert validate_event(**ev(action=5, weight=100.0), field="e", now_ms=NOW_MS).weight == 100


def test_the_digest_uses_the_time_as_sent_so_an_unset_time_resent_later_matches_itself():
    first = validate_event(**ev(event_id="e1", event_time_ms=0), field="e", now_ms=NOW_MS)
    later = validate_event(**ev(event_id="e1", event_time_ms=0), field="e",
                           now_ms=NOW_MS + 60_000)
    assert first.event_time_ms != later.event_time_ms and first.digest == later.digest
    other = validate_event(**ev(event_id="e1", item_id="i2"), field="e", now_ms=NOW_MS)
    assert other.digest != first.digest
    assert first.digest == content_digest("office", 2, "i1", 0, 1.0)


def test_an_item_is_returned_with_its_title_stripped_and_the_text_its_vector_is_made_from():
    title, attributes, text = validate_item("i1", "office", "  red stapler ",
                                            {"brand": "acme"}, field="items[0]")
    assert (title, attributes) == ("red stapler", {"brand": "acme"})
    assert text.startswith("red stapler") and "acme" in text
    assert validate_item("i1", "office", "glue", None, field="items[0]")[1] == {}


@pytest.mark.parametrize(("fields", "message"), [
    (dict(item_id=""), "items[2].item_id is required"),
    (dict(platform="Office"), "items[2].platform must match"),
    (dict(title="   "), "items[2].title must hold 1..2048 characters, got 0"),
    (dict(title="x" * 2049), "items[2].title must hold 1..2048 characters, got 2049"),
    (dict(title="\u200b\u200b"), "items[2].title must hold visible text"),
    (dict(attributes={f"k{n}": "v" for n in range(MAX_ATTRIBUTES + 1)}),
     "items[2].attributes must hold at most 16 entries, got 17"),
    (dict(attributes={"colour": "x" * 2049}), "items[2].attributes['colour'] must be at most"),
])
def test_an_item_breaking_a_rule_is_refused_naming_its_field(fields, message):
    item = dict(item_id="i1", platform="office", title="red stapler", attributes=None)
    with pytest.raises(InvalidInput) as err:
        validate_item(**{**item, **fields}, field="items[2]")
    assert str(err.value).startswith(message)

