"""Who may call a Shardline service: the cluster token, optional mTLS, public API keys.

Internal services (tokenizer, stage workers) serve only peers of their deployment. Each
process reads its transport settings once (`configure`, from SecurityConfig's flags):

- a cluster token, from `--cluster-token-file` (a Kubernetes Secret mounted as a file) or
  `$SHARDLINE_CLUSTER_TOKEN` (how `shardline up` hands its generated one to its children;
  never a flag, so `ps` does not show it). Servers with a token refuse every call whose
  `authorization` metadata is not `Bearer <token>` with UNAUTHENTICATED, before any work;
  `channel()` presents it on every call it makes. Health checks are exempt: kubelet's gRPC
  probes carry no metadata, and health says nothing a stranger could use.
- optionally mutual TLS (`--tls-cert/--tls-key/--tls-ca`): servers require a client
  certificate signed by the CA, channels present theirs; `--tls-server-name` is the name the
  certificates carry, checked instead of the address (peers are dialled by pod IP).

The scheduler's public API is different: with `--api-keys-file` its gRPC and HTTP front doors
accept only the keys listed there (`ApiKeys`), each optionally bound to a tenant.
"""
from __future__ import annotations

import hmac
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import grpc

from shardline.common import telemetry
from shardline.common.config_args import add_config_args, config_from_args, option
from shardline.common.drain import refusing_handler

log = logging.getLogger(__name__)

TOKEN_ENV = "SHARDLINE_CLUSTER_TOKEN"
AUTHORIZATION = "authorization"          # gRPC metadata keys are lower case
_EXEMPT_PREFIX = "/grpc.health.v1.Health/"


@dataclass
class SecurityConfig:
    """The transport flags every service has (common to tokenizer, worker and scheduler)."""
    cluster_token_file: Optional[str] = option(
        None, env="SHARDLINE_CLUSTER_TOKEN_FILE", metavar="PATH",
        help="file holding the deployment's shared secret: internal services accept only calls "
             f"presenting it, channels present it (default: ${TOKEN_ENV}; unset: no "
             "authentication)")
    tls_cert: Optional[str] = option(None, metavar="PEM", help="mTLS: this service's certificate")
    tls_key: Optional[str] = option(None, metavar="PEM", help="mTLS: its private key")
    tls_ca: Optional[str] = option(None, metavar="PEM",
                                   help="mTLS: the CA that signs every peer's certificate")
    tls_server_name: Optional[str] = option(
        None, help="mTLS: the name in the peers' certificates, checked instead of the address")

    def __post_init__(self):
        tls = (self.tls_cert, self.tls_key, self.tls_ca)
        if any(tls) and not all(tls):
            raise ValueError("mTLS needs all of --tls-cert, --tls-key and --tls-ca")

    @classmethod
    def add_args(cls, p) -> None:
        add_config_args(cls, p)

    @classmethod
    def from_args(cls, ns) -> "SecurityConfig":
        return config_from_args(cls, ns)


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def load_token(cfg: SecurityConfig) -> Optional[str]:
    """The cluster token: the file's first line, else $SHARDLINE_CLUSTER_TOKEN, else None."""
    if cfg.cluster_token_file:
        token = _read(cfg.cluster_token_file).decode().strip()
        if not token:
            raise ValueError(f"cluster token file {cfg.cluster_token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


@dataclass(frozen=True)
class Transport:
    """This process's side of the cluster's transport security (configure())."""
    token: Optional[str] = None
    cert: Optional[bytes] = None
    key: Optional[bytes] = None
    ca: Optional[bytes] = None
    server_name: Optional[str] = None

    @property
    def tls(self) -> bool:
        return self.cert is not None

    def server_credentials(self) -> Optional[grpc.ServerCredentials]:
        if not self.tls:
            return None
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=True)

    def channel_credentials(self) -> Optional[grpc.ChannelCredentials]:
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)

    def channel_options(self) -> list[tuple[str, str]]:
        if self.tls and self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name)]
        return []

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((AUTHORIZATION, f"Bearer {self.token}"),) if self.token else ()


_transport = Transport()


def configure(cfg: SecurityConfig, service: str) -> Transport:
    """Read the token and certificates once at start-up; servers and channels of this process
    use them from then on."""
    global _transport
    t = Transport(token=load_token(cfg),
                  cert=_read(cfg.tls_cert) if cfg.tls_cert else None,
                  key=_read(cfg.tls_key) if cfg.tls_key else None,
                  ca=_read(cfg.tls_ca) if cfg.tls_ca else None,
                  server_name=cfg.tls_server_name)
    if t.token is None:
        log.warning("%s: no cluster token (--cluster-token-file or $%s): internal calls are not "
                    "authenticated", service, TOKEN_ENV)
    _transport = t
    return t


def transport() -> Transport:
    return _transport


def bearer(metadata) -> Optional[str]:
    """The token of an `authorization: Bearer <token>` entry of gRPC metadata, else None."""
    for key, value in metadata or ():
        if key == AUTHORIZATION:
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


def _matches(token: Optional[str], expected: str) -> bool:
    return token is not None and hmac.compare_digest(token.encode(), expected.encode())


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses, with UNAUTHENTICATED and before the handler runs, calls whose bearer token
    `accept(token)` rejects. Health checks pass."""

    def __init__(self, accept: Callable[[Optional[str]], bool], what: str):
        self._accept = accept
        self._what = what

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_EXEMPT_PREFIX):
            return handler
        token = bearer(handler_call_details.invocation_metadata)
        if self._accept(token):
            return handler
        reason = "missing" if token is None else "invalid"
        log.warning("refused %s: %s %s", method, reason, self._what)
        telemetry.rejected("unauthenticated")
        return refusing_handler(handler, grpc.StatusCode.UNAUTHENTICATED,
                         f"{reason} {self._what} (authorization: Bearer ...)")


def cluster_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """The internal services' server interceptors: the cluster-token check, if configured."""
    token = _transport.token
    if token is None:
        return []
    return [BearerAuthInterceptor(lambda t: _matches(t, token), "cluster token")]


class _PresentToken:
    """Adds the cluster token to every call of a channel (through one subclass per call kind,
    below: grpc.aio files an interceptor under the first kind it is an instance of only)."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]):
        self._metadata = metadata

    def _details(self, d):
        md = grpc.aio.Metadata(*tuple(d.metadata or ()), *self._metadata)
        return d._replace(metadata=md)

    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)

    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)

    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)

    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


_PRESENT_TOKEN_KINDS = [type(f"_PresentToken{kind.__name__}", (_PresentToken, kind), {})
                        for kind in (grpc.aio.UnaryUnaryClientInterceptor,
                                     grpc.aio.UnaryStreamClientInterceptor,
                                     grpc.aio.StreamUnaryClientInterceptor,
                                     grpc.aio.StreamStreamClientInterceptor)]


def aio_channel(address: str, options: list) -> grpc.aio.Channel:
    """A channel to another service of the deployment: mTLS when configured, the cluster
    token on every call."""
    t = _transport
    interceptors = [kind(t.metadata()) for kind in _PRESENT_TOKEN_KINDS] if t.token else None
    creds = t.channel_credentials()
    if creds is not None:
        return grpc.aio.secure_channel(address, creds, options=options + t.channel_options(),
                                       interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


class ApiKeys:
    """The public API's keys (`--api-keys-file`): one per line, `KEY [TENANT]`; '#' comments.
    A key bound to a tenant makes that the tenant of its requests, whatever they claim."""

    def __init__(self, keys: dict[str, Optional[str]]):
        if not keys:
            raise ValueError("API keys file lists no keys")
        self._keys = keys

    @classmethod
    def load(cls, path: str) -> "ApiKeys":
        keys: dict[str, Optional[str]] = {}
        for line in _read(path).decode().splitlines():
            parts = line.split("#", 1)[0].split()
            if not parts:
                continue
            if len(parts) > 2:
                raise ValueError(f"{path}: a line is `KEY [TENANT]`, got {len(parts)} fields")
            keys[parts[0]] = parts[1] if len(parts) == 2 else None
        return cls(keys)

    def check(self, token: Optional[str]) -> bool:
        if token is None:
            return False
        # compare with every key so the time taken says nothing about which prefix matched
        return any([hmac.compare_digest(token.encode(), k.encode()) for k in self._keys])

    def tenant(self, token: Optional[str]) -> Optional[str]:
        return self._keys.get(token) if token is not None else None

    def interceptor(self) -> BearerAuthInterceptor:
        return BearerAuthInterceptor(self.check, "API key")
