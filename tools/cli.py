"""`crossrec`: command line for the crossrec services (health, catalogue and event loads,
recommendations, profiles, user deletion, embeddings), built on clients.crossrec_client.

Exit codes: 0 ok; 1 failed (a service not SERVING, any other error); 2 bad input or usage
(INVALID_ARGUMENT); 3 a service unreachable (UNAVAILABLE). Errors are one line on stderr:
`error: <CODE>: <details>`.

Tracing: a caller's trace context in the environment (TRACEPARENT, TRACESTATE: W3C trace
context, as otel-cli and CI systems set it) is carried by every call, so the services' spans
join the caller's trace.

Modules: this one (flags, main), cli_loads (items load, events load), cli_queries (health,
recommend, profile, delete-user, embed), cli_output (exit codes, JSON, tables, progress).
"""

from __future__ import annotations

import argparse
import os
import sys

from opentelemetry import context as otel_context
from opentelemetry import propagate

from clients.crossrec_client import CrossrecClient, CrossrecError, InvalidArgument, Unavailable
from dataio import SHARED_COLUMNS, TIME_UNITS_MS
from recmodel.events import ACTIONS
from services.common.flags import env_name
from tools.cli_loads import LOAD_TIMEOUT_S, cmd_events_load, cmd_items_load
from tools.cli_output import EXIT_FAILED, EXIT_UNAVAILABLE, EXIT_USAGE
from tools.cli_queries import (SERVICES, cmd_delete_user, cmd_embed, cmd_health,
                               cmd_profile, cmd_recommend)

DEFAULT_ADDRESSES = {"embedding": "127.0.0.1:50051", "fusion": "127.0.0.1:50052",
                     "ranking": "127.0.0.1:50053"}
QUERY_TIMEOUT_S = 10.0


def _connection_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Connection flags, on the main parser (with defaults) and again on every subcommand
    (without, so a flag given after the subcommand wins and an absent one changes nothing)."""

    def default(value):
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("connection")
    for name in SERVICES:
        env = f"CROSSREC_{name.upper()}_ADDRESS"
        group.add_argument(f"--{name}", metavar="HOST:PORT",
                           default=default(os.environ.get(env, DEFAULT_ADDRESSES[name])),
                           help=f"{name} service address (env {env}) "
                                f"[default: {DEFAULT_ADDRESSES[name]}]")
    timeout = os.environ.get("CROSSREC_TIMEOUT")
    group.add_argument("--timeout", type=float, metavar="S",
                       default=default(float(timeout) if timeout else None),
                       help=f"deadline per call in seconds (env CROSSREC_TIMEOUT) [default: "
                            f"{QUERY_TIMEOUT_S:g}; loads: {LOAD_TIMEOUT_S:g} per batch]")
    group.add_argument("--token", default=default(os.environ.get("CROSSREC_TOKEN")),
                       help="bearer token sent with every call (env CROSSREC_TOKEN; "
                            "prefer the env twin: argv is visible to other users)")
    for flag, what in (("--tls-ca", "CA certificate (PEM) that verifies the servers; "
                                    "turns TLS on"),
                       ("--tls-cert", "client certificate (PEM) for mutual TLS"),
                       ("--tls-key", "client private key (PEM) for mutual TLS")):
        env = env_name(flag)
        group.add_argument(flag, metavar="FILE", default=default(os.environ.get(env)),
                           help=f"{what} (env {env})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crossrec", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _connection_options(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _connection_options(common, suppress=True)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    health = _command(commands, common, "health", cmd_health,
                      "grpc.health.v1 status of each service; exit 1 unless all are SERVING")
    health.add_argument("services", nargs="*", metavar="SERVICE",
                        help=f"services to check, of {', '.join(SERVICES)} [default: all]")
    _load_commands(commands, common)
    _query_commands(commands, common)
    return parser


def _command(subparsers, common: argparse.ArgumentParser, name: str, func,
             help: str) -> argparse.ArgumentParser:
    sub = subparsers.add_parser(name, parents=[common], help=help, description=help)
    sub.set_defaults(func=func)
    return sub


def _load_commands(commands, common: argparse.ArgumentParser) -> None:
    items = commands.add_parser("items", help="catalogue: items load")
    items_sub = items.add_subparsers(dest="items_command", required=True, metavar="COMMAND")
    load = _command(items_sub, common, "load", cmd_items_load, "upsert every item of a "
                    "catalogue CSV (item_id, platform, title, then attribute columns; .gz read "
                    "too)")
    load.add_argument("path", help="items.csv or items.csv.gz")
    load.add_argument("--batch-size", type=int, default=500, help="items per UpsertItems call "
                      "(1..1000) [default: %(default)s]")
    load.add_argument("--concurrency", type=int, default=2, help="UpsertItems calls in flight "
                      "(1..8) [default: %(default)s]")

    events = commands.add_parser("events", help="behaviour events: events load")
    events_sub = events.add_subparsers(dest="events_command", required=True, metavar="COMMAND")
    load = _command(events_sub, common, "load", cmd_events_load,
                    "stream an events CSV (user_id, platform, item_id, rating_or_action, "
                    "timestamp or seq_index; .gz read too; other columns: the column flags) "
                    "into fusion, resumably")
    load.add_argument("path", help="events.csv or events.csv.gz")
    load.add_argument("--items", help="catalogue CSV the item texts come from "
                      "[default: items.csv(.gz) beside the events file]")
    load.add_argument("--batch-size", type=int, default=1000,
                      help="events per stream message (1..1000) [default: %(default)s]")
    load.add_argument("--checkpoint-batches", type=int, default=10,
                      help="messages per IngestStream call; each call's answer acknowledges "
                           "them, and the resume file advances [default: %(default)s]")
    load.add_argument("--resume-file", help="records the last acknowledged row after each "
                      "acknowledgement; a rerun with it skips those rows (re-sent rows are "
                      "harmless anyway: event ids dedupe)")
    load.add_argument("--limit", type=int, help="send at most this many rows in this run")
    _event_columns(load)


def _event_columns(load: argparse.ArgumentParser) -> None:
    """`events load`'s column flags (dataio.EventColumns); the defaults read the layout of
    ../shared/data, so its files need none."""
    c = SHARED_COLUMNS
    group = load.add_argument_group("columns", "which CSV column holds each event field; the "
                                    "defaults read ../shared/data's events.csv")
    for field, what in (("user", "user id"), ("item", "item id"),
                        ("platform", "platform (unless --platform)")):
        group.add_argument(f"--{field}-column", default=getattr(c, field), metavar="NAME",
                           help=f"{what} [default: %(default)s]")
    group.add_argument("--platform", metavar="NAME",
                       help="every row's platform, for a file without a platform column")
    group.add_argument("--action-column", default=c.action, metavar="NAME",
                       help="a number is a 1..5 rating (ACTION_RATE), an action name that "
                            "action, other text an interaction of unknown kind "
                            "[default: %(default)s]")
    group.add_argument("--action", choices=list(ACTIONS.values()),
                       help="every row's action, for a file without an action column")
    group.add_argument("--time-column", default=c.time, metavar="NAME",
                       help="event time: a number in --time-unit, or ISO 8601 (UTC unless it "
                            "names an offset) [default: %(default)s]")
    group.add_argument("--time-unit", choices=list(TIME_UNITS_MS), default=c.time_unit,
                       help="unit of a numeric time [default: %(default)s]")
    group.add_argument("--order-column", default=c.order, metavar="NAME",
                       help="integer order of a row without a time: events a minute apart "
                            "from 2018-01-01 UTC [default: %(default)s]")
    group.add_argument("--weight-column", metavar="NAME",
                       help="weight in (0, 100] (a rating for rate events) [default: the "
                            "rating, else the action's default weight]")
    group.add_argument("--text-column", metavar="NAME",
                       help="item text [default: the catalogue's (--items)]")
    group.add_argument("--event-id-column", metavar="NAME",
                       help="event id [default: derived from user, time and item, or user and "
                            "order, so a reload dedupes]")


def _query_commands(commands, common: argparse.ArgumentParser) -> None:
    rec = _command(commands, common, "recommend", cmd_recommend,
                   "top-k items of a platform for a user")
    rec.add_argument("--user", required=True)
    rec.add_argument("--platform", required=True)
    rec.add_argument("-k", type=int, default=10, help="items wanted [default: %(default)s]")
    rec.add_argument("--exclude-seen", action="store_true",
                     help="leave out items the user interacted with on the platform")
    rec.add_argument("--diversify", action="store_true", help="re-order for diversity (MMR)")

    prof = _command(commands, common, "profile", cmd_profile, "a user's fused profile")
    prof.add_argument("--user", required=True)
    prof.add_argument("--for-platform", help="also compute the user as seen by this platform")
    prof.add_argument("--recent", type=int, default=5,
                      help="newest events to show (0..200) [default: %(default)s]")
    prof.add_argument("--vectors", action="store_true", help="include vectors in --json output")

    delete = _command(commands, common, "delete-user", cmd_delete_user,
                      "remove every trace of a user")
    delete.add_argument("user")

    embed = _command(commands, common, "embed", cmd_embed,
                     "embed texts with the embedding service")
    embed.add_argument("texts", nargs="+", metavar="TEXT")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    otel_context.attach(propagate.extract(
        {key.lower(): os.environ[key] for key in ("TRACEPARENT", "TRACESTATE")
         if key in os.environ}))
    try:
        with CrossrecClient(embedding=args.embedding, fusion=args.fusion, ranking=args.ranking,
                            timeout_s=args.timeout or QUERY_TIMEOUT_S, token=args.token,
                            tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                            # a probe reports the present state; it does not retry
                            **({"retry": None} if args.command == "health" else {})) as client:
            return args.func(client, args)
    except CrossrecError as err:
        print(f"error: {err}", file=sys.stderr)
        if isinstance(err, InvalidArgument):
            return EXIT_USAGE
        return EXIT_UNAVAILABLE if isinstance(err, Unavailable) else EXIT_FAILED
    except (ValueError, OSError) as err:  # TLS options, unreadable files
        print(f"error: INVALID_ARGUMENT: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: CANCELLED: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
