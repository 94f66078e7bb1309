"""How a caller dials crossrec services securely: the client side of transport security
(CA, client certificate and key for mutual TLS, bearer token), as one value.

Services dialing each other (services/common/remote.py) and the tools that drive services
(tools/stack.py) carry it; the servers' side (TLS credentials, the token check) is
services/common/security.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class ClientSecurity:
    """How this process dials other crossrec services (and how tools dial crossrec).
    Paths are PEM files; "" is unset (no TLS, no token)."""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    token: str = ""

    def channel(self, address: str, options: list | None = None) -> grpc.Channel:
        """A bare channel (TLS when a CA is set, no token): health checks and raw stubs.
        Calls that need the token pass `metadata()`."""
        if not self.tls_ca:
            return grpc.insecure_channel(address, options=options)
        read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
        creds = grpc.ssl_channel_credentials(read(self.tls_ca), read(self.tls_key),
                                             read(self.tls_cert))
        return grpc.secure_channel(address, creds, options=options)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()
