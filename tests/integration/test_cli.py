"""The `crossrec` command line end to end: `python -m tools.cli` against real servers on
loopback, loading real catalogue and event rows, resuming an interrupted load, and the exit
codes for bad input and unreachable services."""

import csv
import fcntl
import gzip
import json
import os
import pty
import select
import socket
import subprocess
import struct
import sys
import termios

import pytest

from tools.stack import REPO, python_env, start_stack
from dataio import AMAZON, iter_events, read_items, read_items_csv

STACK_FLAGS = {"ranking": ["--popularity-refresh-s", "1"]}
MAIN_USERS, RESUME_USERS, FAILING_USER = slice(0, 5), slice(5, 7), 7


def dead_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="module")
def stack(model_repo, tmp_path_factory):
    procs = start_stack(tmp_path_factory.mktemp("cli-stack"), str(model_repo),
                        extra=STACK_FLAGS)
    yield procs
    codes = {name: p.stop() for name, p in reversed(list(procs.items()))}
    assert set(codes.values()) == {0}, codes


@pytest.fixture(scope="module")
def rows_by_user() -> dict[str, list[dict]]:
    """Every events.csv row (history and held-out) of the first 8 real users, in file order."""
    out: dict[str, list[dict]] = {}
    for row in iter_events(AMAZON):
        if row["user_id"] not in out and len(out) == 8:
            break
        out.setdefault(row["user_id"], []).append(row)
    return out


def write_events(path, rows: list[dict]) -> None:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def data(tmp_path_factory, rows_by_user):
    """items.csv (the users' items plus every 300th item) and events.csv.gz beside it."""
    folder = tmp_path_factory.mktemp("cli-data")
    touched = {(r["platform"], r["item_id"]) for rows in rows_by_user.values() for r in rows}
    with open(folder / "items.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["item_id", "platform", "title", "category"])
        n_items = 0
        for n, item in enumerate(read_items(AMAZON)):
            if (item["platform"], item["item_id"]) in touched or n % 300 == 0:
                writer.writerow([item["item_id"], item["platform"], item["title"],
                                 item["attributes"].get("category", "")])
                n_items += 1
    main_rows = [r for rows in list(rows_by_user.values())[MAIN_USERS] for r in rows]
    write_events(folder / "events.csv.gz", main_rows)
    return {"dir": folder, "items": folder / "items.csv", "n_items": n_items,
            "events": folder / "events.csv.gz", "n_events": len(main_rows)}


@pytest.fixture(scope="module")
def env(stack):
    return python_env({f"CROSSREC_{name.upper()}_ADDRESS": proc.address
                       for name, proc in stack.items()})


def crossrec(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.cli", *map(str, args)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def loaded(env, data):
    """`items load` then `events load` of the main file: both runs, for the tests to read."""
    items = crossrec(env, "items", "load", data["items"], "--batch-size", 200)
    events = crossrec(env, "events", "load", data["events"], "--json", "--batch-size", 40,
                      "--checkpoint-batches", 2)
    return items, events


def test_items_load_upserts_every_row_quietly_off_a_terminal(loaded, data):
    items, _ = loaded
    assert items.returncode == 0, items.stderr
    assert f"upserted {data['n_items']:,} items from {data['items']}" in items.stdout
    assert "arts_crafts" in items.stdout and "office" in items.stdout
    assert "items upserted" not in items.stderr and "\r" not in items.stderr


def test_events_load_streams_every_row_of_a_gzipped_csv(loaded, data):
    _, events = loaded
    assert events.returncode == 0, events.stderr
    report = json.loads(events.stdout)
    assert report["rows_sent"] == report["accepted"] == data["n_events"]
    assert report["duplicates"] == 0 and report["last_row_acked"] == data["n_events"]
    assert "events acknowledged" not in events.stderr and "\r" not in events.stderr


def on_a_terminal(env, *args: str) -> tuple[int, str]:
    """Run the CLI with stderr on a pseudo-terminal: (exit code, what the terminal showed)."""
    controller, terminal = pty.openpty()
    # 40 rows of 200 columns: a new pty has 0 x 0, into which nothing fits.
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", *map(str, args)], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=terminal)
    os.close(terminal)
    shown = b""
    while select.select([controller], [], [], 600)[0]:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    return proc.wait(timeout=60), shown.decode(errors="replace")


def test_events_load_shows_a_progress_bar_on_a_terminal(loaded, env, data):
    code, shown = on_a_terminal(env, "events", "load", data["events"], "--batch-size", 10)
    assert code == 0, shown
    assert "events acknowledged" in shown and f"{data['n_events']}row" in shown
    assert "duplicates" in shown


def test_events_load_resumes_after_an_interrupted_run(env, loaded, data, rows_by_user,
                                                      tmp_path):
    rows = [r for user_rows in list(rows_by_user.values())[RESUME_USERS] for r in user_rows]
    events, resume = tmp_path / "events.csv", tmp_path / "progress.json"
    write_events(events, rows)
    load = ("events", "load", events, "--items", data["items"], "--resume-file", resume,
            "--batch-size", 8, "--checkpoint-batches", 1, "--json")

    first = crossrec(env, *load, "--limit", 20)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["accepted"] == 20
    assert json.loads(resume.read_text())["rows_acked"] == 20

    second = crossrec(env, *load)
    assert second.returncode == 0, second.stderr
    report = json.loads(second.stdout)
    assert report["rows_skipped"] == 20 and report["rows_sent"] == len(rows) - 20
    assert report["accepted"] == len(rows) - 20 and report["duplicates"] == 0
    assert report["total_accepted"] == len(rows) and report["last_row_acked"] == len(rows)

    again = json.loads(crossrec(env, *load).stdout)
    assert again["rows_sent"] == 0 and again["total_accepted"] == len(rows)

    without_resume = crossrec(env, "events", "load", events, "--items", data["items"])
    assert without_resume.returncode == 0, without_resume.stderr
    assert f"0 accepted, {len(rows)} duplicates" in without_resume.stdout


def test_a_failed_batch_leaves_only_acknowledged_rows_in_the_resume_file(
        env, loaded, data, rows_by_user, tmp_path):
    rows = list(rows_by_user.values())[FAILING_USER][:20]
    events, resume = tmp_path / "events.csv", tmp_path / "progress.json"
    write_events(events, rows[:12] + [dict(rows[12], platform="Not A Platform")] + rows[13:])
    load = ("events", "load", events, "--items", data["items"], "--resume-file", resume,
            "--batch-size", 4, "--checkpoint-batches", 1)

    failed = crossrec(env, *load)
    assert failed.returncode == 2
    assert failed.stderr.splitlines()[-1].startswith("error: INVALID_ARGUMENT: ")
    assert "platform must match" in failed.stderr
    assert json.loads(resume.read_text())["rows_acked"] == 12

    write_events(events, rows)
    fixed = crossrec(env, *load, "--json")
    assert fixed.returncode == 0, fixed.stderr
    report = json.loads(fixed.stdout)
    assert report["rows_skipped"] == 12 and report["accepted"] == 8
    assert report["total_accepted"] == 20 and report["duplicates"] == 0


def test_events_load_maps_the_columns_of_a_csv_of_another_layout(env, loaded, data, tmp_path):
    """Other column names, no platform column, action names and a rating, ISO 8601 times, an
    event id column: the flags map them; without them the header is refused."""
    office = [i["item_id"] for i in read_items_csv(data["items"]) if i["platform"] == "office"]
    path, user = tmp_path / "shop.csv", "cli-other-layout-user"
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([
            ["ref", "customer", "product", "event", "at"],
            ["shop-1", user, office[0], "purchase", "2024-05-01T10:00:00Z"],
            ["shop-2", user, office[1], "view", "2024-05-01T10:05:00Z"],
            ["shop-3", user, office[2], "4", "2024-05-01T12:10:00+02:00"]])
    flags = ("--items", data["items"], "--user-column", "customer", "--item-column", "product",
             "--platform", "office", "--action-column", "event", "--time-column", "at",
             "--event-id-column", "ref", "--json")

    refused = crossrec(env, "events", "load", path, "--items", data["items"])
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: INVALID_ARGUMENT: {path}: missing column(s) user_id, platform, item_id, "
        "rating_or_action in the header")

    first = crossrec(env, "events", "load", path, *flags)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["accepted"] == 3
    profile = json.loads(crossrec(env, "profile", "--user", user, "--recent", 3,
                                  "--json").stdout)
    assert profile["known"] and list(profile["platforms"]) == ["office"]
    recent = [e["event"] for e in profile["recent_events"]]
    assert [(e["event_id"], e["action"], e["weight"], e["event_time_ms"]) for e in recent] == [
        ("shop-3", "rate", 4.0, 1_714_558_200_000), ("shop-2", "view", 0.5, 1_714_557_900_000),
        ("shop-1", "purchase", 3.0, 1_714_557_600_000)]
    assert all(e["item_text"] for e in recent)
    again = json.loads(crossrec(env, "events", "load", path, *flags).stdout)
    assert (again["accepted"], again["duplicates"]) == (0, 3)


def test_recommend_prints_an_aligned_table_with_source_and_explanation(env, loaded,
                                                                       rows_by_user):
    user = next(iter(rows_by_user))
    run = crossrec(env, "recommend", "--user", user, "--platform", "office", "-k", 5)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith(f"user {user} on office: personalised (platform shares: ")
    header, rows = lines[1], lines[2:7]
    assert header.split() == ["#", "score", "source", "item", "title", "explanation"]
    for column in ("source", "item", "title", "explanation"):
        at = header.index(column)
        assert all(row[at - 1] == " " and row[at] != " " for row in rows), column
    assert all(row[header.index("source"):].startswith("personalised ") for row in rows)
    # Each line names its driver (recmodel/attribution.py).
    assert all(any(says in row[header.index("explanation"):] for says in (
        "similar to", "chosen by", "popular on", "in your")) for row in rows)
    assert lines[7].startswith("models: ") and "encoder v" in lines[7]


def test_recommend_json_carries_every_field(env, loaded, rows_by_user):
    user = next(iter(rows_by_user))
    run = crossrec(env, "recommend", "--user", user, "--platform", "arts_crafts", "-k", 4,
                   "--exclude-seen", "--json")
    assert run.returncode == 0, run.stderr
    recs = json.loads(run.stdout)
    assert recs["source"] == "personalised" and not recs["degraded"]
    assert set(recs["platform_weights"]) == {"arts_crafts", "office"}
    assert len(recs["items"]) == 4
    seen = {r["item_id"] for r in rows_by_user[user] if r["platform"] == "arts_crafts"}
    for item in recs["items"]:
        assert item["source"] == "personalised" and item["explanation"]
        assert item["item_id"] not in seen and item["contributions"]
        assert set(item["contributions"][0]) == {"platform", "item_id", "item_text",
                                                 "similarity", "co_users"}
        assert item["driver"] in {"text", "covisit", "popularity", "history"}
        assert set(item["attributions"]) == {"text", "covisit", "popularity", "history"}


def test_profile_shows_platforms_and_recent_events(env, loaded, rows_by_user):
    user, rows = next(iter(rows_by_user.items()))
    human = crossrec(env, "profile", "--user", user, "--for-platform", "office", "--recent", 3)
    assert human.returncode == 0, human.stderr
    assert f"user {user}: {len(rows)} events on 2 platform(s)" in human.stdout
    assert "as seen by office: a 384-d vector from all platforms" in human.stdout
    assert "recent events, newest first:" in human.stdout
    as_json = json.loads(crossrec(env, "profile", "--user", user, "--for-platform", "office",
                                  "--json").stdout)
    assert as_json["known"] and as_json["total_events"] == len(rows)
    assert set(as_json["platforms"]) == {"arts_crafts", "office"}
    assert "fused_vector" not in as_json and len(as_json["recent_events"]) == 5


def test_embed_prints_vectors(env):
    human = crossrec(env, "embed", "red stapler", "blue gel pens")
    assert human.returncode == 0, human.stderr
    assert len(human.stdout.splitlines()) == 2 and "384-d [" in human.stdout
    as_json = json.loads(crossrec(env, "embed", "red stapler", "--json").stdout)
    assert as_json["dim"] == 384 and len(as_json["vectors"][0]) == 384


def test_health_reports_each_service_and_flags_override_the_environment(env, stack):
    ok = crossrec(env, "health")
    assert ok.returncode == 0, ok.stderr
    assert [line.split()[::2] for line in ok.stdout.splitlines()[1:]] == [
        ["embedding", "SERVING"], ["fusion", "SERVING"], ["ranking", "SERVING"]]
    broken_env = dict(env, CROSSREC_RANKING_ADDRESS=dead_address())
    assert crossrec(broken_env, "health", "--ranking", stack["ranking"].address).returncode == 0
    down = crossrec(broken_env, "health", "--json")
    assert down.returncode == 1
    report = json.loads(down.stdout)
    assert report["fusion"]["status"] == "SERVING"
    assert report["ranking"]["status"].startswith("DOWN (UNAVAILABLE: ")


@pytest.mark.parametrize("args, code, message", [
    (["recommend", "--user", "u", "--platform", "office", "-k", 0], 2,
     "error: INVALID_ARGUMENT: k must be in 1..1000, got 0"),
    (["recommend", "--user", "u", "--platform", "video"], 2,
     "error: INVALID_ARGUMENT: platform 'video' has no catalogue"),
    (["recommend", "--platform", "office"], 2, "the following arguments are required: --user"),
    (["events", "load", "no-such-file.csv"], 2, "error: INVALID_ARGUMENT: no such file: "),
    (["health", "search"], 2, "error: INVALID_ARGUMENT: unknown service(s) search"),
])
def test_bad_input_exits_2_with_one_error_line(env, loaded, args, code, message):
    run = crossrec(env, *args)
    assert run.returncode == code
    assert message in run.stderr.strip().splitlines()[-1]


def test_an_unreachable_service_exits_3(env):
    run = crossrec(env, "--ranking", dead_address(), "recommend", "--user", "u",
                   "--platform", "office")
    assert run.returncode == 3
    assert run.stderr.startswith("error: UNAVAILABLE: ") and run.stderr.count("\n") == 1


def test_delete_user_removes_the_user(env, loaded, rows_by_user):
    user, rows = list(rows_by_user.items())[MAIN_USERS.stop - 1]
    run = crossrec(env, "delete-user", user)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"deleted {len(rows)} events of user {user}"
    assert not json.loads(crossrec(env, "profile", "--user", user, "--json").stdout)["known"]
    again = json.loads(crossrec(env, "delete-user", user, "--json").stdout)
    assert again == {"user_id": user, "deleted_events": 0}


def test_items_load_in_flight_batches_keep_the_files_last_row_of_an_item(env, stack, loaded,
                                                                        tmp_path):
    """Batches go concurrently; one sharing an item with a batch in flight waits for it."""
    import sqlite3
    items = tmp_path / "items.csv"
    with open(items, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["item_id", "platform", "title"])
        for n in range(12):
            writer.writerow([f"cli-dup-{n % 3}", "office", f"stapler model {n}"])
    load = crossrec(env, "items", "load", items, "--batch-size", 2, "--concurrency", 4)
    assert load.returncode == 0, load.stderr
    assert "upserted 12 items" in load.stdout
    args = stack["ranking"].args
    path = args[args.index("--catalog-path") + 1]
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        titles = dict(db.execute("SELECT item_id, title FROM items WHERE item_id LIKE "
                                 "'cli-dup-%'"))
    assert titles == {f"cli-dup-{k}": f"stapler model {9 + k}" for k in range(3)}
