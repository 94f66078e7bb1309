"""Value types of the crossrec client: plain dataclasses and enums, to and from protobuf."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clients.crossrec_client.errors import InvalidArgument
from crossrec.common.v1 import common_pb2
from crossrec.ranking.v1 import ranking_pb2


class Action(enum.StrEnum):
    """What a user did to an item (crossrec.common.v1.Action)."""
    VIEW = "view"
    CLICK = "click"
    LIKE = "like"
    ADD_TO_CART = "add_to_cart"
    PURCHASE = "purchase"
    RATE = "rate"  # Event.weight carries the 1..5 rating
    INTERACT = "interact"

    @property
    def number(self) -> int:
        return common_pb2.Action.Value("ACTION_" + self.name)


_ACTION_BY_NUMBER = {a.number: a for a in Action}


def _action(value: Action | str | int) -> Action:
    if isinstance(value, Action):
        return value
    if isinstance(value, int) and value in _ACTION_BY_NUMBER:
        return _ACTION_BY_NUMBER[value]
    if isinstance(value, str) and value.lower() in Action._value2member_map_:
        return Action(value.lower())
    raise InvalidArgument("INVALID_ARGUMENT", f"action must be one of "
                          f"{', '.join(a.value for a in Action)}, got {value!r}")


def _proto_member(cls, proto_enum, prefix: str, number: int):
    """The member of `cls` (lower-case proto names without `prefix`) for a proto enum
    number; UNSPECIFIED for one added to the contract after this client was built."""
    try:
        return cls(proto_enum.Name(number).removeprefix(prefix).lower())
    except ValueError:
        return cls.UNSPECIFIED


class Source(enum.StrEnum):
    """Why an item was recommended (crossrec.ranking.v1.Source)."""
    UNSPECIFIED = "unspecified"
    PERSONALISED = "personalised"
    CROSS_PLATFORM = "cross_platform"
    POPULARITY_FALLBACK = "popularity_fallback"

    @classmethod
    def from_pb(cls, number: int) -> Source:
        return _proto_member(cls, ranking_pb2.Source, "SOURCE_", number)


class Driver(enum.StrEnum):
    """The feature group that lifted a recommended item most (crossrec.ranking.v1.Driver)."""
    UNSPECIFIED = "unspecified"
    TEXT = "text"
    COVISIT = "covisit"
    POPULARITY = "popularity"
    HISTORY = "history"

    @classmethod
    def from_pb(cls, number: int) -> Driver:
        return _proto_member(cls, ranking_pb2.Driver, "DRIVER_", number)


@dataclass(frozen=True)
class Event:
    """One behaviour event. `action` takes an Action, its name ("purchase") or its number.

    `event_id` empty: the server derives one; `event_time_ms` 0: now (stamped by the client
    on ingest, so a retried batch derives the same ids); `weight` None: the action's default.
    """
    user_id: str
    platform: str
    item_id: str
    action: Action | str | int
    item_text: str = ""
    event_time_ms: int = 0
    weight: float | None = None
    event_id: str = ""

    def __post_init__(self):
        object.__setattr__(self, "action", _action(self.action))

    @classmethod
    def of(cls, value: Event | Mapping[str, Any]) -> Event:
        """An Event from itself or from a mapping of its fields (e.g. dataio.to_event)."""
        return value if isinstance(value, Event) else cls(**value)

    def to_pb(self, now_ms: int = 0) -> common_pb2.BehaviorEvent:
        pb = common_pb2.BehaviorEvent(
            event_id=self.event_id, user_id=self.user_id, platform=self.platform,
            action=self.action.number, item_id=self.item_id, item_text=self.item_text,
            event_time_ms=self.event_time_ms or now_ms)
        if self.weight is not None:
            pb.weight = self.weight
        return pb

    @classmethod
    def from_pb(cls, pb: common_pb2.BehaviorEvent) -> Event:
        return cls(user_id=pb.user_id, platform=pb.platform, item_id=pb.item_id,
                   action=_ACTION_BY_NUMBER.get(pb.action, Action.INTERACT),
                   item_text=pb.item_text, event_time_ms=pb.event_time_ms,
                   weight=pb.weight if pb.HasField("weight") else None, event_id=pb.event_id)


@dataclass(frozen=True)
class Item:
    """A catalogue item; `attributes` values are appended to the title for embedding."""
    item_id: str
    platform: str
    title: str
    attributes: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, value: Item | Mapping[str, Any]) -> Item:
        return value if isinstance(value, Item) else cls(**value)

    def to_pb(self) -> ranking_pb2.Item:
        return ranking_pb2.Item(item_id=self.item_id, platform=self.platform, title=self.title,
                                attributes=dict(self.attributes))


@dataclass(frozen=True)
class ModelRef:
    """A model in the model repository: models/<name>/<version>/."""
    name: str
    version: int

    @classmethod
    def from_pb(cls, pb: common_pb2.ModelRef) -> ModelRef:
        return cls(pb.name, pb.version)


@dataclass(frozen=True)
class ModelInfo:
    """The embedding service's model and limits."""
    model: ModelRef
    dim: int
    max_sequence_tokens: int
    max_texts_per_request: int
    provider: str
    source_model: str
    precision: str


@dataclass(frozen=True)
class IngestResult:
    """Counts over acknowledged (durable) events.

    accepted: newly stored; duplicates: already stored (by event_id); batches: request
    messages processed; events: input events covered (counted by the client); conflicts: the
    duplicates whose content (platform, action, item, time as sent, weight) differs from the
    stored event's, which was kept: a re-used event id, worth a look.
    """
    accepted: int = 0
    duplicates: int = 0
    batches: int = 0
    events: int = 0
    conflicts: int = 0

    def __add__(self, other: IngestResult) -> IngestResult:
        return IngestResult(self.accepted + other.accepted, self.duplicates + other.duplicates,
                            self.batches + other.batches, self.events + other.events,
                            self.conflicts + other.conflicts)


@dataclass(frozen=True)
class PlatformProfile:
    """The user on one platform; `vector` float32 [dim], L2-normalised."""
    platform: str
    vector: np.ndarray
    event_count: int
    last_seen_ms: int
    fusion_weight: float


@dataclass(frozen=True)
class ProfileEvent:
    """A stored event and its item vector (float32 [dim], L2-normalised)."""
    event: Event
    item_vector: np.ndarray


@dataclass(frozen=True)
class Profile:
    """A user's fused profile. Vectors are float32 [dim], None when the user is unknown."""
    user_id: str
    known: bool
    platforms: dict[str, PlatformProfile]
    fused_vector: np.ndarray | None
    for_platform: str
    for_platform_vector: np.ndarray | None
    dim: int
    total_events: int
    model: ModelRef
    baseline: bool
    recent_events: list[ProfileEvent]


@dataclass(frozen=True)
class ItemStat:
    """Events stored on one item (all users, all time) and the newest one's time."""
    item_id: str
    event_count: int
    last_event_ms: int


@dataclass(frozen=True)
class Contribution:
    """A history item that drove a recommendation; `similarity` is a cosine in [-1, 1];
    `co_users`: users who had both it and the item (when co-visitation drove it), else 0."""
    platform: str
    item_id: str
    item_text: str
    similarity: float
    co_users: int = 0


@dataclass(frozen=True)
class Recommendation:
    item_id: str
    platform: str
    title: str
    score: float
    source: Source
    explanation: str
    contributions: list[Contribution]
    # The group that lifted it most, and every group's share of its score, largest first
    # (exact Shapley values against the request's mean candidate; empty without a ranker).
    driver: Driver = Driver.UNSPECIFIED
    attributions: dict[Driver, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Recommendations:
    """A ranked list, best first; iterate it for the items."""
    items: list[Recommendation]
    source: Source
    platform_weights: dict[str, float]
    degraded: bool
    degraded_reason: str
    models: list[ModelRef]

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]
