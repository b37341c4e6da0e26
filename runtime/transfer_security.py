"""Transport security of the state transfer: TLS/mTLS from PEM files, bearer tokens, and the
check that refuses a cross-datacenter link in plaintext unless the config says `insecure: true`.
"""

from __future__ import annotations

import dataclasses
import hmac
from pathlib import Path
from typing import Mapping, Sequence

import grpc

from jaxprfaas.errors import ConfigError

# ---- security --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """PEM files of one end. Server: cert+key, and ca => clients must present a cert it signed
    (mTLS). Client: ca to verify the server (None = system roots), cert+key for mTLS."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    server_name: str | None = None  # client: name expected in the server cert (dialing by IP)

    def _read(self, name: str) -> bytes | None:
        path = getattr(self, name)
        if path is None:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise ConfigError(f"TLS {name} file {path}: {e.strerror}") from None

    def server_credentials(self) -> grpc.ServerCredentials:
        if not (self.cert and self.key):
            raise ConfigError("TLS server needs cert and key PEM files")
        ca = self._read("ca")
        return grpc.ssl_server_credentials([(self._read("key"), self._read("cert"))],
                                           root_certificates=ca, require_client_auth=ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self._read("ca"),
                                            private_key=self._read("key"),
                                            certificate_chain=self._read("cert"))


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Refuses any call without `authorization: Bearer <one of tokens>` (compared in constant time)."""

    def __init__(self, tokens: Sequence[str]):
        if not tokens or not all(tokens):
            raise ConfigError("bearer-token auth needs at least one non-empty token")
        self._tokens = [t.encode() for t in tokens]

    def intercept_service(self, continuation, details):
        auth = dict(details.invocation_metadata or ()).get("authorization", "")
        given = auth[7:].encode() if auth.startswith("Bearer ") else b""
        if given and any(hmac.compare_digest(given, t) for t in self._tokens):
            return continuation(details)
        msg = "missing bearer token" if not given else "invalid bearer token"

        def deny(_request_or_iterator, ctx):
            ctx.abort(grpc.StatusCode.UNAUTHENTICATED, f"state transfer refused: {msg}")

        if details.method.endswith("/Push"):
            return grpc.stream_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


@dataclasses.dataclass(frozen=True)
class TransportSecurity:
    """A deployment's `transfer:` security block."""

    tls: TlsFiles | None = None
    tokens: tuple[str, ...] = ()  # receiver: accepted tokens; sender: tokens[0] is sent
    insecure: bool = False        # explicitly allow plaintext across datacenters

    @staticmethod
    def from_dict(d: Mapping | None, where: str = "transfer") -> "TransportSecurity":
        d = dict(d or {})
        unknown = set(d) - {"tls", "token", "token_file", "insecure"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        tls = d.get("tls")
        if tls is not None:
            bad = set(tls) - {"cert", "key", "ca", "server_name"}
            if bad:
                raise ConfigError(f"{where}.tls: unknown keys {sorted(bad)}")
            tls = TlsFiles(**tls)
        tokens = [d["token"]] if d.get("token") else []
        if d.get("token_file"):
            try:
                tokens += [t.strip() for t in Path(d["token_file"]).read_text().splitlines() if t.strip()]
            except OSError as e:
                raise ConfigError(f"{where}.token_file {d['token_file']}: {e.strerror}") from None
        insecure = d.get("insecure", False)
        if not isinstance(insecure, bool):
            raise ConfigError(f"{where}.insecure must be true or false, got {insecure!r}")
        return TransportSecurity(tls, tuple(tokens), insecure)


def check_transport_security(sec: TransportSecurity, *, cross_datacenter: bool, link: str = "transfer") -> None:
    """Refuse to start a cross-datacenter link in plaintext unless `insecure: true` says so."""
    if not cross_datacenter or sec.insecure:
        return
    if sec.tls is None:
        raise ConfigError(f"{link}: cross-datacenter state transfer needs TLS (tls: {{cert, key, ca}} "
                          "PEM files); refusing to start in plaintext. Set insecure: true to allow it")
    for name in ("cert", "key", "ca"):
        path = getattr(sec.tls, name)
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{link}: TLS {name} file {path} does not exist")
