"""`crossrec`: command line for the crossrec services (health, catalogue and event loads,
recommendations, profiles, user deletion, embeddings), built on clients.crossrec_client.

Exit codes: 0 ok; 1 failed (a service not SERVING, any other error); 2 bad input or usage
(INVALID_ARGUMENT); 3 a service unreachable (UNAVAILABLE). Errors are one line on stderr:
`error: <CODE>: <details>`.

Tracing: a caller's trace context in the environment (TRACEPARENT, TRACESTATE: W3C trace
context, as otel-cli and CI systems set it) is carried by every call, so the services' spans
join the caller's trace.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields, is_dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path

import numpy as np
from opentelemetry import context as otel_context
from opentelemetry import propagate
from tqdm import tqdm

from clients.crossrec_client import (CrossrecClient, CrossrecError, Event, IngestResult,
                                     InvalidArgument, Item, Unavailable)

SERVICES = ("embedding", "fusion", "ranking")
DEFAULT_ADDRESSES = {"embedding": "127.0.0.1:50051", "fusion": "127.0.0.1:50052",
                     "ranking": "127.0.0.1:50053"}
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3
QUERY_TIMEOUT_S = 10.0
# Per UpsertItems batch (every item is embedded first) and per IngestStream checkpoint.
LOAD_TIMEOUT_S = 300.0
ITEM_BASE_COLUMNS = ("item_id", "platform", "title")
EVENT_COLUMNS = ("user_id", "platform", "item_id", "rating_or_action")


# --- input files ----------------------------------------------------------------------------

def _open_csv(path: Path):
    if not path.is_file():
        raise InvalidArgument("INVALID_ARGUMENT", f"no such file: {path}")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _reader(f, path: Path, required: tuple[str, ...]) -> csv.DictReader:
    reader = csv.DictReader(f)
    missing = [c for c in required if c not in (reader.fieldnames or ())]
    if missing:
        raise InvalidArgument("INVALID_ARGUMENT",
                              f"{path}: missing column(s) {', '.join(missing)} in the header")
    return reader


def read_items_csv(path: Path) -> Iterator[Item]:
    """Items from a catalogue CSV (item_id, platform, title, then attribute columns)."""
    with _open_csv(path) as f:
        for row in _reader(f, path, ITEM_BASE_COLUMNS):
            yield Item(row["item_id"], row["platform"], row["title"],
                       {k: v for k, v in row.items()
                        if k not in ITEM_BASE_COLUMNS and k is not None and v})


def read_item_texts(path: Path) -> dict[tuple[str, str], str]:
    """{(platform, item_id): embedded item text}, composed as the ranking service does."""
    from services.common.text import compose_item_text
    return {(i.platform, i.item_id): compose_item_text(i.title, dict(i.attributes))
            for i in read_items_csv(path)}


def catalogue_beside(events_path: Path) -> Path | None:
    for name in ("items.csv", "items.csv.gz"):
        if (events_path.parent / name).is_file():
            return events_path.parent / name
    return None


# --- output ---------------------------------------------------------------------------------

def plain(value):
    """JSON-ready form of client values: dataclasses, enums, numpy arrays."""
    if is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def print_json(value) -> None:
    print(json.dumps(plain(value), indent=2, ensure_ascii=False))


def table(rows: list[list[str]], header: list[str], right: set[int] = frozenset()) -> str:
    """Columns padded to their widest cell; the last column is never padded."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        out = [c.rjust(w) if i in right else c.ljust(w)
               for i, (c, w) in enumerate(zip(cells, widths))]
        out[-1] = cells[-1]
        return "  ".join(out).rstrip()
    return "\n".join(line(r) for r in [header, *rows])


def cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def utc(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def progress_bar(label: str, unit: str) -> tqdm:
    """A progress bar on stderr for a load of unknown length: on a terminal only (the summary
    on stdout says what was done)."""
    return tqdm(desc=label, unit=unit, unit_scale=True, disable=None)


# --- commands -------------------------------------------------------------------------------

def cmd_health(client: CrossrecClient, args) -> int:
    unknown = sorted(set(args.services) - set(SERVICES))
    if unknown:
        raise InvalidArgument("INVALID_ARGUMENT", f"unknown service(s) {', '.join(unknown)}; "
                                                  f"choose from {', '.join(SERVICES)}")
    report = {}
    for name in args.services or SERVICES:
        service = getattr(client, name)
        try:
            status = service.health()
        except CrossrecError as err:
            status = f"DOWN ({err})"
        report[name] = {"address": service.address, "status": status}
    if args.json:
        print_json(report)
    else:
        print(table([[n, r["address"], r["status"]] for n, r in report.items()],
                    ["service", "address", "status"]))
    return EXIT_OK if all(r["status"] == "SERVING" for r in report.values()) else EXIT_FAILED


def cmd_items_load(client: CrossrecClient, args) -> int:
    """Upserts batches with `--concurrency` calls in flight, so the embedding model works on
    one batch while ranking stores the previous one. A batch sharing an item with one still
    in flight waits for it first: the file's last row of an item is the one kept."""
    path, timeout = Path(args.path), args.timeout or LOAD_TIMEOUT_S
    if not 1 <= args.concurrency <= 8:
        raise InvalidArgument("INVALID_ARGUMENT", "--concurrency must be in 1..8, "
                              f"got {args.concurrency}")
    upserted, platforms = 0, {}
    batch: list[Item] = []
    in_flight: deque = deque()  # (future, {(platform, item_id)}), oldest first

    def settle(future, progress) -> None:
        nonlocal upserted
        done = future.result()
        upserted += done
        progress.update(done)

    def send(pool, progress) -> None:
        keys = {(item.platform, item.item_id) for item in batch}
        while in_flight and (len(in_flight) >= args.concurrency
                             or any(keys & ids for _, ids in in_flight)):
            settle(in_flight.popleft()[0], progress)
        for item in batch:
            platforms[item.platform] = platforms.get(item.platform, 0) + 1
        in_flight.append((pool.submit(client.ranking.upsert_items, list(batch),
                                      timeout=timeout), keys))
        batch.clear()

    with progress_bar("items upserted", "item") as progress, \
            ThreadPoolExecutor(args.concurrency, thread_name_prefix="upsert") as pool:
        try:
            for item in read_items_csv(path):
                batch.append(item)
                if len(batch) >= args.batch_size:
                    send(pool, progress)
            if batch:
                send(pool, progress)
            while in_flight:
                settle(in_flight.popleft()[0], progress)
        finally:
            for future, _ in in_flight:
                future.cancel()
    if args.json:
        print_json({"file": str(path), "upserted": upserted, "platforms": platforms})
    else:
        shares = ", ".join(f"{p} {n:,}" for p, n in sorted(platforms.items()))
        print(f"upserted {upserted:,} items from {path} ({shares or 'none'})")
    return EXIT_OK


class ResumeFile:
    """The last acknowledged row of an events file, rewritten atomically after each ack."""

    def __init__(self, path: Path | None, events_path: Path):
        self.path, self.events_file = path, str(events_path.resolve())
        self.rows_acked = self.accepted = self.duplicates = 0
        if path is not None and path.exists():
            state = json.loads(path.read_text())
            if state.get("events_file") != self.events_file:
                raise InvalidArgument("INVALID_ARGUMENT",
                                      f"resume file {path} records {state.get('events_file')}, "
                                      f"not {self.events_file}; pass another --resume-file")
            self.rows_acked = int(state["rows_acked"])
            self.accepted, self.duplicates = int(state["accepted"]), int(state["duplicates"])

    def save(self, rows_acked: int, accepted: int, duplicates: int) -> None:
        self.rows_acked, self.accepted, self.duplicates = rows_acked, accepted, duplicates
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump({"events_file": self.events_file, "rows_acked": rows_acked,
                       "accepted": accepted, "duplicates": duplicates}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def cmd_events_load(client: CrossrecClient, args) -> int:
    from dataio import to_event

    path = Path(args.path)
    items_path = Path(args.items) if args.items else catalogue_beside(path)
    texts = read_item_texts(items_path) if items_path else {}
    if not texts:
        print(f"warning: no catalogue beside {path} (--items): events go without item text "
              "and are accepted only for items the fusion service has seen", file=sys.stderr)
    resume = ResumeFile(Path(args.resume_file) if args.resume_file else None, path)
    skipped, before = resume.rows_acked, (resume.accepted, resume.duplicates)
    sent_rows: deque[int] = deque()  # row numbers of events sent and not yet acknowledged
    acked_events = 0
    progress = progress_bar("events acknowledged", "row")

    def events() -> Iterator[Event]:
        with _open_csv(path) as f:
            read = 0
            for number, row in enumerate(_reader(f, path, EVENT_COLUMNS),
                                         start=1):
                if number <= skipped:
                    continue
                if args.limit is not None and read >= args.limit:
                    return
                read += 1
                try:
                    event = Event.of(to_event(row, texts))
                except (KeyError, ValueError) as err:
                    raise InvalidArgument("INVALID_ARGUMENT", f"{path} row {number}: "
                                                              f"cannot read it ({err!r})") from None
                sent_rows.append(number)
                yield event

    def acknowledged(total: IngestResult) -> None:
        nonlocal acked_events
        last_row = resume.rows_acked
        while acked_events < total.events:
            last_row = sent_rows.popleft()
            acked_events += 1
        resume.save(last_row, before[0] + total.accepted, before[1] + total.duplicates)
        progress.set_postfix_str(f"rows up to {last_row:,}, {total.accepted:,} accepted, "
                                 f"{total.duplicates:,} duplicates", refresh=False)
        progress.update(total.events - progress.n)

    try:
        result = client.fusion.ingest_stream(
            events(), batch_size=args.batch_size, checkpoint_batches=args.checkpoint_batches,
            progress=acknowledged, timeout=args.timeout or LOAD_TIMEOUT_S)
    finally:
        progress.close()
    report = {"file": str(path), "rows_skipped": skipped, "rows_sent": result.events,
              "accepted": result.accepted, "duplicates": result.duplicates,
              "batches": result.batches, "last_row_acked": resume.rows_acked}
    if args.resume_file:
        report.update(resume_file=args.resume_file, total_accepted=resume.accepted,
                      total_duplicates=resume.duplicates)
    if args.json:
        print_json(report)
        return EXIT_OK
    print(f"events from {path}: {result.events:,} rows sent "
          f"({skipped:,} skipped as already acknowledged): {result.accepted:,} accepted, "
          f"{result.duplicates:,} duplicates")
    if args.resume_file:
        print(f"resume file {args.resume_file}: rows 1..{resume.rows_acked:,} acknowledged; "
              f"{resume.accepted:,} accepted and {resume.duplicates:,} duplicates over all runs")
    return EXIT_OK


def cmd_recommend(client: CrossrecClient, args) -> int:
    recs = client.ranking.recommend(args.user, args.platform, k=args.k,
                                    exclude_seen=args.exclude_seen, diversify=args.diversify)
    if args.json:
        print_json(recs)
        return EXIT_OK
    shares = ", ".join(f"{p} {w:.0%}" for p, w in sorted(recs.platform_weights.items()))
    print(f"user {args.user} on {args.platform}: {recs.source}"
          + (f" (platform shares: {shares})" if shares else ""))
    if recs.degraded:
        print(f"warning: degraded: {recs.degraded_reason}")
    rows = [[str(n), f"{r.score:.4f}", r.source, r.item_id, cut(r.title, 48), r.explanation]
            for n, r in enumerate(recs, 1)]
    print(table(rows, ["#", "score", "source", "item", "title", "explanation"], right={0, 1}))
    print("models: " + ", ".join(f"{m.name} v{m.version}" for m in recs.models))
    return EXIT_OK


def cmd_profile(client: CrossrecClient, args) -> int:
    profile = client.fusion.profile(args.user, args.for_platform, args.recent)
    if args.json:
        out = plain(profile)
        if not args.vectors:
            out.pop("fused_vector"), out.pop("for_platform_vector")
            for p in out["platforms"].values():
                p.pop("vector")
            for e in out["recent_events"]:
                e.pop("item_vector")
        print_json(out)
        return EXIT_OK
    if not profile.known:
        print(f"user {args.user} is unknown: no events on any platform")
        return EXIT_OK
    model = f"{profile.model.name} v{profile.model.version}"
    print(f"user {args.user}: {profile.total_events:,} events on {len(profile.platforms)} "
          f"platform(s); {profile.dim}-d vectors from {model}"
          + (" (untrained baseline)" if profile.baseline else ""))
    print(table([[p.platform, f"{p.event_count:,}", f"{p.fusion_weight:.1%}", utc(p.last_seen_ms)]
                 for p in profile.platforms.values()],
                ["platform", "events", "share", "last seen (UTC)"], right={1, 2}))
    if profile.for_platform:
        print(f"as seen by {profile.for_platform}: a {profile.dim}-d vector from all platforms")
    if profile.recent_events:
        print("recent events, newest first:")
        print(table([[utc(e.event.event_time_ms), e.event.platform, e.event.item_id,
                      e.event.action, cut(e.event.item_text, 70)]
                     for e in profile.recent_events],
                    ["time (UTC)", "platform", "item", "action", "item text"]))
    return EXIT_OK


def cmd_delete_user(client: CrossrecClient, args) -> int:
    deleted = client.fusion.delete_user(args.user)
    if args.json:
        print_json({"user_id": args.user, "deleted_events": deleted})
    else:
        print(f"deleted {deleted:,} events of user {args.user}")
    return EXIT_OK


def cmd_embed(client: CrossrecClient, args) -> int:
    vectors = client.embedding.embed(args.texts)
    if args.json:
        print_json({"dim": vectors.shape[1], "vectors": vectors})
        return EXIT_OK
    for text, v in zip(args.texts, vectors):
        head = " ".join(f"{x:+.4f}" for x in v[:6])
        print(f"{cut(text, 60)!r}: {v.shape[0]}-d [{head} ...] norm {np.linalg.norm(v):.4f}")
    return EXIT_OK


# --- arguments ------------------------------------------------------------------------------

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
        env = "CROSSREC_" + flag.lstrip("-").upper().replace("-", "_")
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

    def command(name, func, help, parent=None):
        sub = (parent or commands).add_parser(name, parents=[common], help=help,
                                              description=help)
        sub.set_defaults(func=func)
        return sub

    health = command("health", cmd_health,
                     "grpc.health.v1 status of each service; exit 1 unless all are SERVING")
    health.add_argument("services", nargs="*", metavar="SERVICE",
                        help=f"services to check, of {', '.join(SERVICES)} [default: all]")

    items = commands.add_parser("items", help="catalogue: items load")
    items_sub = items.add_subparsers(dest="items_command", required=True, metavar="COMMAND")
    load = command("load", cmd_items_load, "upsert every item of a catalogue CSV "
                   "(item_id, platform, title, then attribute columns; .gz read too)", items_sub)
    load.add_argument("path", help="items.csv or items.csv.gz")
    load.add_argument("--batch-size", type=int, default=500, help="items per UpsertItems call "
                      "(1..1000) [default: %(default)s]")
    load.add_argument("--concurrency", type=int, default=2, help="UpsertItems calls in flight "
                      "(1..8) [default: %(default)s]")

    events = commands.add_parser("events", help="behaviour events: events load")
    events_sub = events.add_subparsers(dest="events_command", required=True, metavar="COMMAND")
    load = command("load", cmd_events_load,
                   "stream an events CSV (user_id, platform, item_id, rating_or_action, "
                   "timestamp or seq_index; .gz read too) into fusion, resumably", events_sub)
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

    rec = command("recommend", cmd_recommend, "top-k items of a platform for a user")
    rec.add_argument("--user", required=True)
    rec.add_argument("--platform", required=True)
    rec.add_argument("-k", type=int, default=10, help="items wanted [default: %(default)s]")
    rec.add_argument("--exclude-seen", action="store_true",
                     help="leave out items the user interacted with on the platform")
    rec.add_argument("--diversify", action="store_true", help="re-order for diversity (MMR)")

    prof = command("profile", cmd_profile, "a user's fused profile")
    prof.add_argument("--user", required=True)
    prof.add_argument("--for-platform", help="also compute the user as seen by this platform")
    prof.add_argument("--recent", type=int, default=5,
                      help="newest events to show (0..200) [default: %(default)s]")
    prof.add_argument("--vectors", action="store_true", help="include vectors in --json output")

    delete = command("delete-user", cmd_delete_user, "remove every trace of a user")
    delete.add_argument("user")

    embed = command("embed", cmd_embed, "embed texts with the embedding service")
    embed.add_argument("texts", nargs="+", metavar="TEXT")
    return parser


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
