"""Behaviour events as the models see them: the event value, the Action enum's numbers and
names (read from the generated protos, their one source) and each action's default weight.
Validation of what callers send lives in services/common/validation.py."""

from __future__ import annotations

from dataclasses import dataclass, field

from crossrec.common.v1 import common_pb2

# The crossrec.common.v1.Action enum, read from the generated module (protos/ is its one
# source): ACTION_NAMES[number] is the enum name (numbers run 0..n-1: the user tower embeds
# them as rows), ACTIONS {number: short name} the actions an event may carry (0,
# ACTION_UNSPECIFIED, is rejected). tests/unit/test_proto_enums.py pins them.
ACTION_NAMES = tuple(common_pb2.Action.Name(n) for n in range(len(common_pb2.Action.keys())))
ACTIONS = {n: name.removeprefix("ACTION_").lower() for n, name in enumerate(ACTION_NAMES) if n}
ACTION_RATE, ACTION_INTERACT = common_pb2.ACTION_RATE, common_pb2.ACTION_INTERACT
# Weight of an event whose weight is unset, by action number: stronger intent counts more; an
# interaction of unknown kind (all of the Amazon training data) is the unit. For "rate" the
# weight is the 1..5 rating itself; 3 is a neutral rating.
DEFAULT_WEIGHT = {common_pb2.ACTION_VIEW: 0.5, common_pb2.ACTION_CLICK: 1.0,
                  common_pb2.ACTION_LIKE: 2.0, common_pb2.ACTION_ADD_TO_CART: 2.0,
                  common_pb2.ACTION_PURCHASE: 3.0, ACTION_RATE: 3.0, ACTION_INTERACT: 1.0}
MIN_RATING, MAX_RATING = 1.0, 5.0


@dataclass(frozen=True, slots=True)
class Event:
    """A validated, normalised event. `action` is the Action enum number. `digest` names its
    content as the caller sent it (content_digest; empty: not computed), so that a re-sent
    event id with other content is told apart from a plain re-send."""
    event_id: str
    user_id: str
    platform: str
    action: int
    item_id: str
    item_text: str
    event_time_ms: int
    weight: float
    digest: str = field(default="", compare=False)
