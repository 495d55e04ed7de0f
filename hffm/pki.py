"""A federation's certificate authority and its nodes' identities (X.509, the ``cryptography`` package).

A node's identity is the URI subject alternative name of its certificate,
``spiffe://hffm/<federation>/<role>/<id>`` (role: cloud | edge | device | operator), never a message
field. Its certificate also carries the node id as a DNS name, so a client that dials a node verifies
that the server *is* that node (the TLS target name is the node id, whatever its address), plus the
host names and IP addresses it is reached at.

Enrollment keeps private keys where they are made: a node makes its key and a signing request
(``make_csr``), the CA signs it (``sign_csr``) after checking the request's own signature and that it
names exactly one well-formed identity of this federation. ``issue`` does both in one step for local
runs. Certificates expire; a revocation list (a CRL signed by the CA) names revoked serials, and every
server refuses them.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hffm.ids import parse_node_id

ROLES = ("cloud", "edge", "device", "operator")
OPERATOR = "operator"  # the launcher's / a person's identity: may watch a run, is no node
SCHEME = "spiffe"


class PKIError(ValueError):
    """A certificate, request or identity is not acceptable; the message says why."""


@dataclass(frozen=True)
class Identity:
    federation: str
    role: str
    id: str

    @property
    def uri(self) -> str:
        return f"{SCHEME}://hffm/{self.federation}/{self.role}/{self.id}"

    @classmethod
    def parse(cls, uri: str) -> Identity:
        prefix = f"{SCHEME}://hffm/"
        if not uri.startswith(prefix):
            raise PKIError(f"{uri!r} is not an hffm identity ({prefix}<federation>/<role>/<id>)")
        parts = uri[len(prefix) :].split("/")
        if len(parts) != 3 or not all(parts):
            raise PKIError(f"{uri!r} is not {prefix}<federation>/<role>/<id>")
        ident = cls(*parts)
        ident.validate()
        return ident

    def validate(self) -> None:
        if self.role not in ROLES:
            raise PKIError(f"role {self.role!r} is not one of {ROLES}")
        if self.role == OPERATOR:
            if not self.id.replace("-", "").replace("_", "").isalnum():
                raise PKIError(f"operator name {self.id!r}: letters, digits, - and _ only")
            return
        try:
            role = parse_node_id(self.id).role
        except ValueError as err:
            raise PKIError(str(err)) from None
        if role != self.role:
            raise PKIError(f"{self.id} is a {role}, not a {self.role}")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_cert(pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as err:
        raise PKIError(f"not a PEM certificate: {err}") from None


def load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError("node keys are EC P-256")
    return key


def make_ca(federation: str, days: int = 365) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) of a new federation CA."""
    Identity(federation, OPERATOR, "ca").validate()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"hffm {federation} CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # keyCertSign, cRLSign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _pem_key(key), cert.public_bytes(serialization.Encoding.PEM)


def _sans(ident: Identity, hosts: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = [x509.UniformResourceIdentifier(ident.uri), x509.DNSName(ident.id)]
    for h in hosts:
        if not h or h == ident.id:
            continue
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            out.append(x509.DNSName(h))
    return out


def make_csr(federation: str, role: str, node_id: str, hosts: list[str] | None = None) -> tuple[bytes, bytes]:
    """(key PEM, CSR PEM): made where the node runs; only the CSR travels to the CA."""
    ident = Identity(federation, role, node_id)
    ident.validate()
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .add_extension(x509.SubjectAlternativeName(_sans(ident, hosts or [])), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _pem_key(key), csr.public_bytes(serialization.Encoding.PEM)


def identity_of(cert: x509.Certificate | x509.CertificateSigningRequest) -> Identity:
    """The one hffm identity a certificate (or request) names."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PKIError("no subject alternative name: no hffm identity") from None
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith(f"{SCHEME}://hffm/")]
    if len(uris) != 1:
        raise PKIError(f"expected exactly one hffm identity URI, found {len(uris)}")
    return Identity.parse(uris[0])


def sign_csr(
    ca_key_pem: bytes,
    ca_cert_pem: bytes,
    csr_pem: bytes,
    federation: str,
    days: int = 30,
    issued_at: dt.datetime | None = None,
) -> bytes:
    """The CA's certificate for a signing request (checked: its signature, one identity of this
    federation, a P-256 key). The request's SANs are kept; nothing else of it is trusted."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as err:
        raise PKIError(f"not a PEM signing request: {err}") from None
    if not csr.is_signature_valid:
        raise PKIError("the signing request's signature is not valid")
    ident = identity_of(csr)
    if ident.federation != federation:
        raise PKIError(f"the request is for federation {ident.federation!r}, this CA signs {federation!r}")
    pub = csr.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.curve.name != "secp256r1":
        raise PKIError("node keys are EC P-256")
    ca_key, ca_cert = load_key(ca_key_pem), load_cert(ca_cert_pem)
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    start = issued_at or _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ident.id)]))
        .issuer_name(ca_cert.subject)
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - dt.timedelta(minutes=5))
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def issue(
    ca_key_pem: bytes,
    ca_cert_pem: bytes,
    federation: str,
    role: str,
    node_id: str,
    hosts: list[str] | None = None,
    days: int = 30,
    issued_at: dt.datetime | None = None,
) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM) in one step (local runs: the key never leaves this machine)."""
    key, csr = make_csr(federation, role, node_id, hosts)
    return key, sign_csr(ca_key_pem, ca_cert_pem, csr, federation, days, issued_at)


def sign_bytes(key_pem: bytes, data: bytes) -> bytes:
    """ECDSA P-256 / SHA-256 signature of ``data`` with a node's key."""
    return load_key(key_pem).sign(data, ec.ECDSA(hashes.SHA256()))


def verify_issued(cert: x509.Certificate, ca_cert_pem: bytes, when: dt.datetime | None = None) -> None:
    """``cert`` was signed by this CA and is valid now; ``PKIError`` otherwise."""
    ca = load_cert(ca_cert_pem)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as err:
        raise PKIError(f"certificate of {cert.subject.rfc4514_string()} is not issued by this CA: {err}") from None
    now = when or _now()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise PKIError(f"certificate of {cert.subject.rfc4514_string()} is not valid now")


def verify_signature(cert: x509.Certificate, signature: bytes, data: bytes) -> None:
    pub = cert.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey):
        raise PKIError("node keys are EC P-256")
    try:
        pub.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise PKIError("signature does not match") from None


def make_crl(ca_key_pem: bytes, ca_cert_pem: bytes, serials: list[int], days: int = 30) -> bytes:
    """A CRL (PEM) signed by the CA naming ``serials`` as revoked."""
    ca_key, ca_cert = load_key(ca_key_pem), load_cert(ca_cert_pem)
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(_now() - dt.timedelta(minutes=5))
        .next_update(_now() + dt.timedelta(days=days))
    )
    for s in sorted(set(serials)):
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(s).revocation_date(_now()).build())
    return b.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def revoked_serials(crl_pem: bytes, ca_cert_pem: bytes) -> frozenset[int]:
    """The serials a CRL revokes, after checking the CA signed it."""
    crl = x509.load_pem_x509_crl(crl_pem)
    if not crl.is_signature_valid(load_cert(ca_cert_pem).public_key()):
        raise PKIError("the revocation list is not signed by this federation's CA")
    return frozenset(r.serial_number for r in crl)


@dataclass(frozen=True)
class NodeCredentials:
    """What a process needs for mTLS: the CA, its key and certificate, the revocation list."""

    ca_pem: bytes
    key_pem: bytes
    cert_pem: bytes
    crl_pem: bytes | None = None

    @classmethod
    def from_files(
        cls, ca: str | Path, key: str | Path, cert: str | Path, crl: str | Path | None = None
    ) -> NodeCredentials:
        crl_pem = Path(crl).read_bytes() if crl and Path(crl).is_file() else None
        return cls(Path(ca).read_bytes(), Path(key).read_bytes(), Path(cert).read_bytes(), crl_pem)

    @property
    def identity(self) -> Identity:
        return identity_of(load_cert(self.cert_pem))


SCRAPER = "prometheus"  # the operator identity Prometheus scrapes /metrics with


def provision(
    directory: Path,
    federation: str,
    members: dict[str, str],
    hosts: Callable[[str], list[str]],
    days: int = 30,
) -> Path:
    """A new CA under ``directory`` (absolute, returned) with a key and certificate for every member
    (id -> role), the operator and the scraper, and an empty revocation list: what a run, a compose
    testbed or a cluster starts from. ``hosts(name)``: the names and addresses it is reached at."""
    directory = directory.resolve()
    ca_key, ca_cert = make_ca(federation, days)
    write_node_files(directory, "ca", ca_key, ca_cert)
    for name, role in [*members.items(), (OPERATOR, OPERATOR), (SCRAPER, OPERATOR)]:
        write_node_files(directory, name, *issue(ca_key, ca_cert, federation, role, name, hosts(name), days))
    (directory / "crl.pem").write_bytes(make_crl(ca_key, ca_cert, []))
    return directory


def issue_in(
    directory: Path, federation: str, role: str, node_id: str, hosts: list[str], days: int
) -> tuple[Path, Path]:
    """Issue ``node_id`` a key and certificate from the CA in ``directory`` (``ca.key``, ``ca.crt``) and
    write them beside it: (key path, certificate path)."""
    key, cert = issue(
        (directory / "ca.key").read_bytes(), (directory / "ca.crt").read_bytes(), federation, role, node_id, hosts, days
    )
    return write_node_files(directory, node_id, key, cert)


def write_node_files(directory: Path, name: str, key_pem: bytes, cert_pem: bytes) -> tuple[Path, Path]:
    """``<dir>/<name>.key`` (mode 0600) and ``<dir>/<name>.crt``."""
    directory.mkdir(parents=True, exist_ok=True)
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.crt"
    key_path.touch(mode=0o600, exist_ok=True)
    key_path.chmod(0o600)
    key_path.write_bytes(key_pem)
    cert_path.write_bytes(cert_pem)
    return key_path, cert_path
