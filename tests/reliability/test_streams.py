"""Long-lived streams against the running servers: hundreds of idle streams (reflection,
health Watch, IngestStream), sent by a caller who never says a word, leave Recommend,
GetProfile and health Check answering; each streaming method holds at most --max-streams
streams (more are refused at once); a stream idle past --stream-idle-timeout-s is cancelled.

Before: 64 idle reflection streams held all 64 worker threads of a server and every unary
call, health Check included, failed DEADLINE_EXCEEDED until they closed.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tools.stack import ServiceProcess
from crossrec.fusion.v1 import fusion_pb2, fusion_pb2_grpc
from crossrec.ranking.v1 import ranking_pb2, ranking_pb2_grpc
from tests.reliability.support import SERVING, pb_event, rpc_outcome

IDLE_STREAMS = 200
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
WATCH = "/grpc.health.v1.Health/Watch"
INGEST_STREAM = "/crossrec.fusion.v1.FusionService/IngestStream"
CALL_TIMEOUT_S = 5.0
STREAM_LIMIT_S = 60.0
NOW_MS = int(time.time() * 1000)


class IdleStreams:
    """Streams opened on `channel` whose request side sends nothing until close()."""

    def __init__(self, channel: grpc.Channel):
        self.channel = channel
        self._quiet = threading.Event()
        self.calls: list = []

    def _silence(self):
        self._quiet.wait(STREAM_LIMIT_S)
        return
        yield  # a generator that yields nothing

    def open(self, method: str, n: int) -> "IdleStreams":
        for _ in range(n):
            if method == WATCH:
                call = self.channel.unary_stream(method)(
                    health_pb2.HealthCheckRequest().SerializeToString(), timeout=STREAM_LIMIT_S)
            elif method == INGEST_STREAM:
                call = self.channel.stream_unary(method).future(self._silence(),
                                                                timeout=STREAM_LIMIT_S)
            else:
                call = self.channel.stream_stream(method)(self._silence(),
                                                          timeout=STREAM_LIMIT_S)
            self.calls.append(call)
        return self

    def codes(self) -> Counter:
        """Status of each stream that has ended; "open" for the rest."""
        out = Counter()
        for call in self.calls:
            done = call.done() if hasattr(call, "done") else False
            out[call.code().name if done else "open"] += 1
        return out

    def close(self) -> None:
        self._quiet.set()
        for call in self.calls:
            call.cancel()


def health(channel) -> int | grpc.StatusCode:
    code, _, _, reply = rpc_outcome(health_pb2_grpc.HealthStub(channel).Check,
                                    health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S)
    return reply.status if reply is not None else code


def test_two_hundred_idle_streams_leave_recommend_and_health_answering(stack, known_users):
    ranking = grpc.insecure_channel(stack["ranking"].address)
    fusion = grpc.insecure_channel(stack["fusion"].address)
    streams = [IdleStreams(ranking).open(REFLECTION, 150).open(WATCH, 50),
               IdleStreams(fusion).open(INGEST_STREAM, 100).open(REFLECTION, 100)]
    try:
        time.sleep(1.0)  # every stream reaches its server
        code, details, seconds, reply = rpc_outcome(
            ranking_pb2_grpc.RankingServiceStub(ranking).Recommend,
            ranking_pb2.RecommendRequest(user_id=known_users[0], platform="office", k=5),
            timeout=10)
        profile = rpc_outcome(fusion_pb2_grpc.FusionServiceStub(fusion).GetProfile,
                              fusion_pb2.GetProfileRequest(user_id=known_users[0]),
                              timeout=CALL_TIMEOUT_S)
        healths = {"ranking": health(ranking), "fusion": health(fusion)}
        print(f"\nwith {2 * IDLE_STREAMS} idle streams open: Recommend {code.name} in "
              f"{seconds:.2f} s, GetProfile {profile[0].name}, health {healths}; streams: "
              f"ranking {dict(streams[0].codes())}, fusion {dict(streams[1].codes())}")
        assert code == grpc.StatusCode.OK, f"{code.name}: {details}"
        assert reply.source == ranking_pb2.SOURCE_PERSONALISED and len(reply.items) == 5
        assert profile[0] == grpc.StatusCode.OK and profile[3].known
        assert healths == {"ranking": SERVING, "fusion": SERVING}
        for s in streams:
            refused = s.codes()["RESOURCE_EXHAUSTED"]
            assert refused > 0, "streams beyond the cap are refused at once"
    finally:
        for s in streams:
            s.close()
        ranking.close()
        fusion.close()


def test_an_idle_ingest_stream_is_cancelled_and_the_cap_refuses_one_more(
        stack, model_repo, tmp_path):
    fusion = ServiceProcess("fusion", [
        "--model-repo", str(model_repo), "--embedding-address", stack["embedding"].address,
        "--sqlite-path", str(tmp_path / "f.sqlite3"), "--max-streams", "2",
        "--stream-idle-timeout-s", "1"], tmp_path).start().wait_ready()
    try:
        with grpc.insecure_channel(fusion.address) as channel:
            idle = IdleStreams(channel).open(INGEST_STREAM, 3)
            deadline = time.monotonic() + 15
            while idle.codes()["open"] and time.monotonic() < deadline:
                time.sleep(0.1)
            codes = idle.codes()
            idle.close()
            print(f"\n3 idle IngestStreams, cap 2, idle timeout 1 s: {dict(codes)}")
            assert codes == Counter(RESOURCE_EXHAUSTED=1, CANCELLED=2), codes
            reply = fusion_pb2_grpc.FusionServiceStub(channel).IngestStream(iter([
                fusion_pb2.IngestRequest(events=[pb_event(dict(
                    event_id="s1", user_id="stream-user", platform="office", action=2,
                    item_id="s-item", item_text="idle stream stapler",
                    event_time_ms=NOW_MS))])]), timeout=30)
            assert reply.accepted == 1, "the slots were given back"
    finally:
        assert fusion.stop() == 0
