"""How one service talks to the others: mutual TLS from a ``--tls-dir``, or plaintext on loopback.

Every gRPC connection between gateway, scheduler and workers is opened by ``Transport`` (one
function for every channel: ``open_channel``), so no channel can forget the certificates. With
``tls_dir`` a process presents ``<role>.crt`` as its client certificate, trusts only ``ca.crt``,
and checks that the server it reached is the role it meant to reach: the channel verifies the
server's certificate against the DNS name ``<role>.accelgen`` (``grpc.ssl_target_name_override``),
whatever address it dialled. Servers require a client certificate from the same CA and then
authorise the caller by its role (``accelgen.common.authz``).

Plaintext is a choice, not a default: without ``tls_dir`` a service starts only when every
address it binds and dials is loopback (a single-host stack), or when ``insecure`` is set.
``check_transport`` applies that rule and reports a mistake as a ``ValueError`` the config
loader turns into a config error (exit 2).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from accelgen.common.certs import ROLES, role_name
from accelgen.common.config import ConfigError, ConfigLoader

TARGET_NAME_OPTION = "grpc.ssl_target_name_override"
HOW_TO_FIX = "set --tls-dir DIR (make one with `accelgen certs`) or --insecure"


def is_loopback(host: str) -> bool:
    """``127.0.0.0/8``, ``::1`` and ``localhost``; a wildcard (0.0.0.0) or any other name is not."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":  # not "*.localhost": a resolver may send those anywhere
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def address_hosts(addresses: str) -> list[str]:
    """The hosts in an address or a comma-separated list of them (``HOST:PORT``, ``[v6]:PORT``,
    ``dns:///HOST:PORT``, ``ipv4:A:P,B:P``)."""
    hosts = []
    for part in addresses.split(","):
        part = part.strip()
        for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
            if part.startswith(scheme):
                part = part[len(scheme):]
                break
        if part.startswith("unix:"):
            hosts.append("localhost")  # a local socket
            continue
        host, sep, _ = part.rpartition(":")
        if part:
            hosts.append((host if sep else part).strip("[]"))
    return hosts


def tls_files(tls_dir: str | Path, role: str) -> tuple[Path, Path, Path]:
    """``ca.crt``, ``<role>.crt``, ``<role>.key`` in ``tls_dir``."""
    d = Path(tls_dir)
    return d / "ca.crt", d / f"{role}.crt", d / f"{role}.key"


def tls_dir_problem(tls_dir: str | Path, role: str) -> str | None:
    """What is wrong with ``tls_dir`` for ``role``, in one line; None if it will do."""
    ca_path, cert_path, key_path = tls_files(tls_dir, role)
    for path in (ca_path, cert_path, key_path):
        try:
            path.read_bytes()
        except OSError as exc:
            return f"tls_dir {tls_dir}: cannot read {path.name}: {exc.strerror or exc} (make the files with `accelgen certs`)"
    try:
        cas = x509.load_pem_x509_certificates(ca_path.read_bytes())
        chain = x509.load_pem_x509_certificates(cert_path.read_bytes())
    except ValueError as exc:
        return f"tls_dir {tls_dir}: not a PEM certificate: {exc}"
    cert = chain[0]
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if role_name(role) not in names:
        return (f"tls_dir {tls_dir}: {cert_path.name} does not carry the DNS name {role_name(role)} "
                f"(its identity as the {role}); it has {', '.join(names) or 'no DNS names'}")
    others = [n for n in names if n != role_name(role) and n in {role_name(r) for r in ROLES}]
    if others:  # one certificate, one role: RoleGuard would grant it every role it names
        return (f"tls_dir {tls_dir}: {cert_path.name} carries the identities of several roles "
                f"({', '.join([role_name(role), *others])}); issue one certificate per role")
    if not _chains_to(cert, chain[1:], cas):
        return (f"tls_dir {tls_dir}: {cert_path.name} is not signed by a CA in ca.crt (directly or through the "
                f"intermediates that follow it in {cert_path.name})")
    return None


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):  # another CA, another key type
        return False
    return True


def _chains_to(cert: x509.Certificate, intermediates: list[x509.Certificate], cas: list[x509.Certificate]) -> bool:
    """Whether ``cert`` is issued by one of ``cas``, directly or through ``intermediates``. ca.crt
    may hold several CAs: while certificates are rotated to a new CA, both are trusted."""
    for _ in range(len(intermediates) + 1):
        if any(_issued_by(cert, ca) for ca in cas):
            return True
        cert = next((i for i in intermediates if _issued_by(cert, i)), None)
        if cert is None:
            return False
    return False


def check_transport(service: str, tls_dir: str | None, insecure: bool, binds: Iterable[tuple[str, str]],
                    dials: Iterable[tuple[str, str]]) -> None:
    """The start-up rule (module doc). ``binds``/``dials``: (setting name, address or host).
    ``ValueError`` naming the setting and what to do. The files in ``tls_dir`` are checked when
    they are read (``Transport.load``, at start), so a config naming a deployment's path can be
    checked anywhere."""
    if tls_dir and insecure:
        raise ValueError("tls_dir and insecure exclude each other: give --tls-dir for mutual TLS or --insecure "
                         "for plaintext, not both")
    if tls_dir or insecure:
        return
    for verb, pairs in (("binds", binds), ("dials", dials)):
        for setting, address in pairs:
            for host in address_hosts(address) if verb == "dials" else [address]:
                if not is_loopback(host):
                    raise ValueError(f"the {service} {verb} {host or '(all interfaces)'} ({setting}), which is not "
                                     f"loopback, and would speak plaintext gRPC there: {HOW_TO_FIX}")


@dataclass(frozen=True)
class Transport:
    """This process's role and, with TLS, its certificate, key and CA (read once, at start)."""

    role: str
    tls_dir: Path | None = None
    ca: bytes = field(default=b"", repr=False)
    cert: bytes = field(default=b"", repr=False)
    key: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")

    @classmethod
    def load(cls, role: str, tls_dir: str | Path | None) -> "Transport":
        """Mutual TLS with the files in ``tls_dir``; plaintext if it is None. ValueError saying
        what is wrong with the files (missing, unreadable, another role's, another CA's)."""
        if tls_dir is None or str(tls_dir) == "":
            return cls(role)
        problem = tls_dir_problem(tls_dir, role)
        if problem:
            raise ValueError(problem)
        ca, cert, key = (p.read_bytes() for p in tls_files(tls_dir, role))
        return cls(role, Path(tls_dir), ca, cert, key)

    @property
    def secure(self) -> bool:
        return self.tls_dir is not None

    @property
    def cert_path(self) -> Path | None:
        return None if self.tls_dir is None else tls_files(self.tls_dir, self.role)[1]

    @property
    def key_path(self) -> Path | None:
        return None if self.tls_dir is None else tls_files(self.tls_dir, self.role)[2]

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Our certificate as the client's; only ``ca.crt`` trusted."""
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)

    def channel_options(self, peer_role: str) -> list[tuple[str, Any]]:
        """The server must prove it is ``peer_role``, whatever name or address was dialled."""
        return [(TARGET_NAME_OPTION, role_name(peer_role))] if self.secure else []

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """For a service's gRPC server: a client certificate from our CA is required. None: plaintext."""
        if not self.secure:
            return None
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=True)


def read_certificates(loader: ConfigLoader[Any], config: Any) -> None:
    """For a service's ``main()``: read ``config.transport``'s files now; a missing or wrong one is
    a config error (one line, exit 2) before anything starts."""
    try:
        config.transport
    except ValueError as exc:
        loader.exit(ConfigError(str(exc)))


def open_channel(target: str, options: Sequence[tuple[str, Any]], transport: Transport | None,
                 peer_role: str) -> grpc.aio.Channel:
    """The one way an AccelGen service opens a channel to another (``peer_role``): secure with the
    transport's certificates, plaintext when it has none."""
    if transport is None or not transport.secure:
        return grpc.aio.insecure_channel(target, options=list(options))
    return grpc.aio.secure_channel(target, transport.channel_credentials(),
                                   options=[*options, *transport.channel_options(peer_role)])


def open_sync_channel(target: str, transport: Transport | None, peer_role: str,
                      options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """``open_channel`` for blocking callers (``accelgen up``'s health probes, tests)."""
    if transport is None or not transport.secure:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, transport.channel_credentials(),
                               options=[*options, *transport.channel_options(peer_role)])
