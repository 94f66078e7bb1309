"""The embedding service's client: texts to vectors, model info."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import numpy as np

from clients.crossrec_client.errors import error_from_rpc
from clients.crossrec_client.limits import MAX_TEXTS_PER_EMBED_CALL
from clients.crossrec_client.service import ServiceClient
from clients.crossrec_client.values import ModelInfo, ModelRef
from crossrec.embedding.v1 import embedding_pb2, embedding_pb2_grpc


def embed_in_chunks(embed: grpc.UnaryUnaryMultiCallable, texts: Sequence[str],
                    max_texts_per_call: int, timeout: float | None) -> np.ndarray:
    """float32 [len(texts), dim], one row per text, in order: `texts` go to `embed` (an
    EmbeddingService.Embed stub method) as concurrent calls of at most `max_texts_per_call`
    texts each, every call with `timeout` (s). An empty list is one empty call, which the
    server refuses (INVALID_ARGUMENT). When a call fails, the others are cancelled and its
    grpc.RpcError is raised for the caller to map. The one chunking loop: the client library's
    EmbeddingClient and the services' own calls (services/common/remote.py) both use it."""
    requests = [embedding_pb2.EmbedRequest(texts=texts[i:i + max_texts_per_call])
                for i in range(0, max(len(texts), 1), max_texts_per_call)]
    futures = [embed.future(r, timeout=timeout) for r in requests]
    rows = []
    try:
        for future in futures:
            rows.extend(e.values for e in future.result().embeddings)
    except grpc.RpcError:
        for future in futures:
            future.cancel()
        raise
    return np.asarray(rows, dtype=np.float32).reshape(len(texts), -1)


class EmbeddingClient(ServiceClient):
    """crossrec.embedding.v1.EmbeddingService: texts to L2-normalised float32 vectors."""
    SERVICE = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
    _STUB = embedding_pb2_grpc.EmbeddingServiceStub

    def __init__(self, address: str, *, max_texts_per_call: int = MAX_TEXTS_PER_EMBED_CALL,
                 **options):
        super().__init__(address, **options)
        self.max_texts_per_call = max_texts_per_call

    def embed(self, texts: Sequence[str] | str, *, timeout: float | None = None) -> np.ndarray:
        """float32 [len(texts), dim], one unit-length row per text, in order. Lists longer
        than `max_texts_per_call` are sent as concurrent calls (the server batches them)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        try:
            return embed_in_chunks(self.stub.Embed, texts, self.max_texts_per_call,
                                   self.timeout_s if timeout is None else timeout)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        r = self._invoke(self.stub.ModelInfo, embedding_pb2.ModelInfoRequest(), timeout)
        return ModelInfo(ModelRef.from_pb(r.model), r.dim, r.max_sequence_tokens,
                         r.max_texts_per_request, r.provider, r.source_model, r.precision)
