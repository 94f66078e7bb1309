"""Token auth and the stream guard as interceptors, called directly (no sockets): which calls
pass, which are refused, and that a refusal never reads a stream."""

import time
from types import SimpleNamespace

import grpc
import pytest

from services.common.security import ConfigError, TokenAuthInterceptor, read_secret, read_token
from services.common.streams import StreamGuard

TOKEN = "s3cret-token-for-tests"
RIGHT = ("authorization", f"Bearer {TOKEN}")
WRONG = ("authorization", "Bearer wrong")
RECOMMEND = "/crossrec.ranking.v1.RankingService/Recommend"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
WATCH = "/grpc.health.v1.Health/Watch"


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self):
        self.code = None
        self.callbacks = []
        self.cancelled = False

    def abort(self, code, details):
        self.code, self.details = code, details
        raise Aborted(code)

    def add_callback(self, callback):
        self.callbacks.append(callback)
        return True

    def cancel(self):
        self.cancelled = True


def details(method, *metadata):
    return SimpleNamespace(method=method, invocation_metadata=tuple(metadata))


def handlers():
    return {
        "unary_unary": grpc.unary_unary_rpc_method_handler(lambda r, c: "ran"),
        "stream_unary": grpc.stream_unary_rpc_method_handler(lambda it, c: list(it)),
        "unary_stream": grpc.unary_stream_rpc_method_handler(lambda r, c: iter(["ran"])),
        "stream_stream": grpc.stream_stream_rpc_method_handler(lambda it, c: iter(it)),
    }


def run(handler, kind):
    behaviour = getattr(handler, kind)
    context = FakeContext()
    requests = iter(["never read"]) if kind.startswith("stream") else "request"
    try:
        result = behaviour(requests, context)
        if kind.endswith("stream"):
            result = list(result)
    except Aborted:
        return context.code
    return result


# --- secrets ---------------------------------------------------------------------------------

@pytest.mark.parametrize("content", ["", "   \n\t ", "\n"])
def test_an_empty_or_blank_token_file_is_a_config_error_not_auth_off(tmp_path, content):
    path = tmp_path / "token"
    path.write_text(content)
    with pytest.raises(ConfigError, match="--auth-token-file .* empty"):
        read_token(str(path))


def test_a_missing_token_file_is_a_config_error_of_one_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        read_token(str(tmp_path / "absent"))
    assert "cannot read" in str(err.value) and "\n" not in str(err.value)


def test_a_whitespace_token_in_the_environment_is_refused(monkeypatch):
    monkeypatch.setenv("CROSSREC_AUTH_TOKEN", "  ")
    with pytest.raises(ConfigError, match="CROSSREC_AUTH_TOKEN"):
        read_token("")
    monkeypatch.setenv("CROSSREC_AUTH_TOKEN", "")
    assert read_token("") == ""


def test_a_secret_shorter_than_asked_is_refused(tmp_path):
    path = tmp_path / "key"
    path.write_text("short\n")
    with pytest.raises(ConfigError, match="at least 16"):
        read_secret(str(path), "--user-id-key-file", 16)


# --- token check -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["unary_unary", "stream_unary", "unary_stream",
                                  "stream_stream"])
def test_every_kind_of_call_without_the_token_is_unauthenticated_and_reads_nothing(kind):
    handler = TokenAuthInterceptor(TOKEN).intercept_service(
        lambda d: handlers()[kind], details(RECOMMEND, WRONG))
    assert run(handler, kind) == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("sent", [(WRONG, RIGHT), (RIGHT, WRONG), (RIGHT, RIGHT)],
                         ids=["wrong-then-right", "right-then-wrong", "right-twice"])
def test_two_authorization_headers_are_unauthenticated(sent):
    handler = TokenAuthInterceptor(TOKEN).intercept_service(
        lambda d: handlers()["unary_unary"], details(RECOMMEND, *sent))
    assert run(handler, "unary_unary") == grpc.StatusCode.UNAUTHENTICATED


def test_one_right_token_passes():
    handler = TokenAuthInterceptor(TOKEN).intercept_service(
        lambda d: handlers()["unary_unary"], details(RECOMMEND, ("x-other", "1"), RIGHT))
    assert run(handler, "unary_unary") == "ran"


def test_reflection_needs_the_token_unless_opened_and_health_never_does():
    closed, opened = TokenAuthInterceptor(TOKEN), TokenAuthInterceptor(TOKEN,
                                                                       open_reflection=True)
    reflection = lambda d: handlers()["stream_stream"]  # noqa: E731
    assert run(closed.intercept_service(reflection, details(REFLECTION)),
               "stream_stream") == grpc.StatusCode.UNAUTHENTICATED
    assert run(opened.intercept_service(reflection, details(REFLECTION)),
               "stream_stream") == ["never read"]
    assert run(closed.intercept_service(lambda d: handlers()["unary_stream"], details(WATCH)),
               "unary_stream") == ["ran"]


# --- stream guard ----------------------------------------------------------------------------

def test_the_stream_guard_refuses_one_stream_more_than_its_cap_per_method_at_once():
    guard = StreamGuard(max_streams=2, idle_timeout_s=0)
    # Entering is what a stream's wrapper does first; these stay open until they leave.
    tokens = [guard._enter(f"/svc/M{n % 2}", FakeContext(), True) for n in range(4)]
    assert guard.open_streams("/svc/M0") == 2 == guard.open_streams("/svc/M1")
    refused = guard.intercept_service(lambda d: grpc.stream_unary_rpc_method_handler(
        lambda it, c: list(it)), details("/svc/M0"))
    assert run(refused, "stream_unary") == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.stream_unary.experimental_thread_pool is guard.pool
    for token in tokens:
        guard._leave(token)
    assert guard.open_streams() == 0
    guard.close()


def test_a_finished_or_failed_stream_gives_its_slot_back():
    guard = StreamGuard(max_streams=1, idle_timeout_s=0)
    ok = guard.intercept_service(lambda d: grpc.stream_unary_rpc_method_handler(
        lambda it, c: list(it)), details("/svc/M"))
    assert ok.stream_unary(iter([1, 2]), FakeContext()) == [1, 2]

    def boom(requests, context):
        raise RuntimeError("handler failed")
    bad = guard.intercept_service(lambda d: grpc.stream_unary_rpc_method_handler(boom),
                                  details("/svc/M"))
    with pytest.raises(RuntimeError):
        bad.stream_unary(iter([]), FakeContext())
    assert guard.open_streams() == 0
    guard.close()


def test_an_idle_client_stream_is_cancelled_and_a_watch_is_not():
    guard = StreamGuard(max_streams=4, idle_timeout_s=0.2, check_s=0.05)
    idle, watch = FakeContext(), FakeContext()
    guard._enter("/svc/IngestStream", idle, idle_timeout=True)
    guard._enter(WATCH, watch, idle_timeout=False)
    deadline = time.monotonic() + 5
    while not idle.cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert idle.cancelled and not watch.cancelled
    assert guard.open_streams("/svc/IngestStream") == 0 and guard.open_streams(WATCH) == 1
    guard.close()
