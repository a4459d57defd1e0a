"""The certificate the gateway shows its clients with ``client_tls``: a pair of its own.

``tls_dir``'s ``gateway.crt``/``gateway.key`` prove the gateway to the scheduler, which lets
that certificate submit, read and cancel every tenant's requests; the certificate must carry
``gateway.accelgen`` and chain to the deployment's ``ca.crt``, which no public client trusts.
Serving clients with it would put that key wherever client TLS is terminated, and rule out a
public CA's certificate for the names clients dial. So the client-facing servers (gRPC and
HTTPS) present ``client_cert``/``client_key`` when they are set: any certificate, checked only
that it loads and that the key is its key (no SAN, no CA: clients decide whom they trust).
Unset, they fall back to ``tls_dir``'s gateway pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization


@dataclass(frozen=True)
class ClientIdentity:
    """A certificate (chain) and its key, read once at start."""

    cert_path: Path
    key_path: Path
    cert: bytes = field(repr=False)
    key: bytes = field(repr=False)

    @classmethod
    def load(cls, cert_path: str | Path, key_path: str | Path) -> "ClientIdentity":
        """The pair in these files; ValueError saying what is wrong (unreadable, not PEM, an
        encrypted key, a key that is not the certificate's)."""
        cert_path, key_path = Path(cert_path), Path(key_path)
        raw: dict[str, bytes] = {}
        for what, path in (("client_cert", cert_path), ("client_key", key_path)):
            try:
                raw[what] = path.read_bytes()
            except OSError as exc:
                raise ValueError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
        try:
            leaf = x509.load_pem_x509_certificates(raw["client_cert"])[0]
        except ValueError as exc:
            raise ValueError(f"client_cert: {cert_path} is not a PEM certificate: {exc}") from None
        try:
            key = serialization.load_pem_private_key(raw["client_key"], password=None)
        except TypeError:
            raise ValueError(f"client_key: {key_path} is encrypted; give the key unencrypted (mode 0600)") from None
        except ValueError as exc:
            raise ValueError(f"client_key: {key_path} is not a PEM private key: {exc}") from None
        if _public(key.public_key()) != _public(leaf.public_key()):
            raise ValueError(f"client_key: {key_path} is not the key of the certificate in {cert_path}")
        return cls(cert_path, key_path, raw["client_cert"], raw["client_key"])

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """For the client-facing gRPC server: TLS, no client certificate asked (API keys say who calls)."""
        return grpc.ssl_server_credentials([(self.key, self.cert)], require_client_auth=False)

    def uvicorn_options(self) -> dict[str, str]:
        """For the HTTPS server."""
        return {"ssl_certfile": str(self.cert_path), "ssl_keyfile": str(self.key_path)}


def _public(key: object) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined]
                            serialization.PublicFormat.SubjectPublicKeyInfo)
