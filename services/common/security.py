"""Transport security of the servers: optional TLS, mutual TLS, and a bearer-token check
(constant-time compare; UNAUTHENTICATED on failure). The client side (how a service dials
another) is the client library's ClientSecurity (clients/crossrec_client/security.py).

Health checks stay open so Kubernetes probes need no token. Reflection needs the token when
auth is on (it is a long-lived stream: open to anyone, it let unauthenticated callers hold
server threads), unless the server is started with --open-reflection.
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

import grpc

HEALTH_SERVICES = ("/grpc.health.v1.Health/",)
REFLECTION_SERVICES = ("/grpc.reflection.v1alpha.ServerReflection/",
                       "/grpc.reflection.v1.ServerReflection/")
TOKEN_ENV = "CROSSREC_AUTH_TOKEN"


class ConfigError(Exception):
    """A flag names a secret that cannot be used (missing, unreadable, empty or too short);
    the server refuses to start with this one-line message."""


def read_secret(path: str, flag: str, min_chars: int = 1) -> str:
    """The stripped text of the secret file `path` that `flag` names; ConfigError when it
    cannot be read or holds fewer than `min_chars` characters. Never fails open: an empty
    file is an error, not "no secret"."""
    try:
        text = Path(path).read_text().strip()
    except OSError as err:
        raise ConfigError(f"{flag} {path}: cannot read it: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{flag} {path}: not UTF-8 text") from None
    if not text:
        raise ConfigError(f"{flag} {path}: the file is empty or whitespace only; refusing to "
                          "start without the secret it should hold")
    if len(text) < min_chars:
        raise ConfigError(f"{flag} {path}: holds {len(text)} characters, at least "
                          f"{min_chars} are needed")
    return text


def read_token(token_file: str) -> str:
    """The bearer token from `token_file`, else $CROSSREC_AUTH_TOKEN, else "" (auth off).

    ConfigError when the file cannot be read or is empty, or when the variable is set to
    whitespace only: a token that was meant to be there never turns auth off silently.
    """
    if token_file:
        return read_secret(token_file, "--auth-token-file")
    raw = os.environ.get(TOKEN_ENV, "")
    if raw and not raw.strip():
        raise ConfigError(f"{TOKEN_ENV} is set to whitespace only; unset it to turn auth off")
    return raw.strip()


def server_credentials(cert: str, key: str, client_ca: str) -> grpc.ServerCredentials | None:
    """TLS when cert+key are given; mutual TLS (client certificates required and verified
    against `client_ca`) when a client CA is given too. None: plaintext."""
    if not cert and not key:
        if client_ca:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (cert and key):
        raise ValueError("--tls-cert and --tls-key go together")
    root = Path(client_ca).read_bytes() if client_ca else None
    return grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())],
                                       root_certificates=root,
                                       require_client_auth=bool(client_ca))


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Rejects calls without exactly one `authorization: Bearer <token>` header with
    UNAUTHENTICATED, whatever the handler's kind (unary or streaming). Health is always open;
    reflection only with `open_reflection`. Two authorization headers are refused even when
    one is right: which one a proxy or another server reads is not defined."""

    def __init__(self, token: str, open_reflection: bool = False):
        self._expected = f"Bearer {token}".encode()
        self._open = HEALTH_SERVICES + (REFLECTION_SERVICES if open_reflection else ())

    def authorized(self, metadata) -> bool:
        sent = [v for k, v in (metadata or ()) if k == "authorization"]
        if len(sent) != 1:
            return False
        value = sent[0].encode() if isinstance(sent[0], str) else bytes(sent[0])
        return hmac.compare_digest(value, self._expected)

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(self._open) or \
                self.authorized(handler_call_details.invocation_metadata):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "missing, repeated or wrong bearer token in the authorization "
                          "metadata")

        # The denial replaces the handler before it runs: no thread waits on a stream, no
        # request of a streaming call is read.
        if handler.unary_unary:
            return handler._replace(unary_unary=deny)
        if handler.stream_unary:
            return handler._replace(stream_unary=deny)
        if handler.unary_stream:
            return handler._replace(unary_stream=deny)
        return handler._replace(stream_stream=deny)
