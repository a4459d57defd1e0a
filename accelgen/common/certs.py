"""``accelgen certs``: a private CA and one certificate per service role, for mutual TLS.

A deployment's services authenticate each other with certificates signed by one CA (the files
``accelgen.common.tls`` reads from ``--tls-dir``): ``ca.crt`` (every service trusts it),
``<role>.crt`` and ``<role>.key`` for role in scheduler, worker and gateway. A role's identity is
the DNS name ``<role>.accelgen`` in its certificate's subject alternative names: servers read it
from the peer's certificate to decide what a caller may do, and clients check it in the server's
certificate (``grpc.ssl_target_name_override``), so a worker's certificate cannot pass for a
scheduler. The names and addresses given with ``--host`` are added to every certificate (a client
that checks the host name it dialled, an HTTP client of a gateway with ``client_tls``). Each
certificate is usable as a server and as a client certificate (``serverAuth`` and ``clientAuth``).

``ca.key`` is written beside the certificates so more can be made later; it signs identities and
belongs only on the machine that makes certificates, never on a service host. Keys are written
with mode 0600. An existing CA is never overwritten unless ``force`` (every certificate it signed
would stop being trusted).

Every service of a role may share its role's certificate, but a worker id is bound to the
certificate that registered it (the scheduler refuses another certificate for a live worker's id),
so give each worker node its own: ``issue_certificate`` (``accelgen certs --out DIR --issue worker
--name node1``) signs one more with the CA in ``DIR`` and writes ``DIR/node1/`` as that node's
``--tls-dir`` (``ca.crt``, ``worker.crt``, ``worker.key``).

A real CA works the same way: give each service a certificate with the ``<role>.accelgen`` DNS
name, both extended key usages, and the CA's certificate as ``ca.crt``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROLES = ("scheduler", "worker", "gateway")
ROLE_DOMAIN = "accelgen"
CLOCK_SKEW = datetime.timedelta(minutes=5)  # a host whose clock runs a little behind still accepts a new cert


def role_name(role: str) -> str:
    """The DNS name that is a role's identity: ``worker.accelgen``."""
    return f"{role}.{ROLE_DOMAIN}"


class CertsError(ValueError):
    """Certificates could not be made as asked (an existing CA, a bad host name)."""


@dataclass(frozen=True)
class CertsRequest:
    """What ``make_certs`` writes: ``out/ca.{crt,key}`` and ``out/<role>.{crt,key}`` per role."""

    out: Path
    hosts: tuple[str, ...] = ()  # extra names / IP addresses in every certificate
    days: int = 365
    force: bool = False
    roles: tuple[str, ...] = field(default=ROLES)

    def __post_init__(self) -> None:
        if self.days < 1:
            raise CertsError(f"--days must be at least 1, got {self.days}")
        for host in self.hosts:
            if not host or any(c.isspace() for c in host):
                raise CertsError(f"--host {host!r} is not a host name or IP address")
            if host.lower().rstrip(".").endswith("." + ROLE_DOMAIN) or host.lower() == ROLE_DOMAIN:
                raise CertsError(f"--host {host!r}: names under .{ROLE_DOMAIN} are role identities "
                                 "and are added per certificate")
        unknown = sorted(set(self.roles) - set(ROLES))
        if unknown:
            raise CertsError(f"unknown role(s) {', '.join(unknown)}; roles are {', '.join(ROLES)}")


def _san_entries(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_private(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """The key, readable by its owner only, from the moment the file exists."""
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # whatever the umask did


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.chmod(path, 0o644)


def _make_ca(days: int, now: datetime.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "AccelGen"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "AccelGen deployment CA")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _make_leaf(role: str, hosts: Iterable[str], days: int, now: datetime.datetime,
               ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
               ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "AccelGen"),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                         x509.NameAttribute(NameOID.COMMON_NAME, role_name(role))])
    sans = [x509.DNSName(role_name(role)), *_san_entries(hosts)]
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def make_certs(request: CertsRequest) -> list[Path]:
    """Write a new CA and a certificate and key per role into ``request.out``; the paths written.
    ``CertsError`` if a CA is there already and ``force`` is not set (nothing is written then)."""
    out = request.out
    existing = [p for p in (out / "ca.crt", out / "ca.key") if p.exists()]
    if existing and not request.force:
        raise CertsError(f"{existing[0]} exists: a new CA would invalidate every certificate the old one signed; "
                         "use --force to replace it, or another --out directory")
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, ca_cert = _make_ca(request.days, now)
    written = [out / "ca.key", out / "ca.crt"]
    _write_private(written[0], ca_key)
    _write_cert(written[1], ca_cert)
    for role in request.roles:
        key, cert = _make_leaf(role, request.hosts, request.days, now, ca_key, ca_cert)
        _write_private(out / f"{role}.key", key)
        _write_cert(out / f"{role}.crt", cert)
        written += [out / f"{role}.key", out / f"{role}.crt"]
    return written


def issue_certificate(ca_dir: Path, role: str, name: str, hosts: Iterable[str] = (), days: int = 365) -> Path:
    """One more certificate for ``role`` signed by the CA in ``ca_dir`` (``ca.crt``, ``ca.key``),
    written with ``ca.crt`` into ``ca_dir/name/``: a ready ``--tls-dir`` for one host. The path."""
    if role not in ROLES:
        raise CertsError(f"--issue must be one of {', '.join(ROLES)}, got {role!r}")
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise CertsError(f"--name must be letters, digits, '-', '_' or '.', got {name!r}")
    CertsRequest(ca_dir, hosts=tuple(hosts), days=days)  # the same checks on hosts and days
    try:
        ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    except (OSError, ValueError) as exc:
        raise CertsError(f"{ca_dir}: no usable CA (ca.crt and ca.key, as `accelgen certs --out` writes): {exc}") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise CertsError(f"{ca_dir}/ca.key is not the EC key `accelgen certs` makes")
    out = ca_dir / name
    if out.exists():
        raise CertsError(f"{out} exists; choose another --name or remove it")
    out.mkdir(mode=0o700)
    key, cert = _make_leaf(role, hosts, days, datetime.datetime.now(datetime.timezone.utc), ca_key, ca_cert)
    _write_cert(out / "ca.crt", ca_cert)
    _write_private(out / f"{role}.key", key)
    _write_cert(out / f"{role}.crt", cert)
    return out
