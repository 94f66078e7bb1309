"""Flags declared once: each field of a frozen config dataclass is a flag (`flag()`: default,
help, optional former name and converter), and that one declaration builds the argparse
parser, the env twins (`--model-repo` / `CROSSREC_MODEL_REPO`) and the config; plus
`ServerConfig`, the flags every server shares."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable

_FLAG = "crossrec.flag"
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class _Flag:
    help: str
    default: Any  # the flag's default (before `convert`); unused with `default_factory`
    default_factory: Callable[[], Any] | None
    old_name: str
    convert: Callable[[Any], Any] | None


def env_name(flag: str) -> str:
    """Env twin of a flag: --model-repo -> CROSSREC_MODEL_REPO."""
    return "CROSSREC_" + flag.lstrip("-").upper().replace("-", "_")


def flag_name(field_name: str) -> str:
    """The flag of a config field: model_repo -> --model-repo."""
    return "--" + field_name.replace("_", "-")


def none_if_zero(value: int) -> int | None:
    """A `convert` for flags where 0 means unset (`--model-version 0`: the highest)."""
    return value or None


def flag(default: Any = dataclasses.MISSING, help: str = "", *,
         default_factory: Callable[[], Any] | None = None, old_name: str = "",
         convert: Callable[[Any], Any] | None = None):
    """A config field that is also the flag `--<field-name>`, whose default comes from its env
    twin when set, else `default` (or `default_factory()`, called when the parser is built).
    The flag's type is the default's (bool: `--x` / `--no-x`). `convert` maps the flag's value
    to the field's (0 -> None, say); the field's own default is then `convert(default)`.
    `old_name`: a former name of the flag, still accepted (and its env twin, when the new one
    is unset)."""
    if not help:
        raise TypeError("a flag needs its help")
    if (default is dataclasses.MISSING) == (default_factory is None):
        raise TypeError("a flag needs a default or a default_factory, not both")
    spec = _Flag(help, default, default_factory, old_name, convert)
    if default_factory is not None:
        factory = default_factory if convert is None else lambda: convert(default_factory())
        return dataclasses.field(default_factory=factory, metadata={_FLAG: spec})
    return dataclasses.field(default=convert(default) if convert else default,
                             metadata={_FLAG: spec})


def _flags(cls: type) -> list[tuple[str, _Flag]]:
    return [(f.name, f.metadata[_FLAG]) for f in dataclasses.fields(cls) if _FLAG in f.metadata]


def add_flags(parser: argparse.ArgumentParser, cls: type, defaults: dict | None = None) -> None:
    """Add the flags of config class `cls` to `parser`, in declaration order; `defaults`
    overrides flag defaults by field name (a service's own port)."""
    defaults = defaults or {}
    for name, spec in _flags(cls):
        if name in defaults:
            default = defaults[name]
        else:
            default = spec.default_factory() if spec.default_factory else spec.default
        flag = flag_name(name)
        kind = default.__class__
        env = os.environ.get(env_name(flag))
        if env is None and spec.old_name:
            env = os.environ.get(env_name(spec.old_name))
        names = [flag, spec.old_name] if spec.old_name else [flag]
        if kind is bool:
            value = default if env is None else env.lower() in _TRUE
            parser.add_argument(*names, dest=name, default=value,
                                action=argparse.BooleanOptionalAction,
                                help=f"{spec.help} (env {env_name(flag)})")
        else:
            value = default if env is None else kind(env)
            parser.add_argument(*names, dest=name, default=value, type=kind,
                                help=f"{spec.help} [default: %(default)s] "
                                     f"(env {env_name(flag)})")


def from_args(cls: type, args: argparse.Namespace):
    """The config `cls` of parsed flags (each through its `convert`)."""
    return cls(**{name: spec.convert(getattr(args, name)) if spec.convert
                  else getattr(args, name) for name, spec in _flags(cls)})


def parse(argv: list[str] | None, *classes: type, description: str | None = None,
          defaults: dict | None = None) -> tuple:
    """One parser for the flags of every class in `classes` (their field names must differ),
    and one frozen config of each, in that order. `defaults` overrides flag defaults by field
    name. A ValueError from a config's `__post_init__` (a check across flags) is a usage
    error, as argparse's own: the message, exit code 2."""
    defaults = defaults or {}
    unknown = set(defaults) - {name for cls in classes for name, _ in _flags(cls)}
    if unknown:
        raise TypeError(f"defaults for no flag: {sorted(unknown)}")
    parser = argparse.ArgumentParser(description=description)
    for cls in classes:
        add_flags(parser, cls, defaults)
    args = parser.parse_args(argv)
    try:
        return tuple(from_args(cls, args) for cls in classes)
    except ValueError as err:
        parser.error(str(err))


@dataclass(frozen=True)
class ServerConfig:
    """The flags every server shares (services/common/serve.py and workers.py read them).
    `port` and `max_concurrent_rpcs` take a service's own defaults (`parse(defaults=...)`)."""

    host: str = flag("127.0.0.1", "address to bind; 0.0.0.0 in containers")
    port: int = flag(0, "port to bind; 0 picks a free one")
    port_file: str = flag("", "write the bound port to this file once serving")
    threads: int = flag(64, "gRPC handler threads (per process, where a service runs several: "
                        "the ranking service's --processes)", old_name="--workers")
    max_concurrent_rpcs: int = flag(
        512, "RPCs accepted at once (per process); more are refused with RESOURCE_EXHAUSTED by "
        "gRPC itself, before any handler, thread or deserialisation")
    grace_s: float = flag(10.0, "seconds in-flight RPCs get to finish on SIGTERM")
    log_level: str = flag("INFO", "DEBUG, INFO, WARNING, ERROR")
    metrics_port: int = flag(0, "Prometheus /metrics port; 0 = off (9090 in k8s)")
    metrics_host: str = flag("", "address the /metrics port binds (plaintext, no token); "
                             "empty: the same as --host")
    otlp_endpoint: str = flag("", "OpenTelemetry collector (OTLP/gRPC, e.g. "
                              "http://otel-collector:4317; http:// is plaintext) to export "
                              "traces to; empty: tracing off")
    trace_sample_ratio: float = flag(1.0, "share of new traces sampled, 0..1 (a caller's "
                                     "sampled flag is always honoured)")
    health_port: int = flag(0, "plaintext port serving only grpc.health.v1, without TLS or "
                            "token, for probes that cannot do TLS (kubelet); 0 = off (8081 in "
                            "k8s)")
    tls_cert: str = flag("", "server certificate (PEM); with --tls-key turns TLS on")
    tls_key: str = flag("", "server private key (PEM)")
    tls_client_ca: str = flag("", "CA (PEM) that client certificates must chain to: mutual TLS")
    auth_token_file: str = flag("", "file holding the bearer token callers must send (or env "
                                "CROSSREC_AUTH_TOKEN); empty: no token check. A missing or "
                                "empty file refuses to start")
    open_reflection: bool = flag(False, "with a token: serve reflection without it (health "
                                 "never needs it)")
    max_streams: int = flag(16, "open streams per streaming method (reflection, health Watch, "
                            "IngestStream) at most, on threads of their own; more: "
                            "RESOURCE_EXHAUSTED")
    stream_idle_timeout_s: float = flag(60.0, "a stream whose client sent nothing for this "
                                        "long (reflection, IngestStream) is cancelled; 0 = "
                                        "never")
    upstream_tls_ca: str = flag("", "CA (PEM) to verify the services this one calls; empty: "
                                "plaintext")
    upstream_tls_cert: str = flag("", "client certificate for upstream mutual TLS")
    upstream_tls_key: str = flag("", "client key for upstream mutual TLS")
