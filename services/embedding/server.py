"""Embedding gRPC server: `python -m services.embedding.server --port 0 --port-file F`."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass

from crossrec.common.v1 import common_pb2
from crossrec.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from recmodel import modelrepo
from services.common.errors import NotReady
from recmodel.ortsession import CUDA, choose_providers
from services.common import flags, metrics
from services.common.flags import ServerConfig, flag, none_if_zero
from services.common.serve import engine_call, serve, setup_logging
from services.embedding.batcher import DynamicBatcher
from recmodel.encoder import usable_cpus
from services.embedding.engine import EmbeddingEngine

log = logging.getLogger("crossrec.embedding")
DEFAULT_PORT = 50051


@dataclass(frozen=True)
class Config:
    """The embedding service's own flags (the shared ones: ServerConfig)."""

    model_repo: str = flag("models", "model repository directory")
    model_name: str = flag("encoder", "model to serve: encoder (fp32) or encoder_int8")
    model_version: int | None = flag(0, "version to serve; 0 = the highest", convert=none_if_zero)
    device: str = flag("auto", "auto (CUDA when available), cpu or cuda")
    intra_op_threads: int = flag(0, "ONNX Runtime threads per model call; 0 = cores / "
                                 "--model-workers on the CPU, one per core on CUDA")
    model_workers: int = flag(0, "model calls run side by side (batcher threads); 0 = one per "
                              "core on the CPU, 2 on CUDA")
    max_texts_per_request: int = flag(256, "most texts one Embed call may carry")
    max_request_tokens: int = flag(65_536, "most padded tokens one Embed call may carry after "
                                   "tokenisation (texts are cut at the model's "
                                   "max_sequence_tokens); more: INVALID_ARGUMENT")
    max_batch_size: int = flag(64, "most texts in one model call; 1 disables batching")
    max_batch_tokens: int = flag(0, "most padded tokens (sum over the texts) per model call, so "
                                 "a long request's chunk holds a worker for a bounded time; 0 = "
                                 "2048 on the CPU (~0.3 s on one core), 16384 on CUDA")
    max_delay_ms: float = flag(2.0, "longest a request waits for others to join its batch")
    max_queue_texts: int = flag(4096, "texts queued at most; beyond: RESOURCE_EXHAUSTED")

    def __post_init__(self):
        if self.max_texts_per_request > self.max_queue_texts:
            raise ValueError("--max-texts-per-request must not exceed --max-queue-texts")


def model_workers(config: Config, provider: str) -> tuple[int, int]:
    """(batcher workers, ORT intra-op threads per model call). On the CPU the default is one
    worker per core, each call on one thread: calls run side by side, none waits at a
    multi-thread barrier for a thread the gRPC threads have descheduled, and a long request's
    chunk holds one core, not all. On CUDA, two workers (one prepares a batch while the other
    runs) on `--intra-op-threads` threads."""
    cores = usable_cpus()
    if provider == CUDA:
        return config.model_workers or 2, config.intra_op_threads or cores
    workers = config.model_workers or cores
    return workers, config.intra_op_threads or max(1, cores // workers)


class EmbeddingService:
    """Engine + batcher: what the servicer calls. Built by load() after the port is bound."""

    def __init__(self, config: Config):
        model_dir = modelrepo.resolve(config.model_repo, config.model_name, config.model_version)
        workers, threads = model_workers(config, choose_providers(config.device)[0])
        self.engine = EmbeddingEngine(model_dir, device=config.device, intra_op_threads=threads,
                                      max_texts_per_request=config.max_texts_per_request,
                                      max_request_tokens=config.max_request_tokens)
        self.engine.warmup()
        batch_size = config.max_batch_size
        max_tokens = config.max_batch_tokens or (
            16384 if self.engine.provider == CUDA else 2048)
        self.batcher = DynamicBatcher(lambda items: self.engine.run_sorted(items, batch_size),
                                      max_batch_size=batch_size,
                                      max_batch_tokens=max_tokens,
                                      max_delay_ms=config.max_delay_ms,
                                      max_queue_texts=config.max_queue_texts,
                                      workers=workers)
        log.info("batcher", extra={"fields": {"model_workers": workers,
                                               "intra_op_threads": threads,
                                               "max_batch_tokens": max_tokens}})
        metrics.EMBED_QUEUE_TEXTS.set_function(lambda: self.batcher.queued_texts)
        metrics.MODEL_INFO.labels("embedding", self.engine.name).info({
            "version": str(self.engine.version), "provider": self.engine.provider,
            "precision": self.engine.meta.get("precision", "fp32")})

    def embed(self, texts: list[str], budget_s: float | None):
        """(float32 [n, dim], encodings) for `texts`, through the batcher."""
        deadline = None if budget_s is None else time.monotonic() + budget_s
        self.engine.validate(texts)
        encoded = self.engine.tokenize(texts)
        costs = self.engine.request_tokens(encoded)
        return self.batcher(encoded, costs, deadline), encoded

    def close(self) -> None:
        self.batcher.close()


class EmbeddingServicer(embedding_pb2_grpc.EmbeddingServiceServicer):
    def __init__(self, config: Config):
        self.config = config
        self.service: EmbeddingService | None = None

    def _ready(self) -> EmbeddingService:
        if self.service is None:
            raise NotReady("embedding model is still loading")
        return self.service

    def _model(self) -> common_pb2.ModelRef:
        engine = self._ready().engine
        return common_pb2.ModelRef(name=engine.name, version=engine.version)

    def Embed(self, request, context):
        texts = list(request.texts)
        vectors, encoded = engine_call(
            context, lambda: self._ready().embed(texts, context.time_remaining()))
        return embedding_pb2.EmbedResponse(
            embeddings=[embedding_pb2.Embedding(values=v.tolist(), token_count=len(e.ids),
                                                truncated=e.truncated)
                        for v, e in zip(vectors, encoded)],
            dim=vectors.shape[1], model=engine_call(context, self._model))

    def ModelInfo(self, request, context):
        service = engine_call(context, self._ready)
        engine = service.engine
        return embedding_pb2.ModelInfoResponse(
            model=self._model(), dim=engine.dim, max_sequence_tokens=engine.max_tokens,
            max_texts_per_request=engine.max_texts_per_request, provider=engine.provider,
            source_model=str(engine.meta.get("source_model", "")),
            precision=engine.meta.get("precision", "fp32"))


def parse_args(argv: list[str] | None = None) -> tuple[ServerConfig, Config]:
    return flags.parse(argv, ServerConfig, Config, description=__doc__,
                       defaults={"port": DEFAULT_PORT})


def main(argv: list[str] | None = None) -> int:
    server_config, config = parse_args(argv)
    setup_logging(server_config.log_level)
    log.info("config", extra={"fields": vars(config)})
    servicer = EmbeddingServicer(config)

    def register(server):
        embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server(servicer, server)
        return [embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name]

    def load():
        servicer.service = EmbeddingService(config)
        return servicer.service

    return serve("embedding", server_config, register, load)


if __name__ == "__main__":
    sys.exit(main())
