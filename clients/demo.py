"""`make demo`: start the services on loopback, load real data through gRPC, print results.

For now: the embedding service embeds real Amazon titles and the demo prints the catalogue
titles nearest to a few of them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from clients.datasets import AMAZON, read_items
from clients.stack import ServiceProcess
from crossrec.embedding.v1 import embedding_pb2, embedding_pb2_grpc
from services.common.text import compose_item_text


def embed_all(stub, texts: list[str], batch: int = 128) -> np.ndarray:
    out = []
    for start in range(0, len(texts), batch):
        reply = stub.Embed(embedding_pb2.EmbedRequest(texts=texts[start:start + batch]),
                           timeout=60)
        out.extend(list(e.values) for e in reply.embeddings)
        print(f"\r  embedded {min(start + batch, len(texts)):>6}/{len(texts)}", end="", flush=True)
    print()
    return np.asarray(out, dtype=np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", default="var/run")
    parser.add_argument("--model-repo", default=os.environ.get("CROSSREC_MODEL_REPO", "models"))
    parser.add_argument("--items", type=int, default=3000, help="catalogue items to embed")
    args = parser.parse_args(argv)

    items = [i for i in read_items(AMAZON)][:: max(1, 38396 // args.items)][:args.items]
    embedding = ServiceProcess("embedding", ["--model-repo", args.model_repo],
                               Path(args.run_dir)).start()
    try:
        embedding.wait_ready()
        print(f"embedding service SERVING on {embedding.address}")
        with grpc.insecure_channel(embedding.address) as channel:
            stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
            info = stub.ModelInfo(embedding_pb2.ModelInfoRequest(), timeout=5)
            print(f"model {info.model.name} v{info.model.version} ({info.precision}, "
                  f"dim {info.dim}) on {info.provider}")
            texts = [compose_item_text(i["title"], i["attributes"]) for i in items]
            started = time.perf_counter()
            vectors = embed_all(stub, texts)
            took = time.perf_counter() - started
            print(f"{len(texts)} real Amazon items embedded over gRPC in {took:.1f} s "
                  f"({len(texts) / took:.0f} items/s)\n")
            for query in (0, len(items) // 2, len(items) - 1):
                scores = vectors @ vectors[query]
                best = [j for j in np.argsort(-scores) if j != query][:5]
                print(f"nearest to [{items[query]['platform']}] {items[query]['title']}")
                for j in best:
                    print(f"  {scores[j]:.3f}  [{items[j]['platform']}] {items[j]['title']}")
                print()
    finally:
        code = embedding.stop()
    print(f"embedding service stopped (exit {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
