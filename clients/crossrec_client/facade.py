"""CrossrecClient: the three service clients behind one set of options."""

from __future__ import annotations

from clients.crossrec_client.embedding import EmbeddingClient
from clients.crossrec_client.fusion import FusionClient
from clients.crossrec_client.ranking import RankingClient
from clients.crossrec_client.service import ServiceClient


class CrossrecClient:
    """The three service clients with one set of options; any address may be omitted.

    Options (keyword-only, shared): timeout_s, retry (RetryPolicy or None), tls_ca,
    tls_cert, tls_key, tls_server_name, token, options (extra channel options).
    """

    def __init__(self, embedding: str | None = None, fusion: str | None = None,
                 ranking: str | None = None, **options):
        self._clients: dict[str, ServiceClient] = {}
        try:
            for name, cls, address in (("embedding", EmbeddingClient, embedding),
                                       ("fusion", FusionClient, fusion),
                                       ("ranking", RankingClient, ranking)):
                if address:
                    self._clients[name] = cls(address, **options)
        except BaseException:
            self.close()
            raise

    def _get(self, name: str):
        try:
            return self._clients[name]
        except KeyError:
            raise ValueError(f"this CrossrecClient has no {name} address; "
                             f"pass {name}='host:port'") from None

    @property
    def embedding(self) -> EmbeddingClient:
        return self._get("embedding")

    @property
    def fusion(self) -> FusionClient:
        return self._get("fusion")

    @property
    def ranking(self) -> RankingClient:
        return self._get("ranking")

    @property
    def configured(self) -> dict[str, ServiceClient]:
        """{service name: client} for the addresses given."""
        return dict(self._clients)

    def close(self) -> None:
        for client in self._clients.values():
            client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
