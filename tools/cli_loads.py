"""The `crossrec` CLI's file loads: `items load` (a catalogue CSV into ranking) and `events
load` (any events CSV, its columns mapped by EventColumns, streamed into fusion, resumably)."""

from __future__ import annotations

import json
import os
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from clients.crossrec_client import CrossrecClient, Event, IngestResult, InvalidArgument, Item
from dataio import EventColumns, csv_rows, item_texts_csv, open_csv, read_items_csv, to_event
from tools.cli_output import EXIT_OK, print_json, progress_bar

# Per UpsertItems batch (every item is embedded first) and per IngestStream checkpoint.
LOAD_TIMEOUT_S = 300.0


def catalogue_beside(events_path: Path) -> Path | None:
    for name in ("items.csv", "items.csv.gz"):
        if (events_path.parent / name).is_file():
            return events_path.parent / name
    return None


def event_columns(args) -> EventColumns:
    """The events file's columns from `events load`'s flags."""
    return EventColumns(
        user=args.user_column, item=args.item_column, platform=args.platform_column,
        action=args.action_column, time=args.time_column, order=args.order_column,
        weight=args.weight_column, text=args.text_column, event_id=args.event_id_column,
        time_unit=args.time_unit, fixed_platform=args.platform, fixed_action=args.action)


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
            for item in map(Item.of, read_items_csv(path)):
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


def read_events(path: Path, columns: EventColumns, texts: dict[tuple[str, str], str],
                skip: int, limit: int | None, sent_rows: deque[int]) -> Iterator[Event]:
    """The file's events after its first `skip` rows, at most `limit`, each row's number
    appended to `sent_rows` as it is read; InvalidArgument naming a row that cannot be read."""
    with open_csv(path) as f:
        read = 0
        for number, row in enumerate(csv_rows(f, path, columns.required()), start=1):
            if number <= skip:
                continue
            if limit is not None and read >= limit:
                return
            read += 1
            try:
                event = Event.of(to_event(row, texts, columns))
            except (KeyError, ValueError) as err:
                raise InvalidArgument("INVALID_ARGUMENT", f"{path} row {number}: "
                                                          f"cannot read it ({err!r})") from None
            sent_rows.append(number)
            yield event


def cmd_events_load(client: CrossrecClient, args) -> int:
    path = Path(args.path)
    items_path = Path(args.items) if args.items else catalogue_beside(path)
    texts = item_texts_csv(items_path) if items_path else {}
    if not texts and not args.text_column:
        print(f"warning: no catalogue beside {path} (--items): events go without item text "
              "and are accepted only for items the fusion service has seen", file=sys.stderr)
    resume = ResumeFile(Path(args.resume_file) if args.resume_file else None, path)
    skipped, before = resume.rows_acked, (resume.accepted, resume.duplicates)
    sent_rows: deque[int] = deque()  # row numbers of events sent and not yet acknowledged
    acked_events = 0
    progress = progress_bar("events acknowledged", "row")

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
            read_events(path, event_columns(args), texts, skipped, args.limit, sent_rows),
            batch_size=args.batch_size, checkpoint_batches=args.checkpoint_batches,
            progress=acknowledged, timeout=args.timeout or LOAD_TIMEOUT_S)
    finally:
        progress.close()
    report_events_load(args, path, skipped, result, resume)
    return EXIT_OK


def report_events_load(args, path: Path, skipped: int, result: IngestResult,
                       resume: ResumeFile) -> None:
    report = {"file": str(path), "rows_skipped": skipped, "rows_sent": result.events,
              "accepted": result.accepted, "duplicates": result.duplicates,
              "batches": result.batches, "last_row_acked": resume.rows_acked}
    if args.resume_file:
        report.update(resume_file=args.resume_file, total_accepted=resume.accepted,
                      total_duplicates=resume.duplicates)
    if args.json:
        print_json(report)
        return
    print(f"events from {path}: {result.events:,} rows sent "
          f"({skipped:,} skipped as already acknowledged): {result.accepted:,} accepted, "
          f"{result.duplicates:,} duplicates")
    if args.resume_file:
        print(f"resume file {args.resume_file}: rows 1..{resume.rows_acked:,} acknowledged; "
              f"{resume.accepted:,} accepted and {resume.duplicates:,} duplicates over all runs")
