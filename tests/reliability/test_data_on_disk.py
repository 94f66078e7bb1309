"""What fusion leaves on disk, read as raw bytes: after DeleteUser returns, the user's id is in
no SQLite file (database, -wal, -shm) within the documented bound, and in no Redis AOF file
once the AOF is rewritten; with --user-id-key-file the raw id never reaches a file at all,
while the API still takes and returns it and DeleteUser still works.

Before: the deleted rows stayed in fusion.sqlite3-wal until some later checkpoint, and
whether freed pages were zeroed depended on how SQLite was built."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
import redis

from tools.stack import ServiceProcess
from crossrec.fusion.v1 import fusion_pb2, fusion_pb2_grpc
from tests.reliability.support import pb_event

# services/fusion/README.md, "Deleting a user": gone from the SQLite files when DeleteUser
# returns, unless a long read holds off the checkpoint; then within a few retries.
DELETE_BOUND_S = 5.0
REWRITE_LIMIT_S = 30.0
NOW_MS = int(time.time() * 1000)
KEY = "k" * 8 + "a-test-key-of-32-characters"


def holding(files: list[Path], needle: bytes) -> list[str]:
    return [f.name for f in files if f.is_file() and needle in f.read_bytes()]


def sqlite_files(path: Path) -> list[Path]:
    return [p for p in path.parent.iterdir() if p.name.startswith(path.name)]


def events_of(user: str, n: int = 60, ids: str | None = None) -> fusion_pb2.IngestRequest:
    """`n` events of `user`; event ids `<ids>-e<i>` (default: the user id itself, as clients
    often do), or derived by the server when `ids` is ""."""
    prefix = user if ids is None else ids
    return fusion_pb2.IngestRequest(events=[pb_event(dict(
        event_id=f"{prefix}-e{i}" if prefix else "", user_id=user,
        platform=("office", "arts_crafts")[i % 2],
        action=2, item_id=f"disk-item-{i % 7}", item_text=f"disk test item {i % 7} stapler",
        event_time_ms=NOW_MS - 1000 + i)) for i in range(n)])


@pytest.fixture
def fusion_on(stack, model_repo, tmp_path):
    """Starts a fusion of its own (SQLite unless told) on the stack's embedding service."""
    started = []

    def start(*args: str) -> tuple[ServiceProcess, fusion_pb2_grpc.FusionServiceStub]:
        proc = ServiceProcess("fusion", [
            "--model-repo", str(model_repo), "--embedding-address", stack["embedding"].address,
            "--sqlite-path", str(tmp_path / "fusion.sqlite3"), *args],
            tmp_path / f"run-{len(started)}").start().wait_ready()
        channel = grpc.insecure_channel(proc.address)
        started.append((proc, channel))
        return proc, fusion_pb2_grpc.FusionServiceStub(channel)

    yield start
    for proc, channel in started:
        channel.close()
        assert proc.stop() == 0


def until_gone(files, needle: bytes, limit_s: float) -> tuple[list[str], float]:
    started = time.monotonic()
    while True:
        left = holding(files(), needle)
        if not left or time.monotonic() - started > limit_s:
            return left, time.monotonic() - started
        time.sleep(0.1)


def test_a_deleted_user_is_in_no_sqlite_file_once_delete_user_returns(fusion_on, tmp_path):
    _, fusion = fusion_on()
    user, other = "disk-user-7c1e9a-forget-me", "disk-user-keep"
    for u in (user, other):
        assert fusion.Ingest(events_of(u), timeout=30).accepted == 60
    fusion.GetProfile(fusion_pb2.GetProfileRequest(user_id=user), timeout=10)
    files = lambda: sqlite_files(tmp_path / "fusion.sqlite3")  # noqa: E731
    assert holding(files(), user.encode()), "the test must see the id before the delete"
    assert fusion.DeleteUser(fusion_pb2.DeleteUserRequest(user_id=user),
                             timeout=10).deleted_events == 60
    left_at_return = holding(files(), user.encode())
    left, seconds = until_gone(files, user.encode(), DELETE_BOUND_S)
    print(f"\nafter DeleteUser: id in {left_at_return or 'no file'} at return, "
          f"{left or 'no file'} after {seconds:.1f} s; files {[f.name for f in files()]}")
    assert not left, f"the deleted user's id is still in {left} after {DELETE_BOUND_S} s"
    assert holding(files(), other.encode()), "the other user's rows are untouched"
    assert fusion.GetProfile(fusion_pb2.GetProfileRequest(user_id=other),
                             timeout=10).total_events == 60


def aof_files(server) -> list[Path]:
    return sorted(Path(server.data_dir).rglob("*.aof"))


def rewrite_aof(url: str) -> None:
    client = redis.Redis.from_url(url)
    done_before = client.info("persistence").get("aof_rewrites", 0)
    client.bgrewriteaof()
    deadline = time.monotonic() + REWRITE_LIMIT_S
    while time.monotonic() < deadline:
        info = client.info("persistence")
        if (not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]
                and info.get("aof_rewrites", done_before + 1) > done_before):
            assert info["aof_last_bgrewrite_status"] == "ok"
            client.close()
            return
        time.sleep(0.1)
    raise AssertionError("the AOF rewrite did not finish")


def test_a_deleted_user_leaves_the_redis_aof_when_it_is_rewritten(fusion_on, start_redis):
    server = start_redis()
    _, fusion = fusion_on("--store", "redis", "--redis-url", server.url)
    user = "redis-user-51d0-forget-me"
    assert fusion.Ingest(events_of(user), timeout=30).accepted == 60
    assert fusion.DeleteUser(fusion_pb2.DeleteUserRequest(user_id=user),
                             timeout=10).deleted_events == 60
    before = holding(aof_files(server), user.encode())
    rewrite_aof(server.url)
    after = holding(aof_files(server), user.encode())
    print(f"\nRedis AOF after DeleteUser: id in {before}; after BGREWRITEAOF: {after or 'none'}")
    assert before, "the AOF keeps a deleted user's commands until it is rewritten (README)"
    assert not after


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_with_a_user_id_key_no_file_holds_the_raw_id_and_the_api_is_unchanged(
        fusion_on, start_redis, tmp_path, store):
    key_file = tmp_path / "user-id-key"
    key_file.write_text(KEY + "\n")
    args = ["--user-id-key-file", str(key_file)]
    if store == "redis":
        server = start_redis()
        args += ["--store", "redis", "--redis-url", server.url]
        files = lambda: aof_files(server)  # noqa: E731
    else:
        files = lambda: sqlite_files(tmp_path / "fusion.sqlite3")  # noqa: E731
    _, fusion = fusion_on(*args)
    user = "alice.pseudonym@example.org"
    # Event ids derived by the server (they hash the raw id: stored keyed too) and ids a
    # client chose without the user id in them; ids with it in would be stored as sent.
    batch = events_of(user, 10, ids="")
    batch.events.extend(events_of(user, 10, ids="evt").events[:10])
    for n, e in enumerate(batch.events[10:]):
        e.event_time_ms += 100 + n
    assert fusion.Ingest(batch, timeout=30).accepted == 20
    profile = fusion.GetProfile(fusion_pb2.GetProfileRequest(
        user_id=user, recent_events_limit=3), timeout=10)
    assert profile.user_id == user and profile.known and profile.total_events == 20
    assert {r.event.user_id for r in profile.recent_events} == {user}
    assert fusion.Ingest(batch, timeout=30).duplicates == 20, "ids still dedupe"
    assert files() and not holding(files(), user.encode()), "the raw id reached a file"
    assert fusion.DeleteUser(fusion_pb2.DeleteUserRequest(user_id=user),
                             timeout=10).deleted_events == 20
    assert not fusion.GetProfile(fusion_pb2.GetProfileRequest(user_id=user), timeout=10).known


@pytest.mark.parametrize("content", ["", "too-short"], ids=["empty", "short"])
def test_an_empty_or_short_user_id_key_file_refuses_to_start(stack, model_repo, tmp_path,
                                                             content):
    key_file = tmp_path / "key"
    key_file.write_text(content)
    proc = ServiceProcess("fusion", [
        "--model-repo", str(model_repo), "--embedding-address", stack["embedding"].address,
        "--sqlite-path", str(tmp_path / "f.sqlite3"), "--user-id-key-file", str(key_file)],
        tmp_path).start()
    try:
        code = proc.proc.wait(60)
    finally:
        proc.kill()
    output = proc.log_path.read_text()
    errors = [line for line in output.splitlines() if '"level": "ERROR"' in line]
    assert code != 0 and "Traceback" not in output and not proc.port_file.exists()
    assert len(errors) == 1 and f"--user-id-key-file {key_file}" in errors[0], output
