"""One credentials factory for every gRPC server and channel of a node, and who is calling.

With ``security.tls`` (the default) every server requires a client certificate signed by the
federation's CA, and every channel presents its node's certificate and verifies that the server is
the node it meant to reach: the TLS target name is the peer's node id, which its certificate carries
as a DNS name (``hffm.pki``). ``Security.peer(context)`` is the caller's node id from its verified
certificate's identity URI, after the federation and the revocation list are checked.

With ``security.tls: false`` everything is plaintext and a caller's identity is the node id its client
puts in the call metadata (``identity.py``): on trust, and every process says so in its log.
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
import threading
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from cryptography import x509

from hffm.config import SecurityConfig
from hffm.ids import role_of
from hffm.pki import (
    Identity,
    NodeCredentials,
    PKIError,
    identity_of,
    load_cert,
    revoked_serials,
    sign_bytes,
    verify_issued,
    verify_signature,
)
from services.common.identity import identity_metadata, peer_identity

if TYPE_CHECKING:  # hffm.wire imports torch (modules): not for a health check's start-up
    from hffm.wire import PushHeader

log = logging.getLogger("hffm.security")


def credential_paths(directory: str | Path, name: str) -> dict[str, Path]:
    """``<dir>/{ca.crt, crl.pem, <name>.key, <name>.crt}``; a directory that holds one node's credentials
    alone (a Kubernetes pod's mount, docs/security.md) may name them ``node.key`` and ``node.crt``."""
    d = Path(directory)
    key, cert = d / f"{name}.key", d / f"{name}.crt"
    if not key.is_file() and (d / "node.key").is_file():
        key, cert = d / "node.key", d / "node.crt"
    return {"ca": d / "ca.crt", "key": key, "cert": cert, "crl": d / "crl.pem"}


class Unauthenticated(Exception):
    """The caller presented no acceptable identity."""


class Security:
    """The security of one identity (a node, or the operator) in one process."""

    def __init__(self, cfg: SecurityConfig, name: str) -> None:
        self.cfg = cfg
        self.name = name
        self.enabled = cfg.tls
        self.creds: NodeCredentials | None = None
        self._revoked: frozenset[int] = frozenset()
        self._peers: dict[bytes, tuple[int, Identity]] = {}
        self._senders: dict[bytes, tuple[x509.Certificate, Identity]] = {}
        self._lock = threading.Lock()
        if not self.enabled:
            log.warning("%s: security.tls is false: links are plaintext and identities are taken on trust", name)
            return
        if not cfg.dir:
            raise PKIError("security.tls is on but security.dir is not set (where are the certificates?)")
        paths = credential_paths(cfg.dir, name)
        missing = [str(p) for k, p in paths.items() if k != "crl" and not p.is_file()]
        if missing:
            raise PKIError(f"{name}: missing credentials {missing}")
        self.creds = NodeCredentials.from_files(paths["ca"], paths["key"], paths["cert"], paths["crl"])
        self._paths = paths
        ident = self.creds.identity
        if ident.id != name or ident.federation != cfg.federation:
            raise PKIError(f"{paths['cert']} is {ident.uri}, not {name} of federation {cfg.federation!r}")
        if self.creds.crl_pem:
            self._revoked = revoked_serials(self.creds.crl_pem, self.creds.ca_pem)

    # ---- servers and channels -------------------------------------------------------------------
    def add_port(self, server: grpc.Server, listen: str) -> int:
        if not self.enabled:
            return server.add_insecure_port(listen)
        assert self.creds is not None
        creds = grpc.ssl_server_credentials(
            [(self.creds.key_pem, self.creds.cert_pem)], root_certificates=self.creds.ca_pem, require_client_auth=True
        )
        return server.add_secure_port(listen, creds)

    def channel(self, address: str, target: str, options: list | None = None) -> grpc.Channel:
        """A channel to the node ``target`` at ``address``; with TLS the server must prove it is ``target``."""
        opts = list(options or [])
        if not self.enabled:
            return grpc.insecure_channel(address, options=opts)
        assert self.creds is not None
        creds = grpc.ssl_channel_credentials(self.creds.ca_pem, self.creds.key_pem, self.creds.cert_pem)
        return grpc.secure_channel(address, creds, options=[*opts, ("grpc.ssl_target_name_override", target)])

    def bulk_server_context(self) -> ssl.SSLContext | None:
        """TLS of a bulk listener (services.common.bulk): this node's certificate, clients must present one
        of this federation's CA (what they are is ``peer``'s question, as for a gRPC call). None without TLS."""
        ctx = self._bulk_context(ssl.PROTOCOL_TLS_SERVER)
        if ctx is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def bulk_client_context(self) -> ssl.SSLContext | None:
        """TLS of this node's bulk pushes: its certificate, and the receiver must prove it is the node it
        is dialled as (``server_hostname``: node ids are DNS names of their certificates, as gRPC's
        ``ssl_target_name_override`` checks). None without TLS."""
        return self._bulk_context(ssl.PROTOCOL_TLS_CLIENT)

    def _bulk_context(self, protocol: int) -> ssl.SSLContext | None:
        """TLS 1.2 or later, this federation's CA trusted, this node's certificate and key."""
        if not self.enabled:
            return None
        assert self.creds is not None
        ctx = ssl.SSLContext(protocol)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cadata=self.creds.ca_pem.decode())
        ctx.load_cert_chain(self._paths["cert"], self._paths["key"])
        return ctx

    def call_metadata(self) -> tuple[tuple[str, str], ...] | None:
        """Metadata every call of this identity carries (plaintext: the identity on trust)."""
        return None if self.enabled else identity_metadata(self.name)

    # ---- pushes signed end to end (across D2D relays) ---------------------------------------------
    def sign_header(self, h: PushHeader) -> PushHeader:
        """``h`` signed by this node (unchanged without TLS: there are no keys)."""
        if not self.enabled:
            return h
        assert self.creds is not None
        return replace(h, signature=sign_bytes(self.creds.key_pem, h.signed_bytes()), sender_cert=self.creds.cert_pem)

    def verify_header(self, h: PushHeader) -> None:
        """``PKIError`` unless ``h`` is signed by its sender with a valid, unrevoked certificate of this
        federation's CA (a relay that changed anything but the route is caught here)."""
        if not self.enabled:
            return
        assert self.creds is not None
        if not h.signature or not h.sender_cert:
            raise PKIError(f"push {h.push_id} is not signed")
        with self._lock:
            hit = self._senders.get(h.sender_cert)
        if hit is None:
            cert = load_cert(h.sender_cert)
            verify_issued(cert, self.creds.ca_pem)
            hit = (cert, identity_of(cert))
            with self._lock:
                self._senders[h.sender_cert] = hit
        cert, ident = hit
        now = dt.datetime.now(dt.UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise PKIError(f"the certificate of {ident.id} has expired")
        if ident.federation != self.cfg.federation or ident.id != h.sender:
            raise PKIError(f"push {h.push_id} names sender {h.sender} but carries the certificate of {ident.uri}")
        if cert.serial_number in self._revoked:
            raise PKIError(f"the certificate of {ident.id} is revoked")
        verify_signature(cert, h.signature, h.signed_bytes())

    # ---- who is calling ------------------------------------------------------------------------
    def peer(self, context: grpc.ServicerContext) -> Identity | None:
        """The caller's identity: from its verified certificate (TLS), or from its metadata on trust
        (plaintext); None when it presented none. ``Unauthenticated`` when its certificate is revoked
        or names no identity of this federation."""
        if not self.enabled:
            name = peer_identity(context)
            if name is None:
                return None
            role = role_of(name)
            return Identity(self.cfg.federation, "operator" if role == "unknown" else role, name)
        pems = (context.auth_context() or {}).get("x509_pem_cert") or []
        if not pems:
            return None
        pem = pems[0]
        with self._lock:
            hit = self._peers.get(pem)
        if hit is None:
            try:
                cert = load_cert(pem)
                hit = (cert.serial_number, identity_of(cert))
            except PKIError as err:
                raise Unauthenticated(f"client certificate: {err}") from None
            with self._lock:
                self._peers[pem] = hit
        serial, ident = hit
        if serial in self._revoked:
            raise Unauthenticated(f"certificate {serial:x} of {ident.id} is revoked")
        if ident.federation != self.cfg.federation:
            raise Unauthenticated(f"{ident.uri} is not of federation {self.cfg.federation!r}")
        return ident
