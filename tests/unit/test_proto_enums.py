"""The Action numbers every layer uses come from the generated protobuf modules, the ranking
servicer maps the engine's sources and drivers (plain strings) to the Source and Driver enums,
and the contract's enums are pinned: a change to an enum in protos/ fails here first.

A new or renumbered Action changes what the trained user tower embeds (its action vocabulary
is the enum's numbers) and needs a default weight (recmodel/events.py), a client
`Action` member and a new user tower export; a new Source needs a client `Source` member, an
engine source and its entry in services/ranking/server.py SOURCES."""

from clients.crossrec_client import Action, Source
from crossrec.common.v1 import common_pb2
from crossrec.ranking.v1 import ranking_pb2
from recmodel import events
from recmodel import pooling
from services.ranking import engine

PINNED_ACTIONS = {"ACTION_UNSPECIFIED": 0, "ACTION_VIEW": 1, "ACTION_CLICK": 2,
                  "ACTION_LIKE": 3, "ACTION_ADD_TO_CART": 4, "ACTION_PURCHASE": 5,
                  "ACTION_RATE": 6, "ACTION_INTERACT": 7}
PINNED_SOURCES = {"SOURCE_UNSPECIFIED": 0, "SOURCE_PERSONALISED": 1,
                  "SOURCE_CROSS_PLATFORM": 2, "SOURCE_POPULARITY_FALLBACK": 3}


def enum_values(enum_wrapper) -> dict[str, int]:
    return {v.name: v.number for v in enum_wrapper.DESCRIPTOR.values}


def test_the_contracts_action_enum_is_the_pinned_one():
    assert enum_values(common_pb2.Action) == PINNED_ACTIONS


def test_the_contracts_source_enum_is_the_pinned_one():
    assert enum_values(ranking_pb2.Source) == PINNED_SOURCES


def test_engine_action_tables_are_the_protos():
    proto = enum_values(common_pb2.Action)
    assert events.ACTION_NAMES == tuple(sorted(proto, key=proto.get))
    assert {f"ACTION_{name.upper()}": n for n, name in events.ACTIONS.items()} == {
        name: n for name, n in proto.items() if n}
    assert (events.ACTION_RATE, events.ACTION_INTERACT) == (proto["ACTION_RATE"],
                                                            proto["ACTION_INTERACT"])
    assert set(events.DEFAULT_WEIGHT) == set(events.ACTIONS)


def test_the_user_models_action_conventions_are_the_engines():
    assert pooling.ACTION_NAMES is events.ACTION_NAMES
    assert pooling.DEFAULT_ACTION_WEIGHT is events.DEFAULT_WEIGHT
    assert (pooling.ACTION_RATE, pooling.ACTION_INTERACT) == (events.ACTION_RATE,
                                                              events.ACTION_INTERACT)


def test_every_engine_source_has_its_proto_source_and_client_member():
    from services.ranking.server import SOURCES

    proto = enum_values(ranking_pb2.Source)
    assert set(SOURCES) == {engine.PERSONALISED, engine.CROSS_PLATFORM, engine.POPULARITY}
    assert {ranking_pb2.Source.Name(n): s for s, n in SOURCES.items()} == {
        name: name.removeprefix("SOURCE_").lower() for name in proto
        if name != "SOURCE_UNSPECIFIED"}


def test_the_ranking_engine_imports_no_generated_module():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(engine))
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)] + [
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.startswith("crossrec")], imported


def test_client_action_members_are_the_protos_actions():
    proto = enum_values(common_pb2.Action)
    assert {f"ACTION_{a.name}": a.number for a in Action} == {
        name: n for name, n in proto.items() if n}
    assert [a.value for a in Action] == [events.ACTIONS[a.number] for a in Action]


def test_client_source_members_are_the_protos_sources():
    proto = enum_values(ranking_pb2.Source)
    assert {f"SOURCE_{s.name}": s.value for s in Source} == {
        name: name.removeprefix("SOURCE_").lower() for name in proto}


def test_every_attribution_group_has_its_proto_driver_and_client_member():
    from clients.crossrec_client import Driver
    from recmodel import attribution
    from services.ranking.server import DRIVERS

    proto = enum_values(ranking_pb2.Driver)
    assert {f"DRIVER_{d.name}": d.value for d in Driver} == {
        name: name.removeprefix("DRIVER_").lower() for name in proto}
    assert set(DRIVERS) == set(attribution.NAMES)
    assert {ranking_pb2.Driver.Name(n) for n in DRIVERS.values()} == {
        f"DRIVER_{g.upper()}" for g in attribution.NAMES} == set(proto) - {"DRIVER_UNSPECIFIED"}
