"""Which certificate a worker's call came with: the identity a worker id is bound to.

With mutual TLS every worker presents a certificate from the deployment's CA, and ``RoleGuard``
lets any certificate for the worker role call RegisterWorker, Heartbeat and DeregisterWorker.
The role alone would let one worker certificate act for every worker id: take another worker's
lane (and the requests on it), keep a dead one alive, or deregister a live one. So the registry
binds a worker id to the certificate that registered it (``WorkerRegistry``), and this module
names that certificate: the SHA-256 fingerprint of the peer's leaf certificate, which gRPC puts
in the call's auth context as ``x509_pem_cert``. Plaintext callers have no certificate: their
identity is ``""``, which binds nothing (on loopback or with ``--insecure`` every caller is
trusted alike).
"""

from __future__ import annotations

import hashlib
import ssl

import grpc

from scheduler_service.errors import ServiceError

PEM_CERT_KEY = "x509_pem_cert"


def certificate_identity(context: grpc.aio.ServicerContext, tls: bool) -> str:
    """The SHA-256 fingerprint (hex, of the DER) of the caller's certificate; ``""`` without TLS.
    With ``tls`` a call whose auth context has no certificate is refused (PERMISSION_DENIED)
    rather than treated as unbound: a gRPC that stopped exposing it must fail closed."""
    pems = context.auth_context().get(PEM_CERT_KEY) or []
    if not pems:
        if tls:
            raise ServiceError(grpc.StatusCode.PERMISSION_DENIED,
                               "the caller presented no client certificate the scheduler can read")
        return ""
    der = ssl.PEM_cert_to_DER_cert(pems[0].decode("ascii", "replace"))
    return hashlib.sha256(der).hexdigest()
