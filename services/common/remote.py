"""Service-to-service calls: the embedding service as a plain `embed(texts, budget_s)` callable.

gRPC errors become engine errors here, so engines never see grpc: UNAVAILABLE -> NotReady,
DEADLINE_EXCEEDED -> BudgetSpent, RESOURCE_EXHAUSTED -> Overloaded.
"""

from __future__ import annotations

import grpc
import numpy as np

from crossrec.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from services.common.errors import BudgetSpent, InvalidInput, NotReady, Overloaded

DEFAULT_TIMEOUT_S = 30.0
_ERRORS = {grpc.StatusCode.DEADLINE_EXCEEDED: BudgetSpent,
           grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
           grpc.StatusCode.INVALID_ARGUMENT: InvalidInput}


def channel_options() -> list[tuple[str, object]]:
    return [("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000)]


def rpc_error(err: grpc.RpcError, what: str) -> Exception:
    """The engine error for a failed downstream call."""
    cls = _ERRORS.get(err.code(), NotReady)
    return cls(f"{what}: {err.code().name}: {err.details()}")


class EmbeddingRemote:
    """Calls EmbeddingService.Embed in chunks; returns float32 [n, dim]."""

    def __init__(self, address: str, max_texts_per_call: int = 256):
        self.address = address
        self.max_texts_per_call = max_texts_per_call
        self._channel = grpc.insecure_channel(address, options=channel_options())
        self._stub = embedding_pb2_grpc.EmbeddingServiceStub(self._channel)

    def model(self) -> tuple[str, int, int]:
        """(name, version, dim) of the remote model."""
        try:
            info = self._stub.ModelInfo(embedding_pb2.ModelInfoRequest(), timeout=10)
        except grpc.RpcError as err:
            raise rpc_error(err, f"embedding service at {self.address}") from None
        return info.model.name, info.model.version, info.dim

    def __call__(self, texts: list[str], budget_s: float | None = None) -> np.ndarray:
        futures = []
        for start in range(0, len(texts), self.max_texts_per_call):
            request = embedding_pb2.EmbedRequest(texts=texts[start:start + self.max_texts_per_call])
            futures.append(self._stub.Embed.future(request, timeout=budget_s or DEFAULT_TIMEOUT_S))
        rows = []
        try:
            for future in futures:
                rows.extend(e.values for e in future.result().embeddings)
        except grpc.RpcError as err:
            for future in futures:
                future.cancel()
            raise rpc_error(err, f"embedding service at {self.address}") from None
        return np.asarray(rows, dtype=np.float32).reshape(len(texts), -1)

    def close(self) -> None:
        self._channel.close()
