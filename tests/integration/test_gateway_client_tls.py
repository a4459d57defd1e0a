"""The gateway's client-facing TLS with a certificate of its own (``client_cert``/``client_key``),
with real handshakes: clients are served that certificate — one of another issuer, without the
``gateway.accelgen`` name, not from the deployment's CA — on gRPC and HTTPS, while the gateway
still reaches its scheduler over mutual TLS with ``tls_dir``'s gateway.crt/gateway.key, which
are never shown to a client.

The scheduler is the in-process fake (tests/support/gateway_stack.py), served here with the
deployment's scheduler certificate and requiring a client certificate, as the real one does.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path
from typing import Any, Iterator

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from accelgen.common.certs import CertsRequest, make_certs
from accelgen.common.tls import Transport
from accelgen.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, scheduler_pb2_grpc
from gateway.config import GatewayConfig
from gateway.main import GatewayHandle, start_gateway
from tests.support.gateway_stack import FakeScheduler, LoopThread

pytestmark = pytest.mark.integration

KEY = "client-tls-key-" + "k" * 17


def self_signed(out: Path, name: str = "localhost") -> tuple[Path, Path]:
    """A certificate for ``name`` and 127.0.0.1 signed by itself: a stand-in for a public CA's."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / "public.crt", out / "public.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


class Stack:
    def __init__(self, root: Path) -> None:
        self.tls = root / "tls"
        make_certs(CertsRequest(self.tls, hosts=("127.0.0.1",)))
        self.cert, self.key = self_signed(root / "public")
        self.loop = LoopThread()
        self.fake = FakeScheduler()
        self.scheduler, port = self.loop.run(self._serve_scheduler())
        self.gateway: GatewayHandle = self.loop.run(start_gateway(GatewayConfig(
            scheduler_address=f"127.0.0.1:{port}", host="127.0.0.1", grpc_port=0, http_port=0,
            tls_dir=str(self.tls), client_tls=True, client_cert=str(self.cert), client_key=str(self.key),
            api_key=[KEY], health_check_interval_s=0.2, grace_s=0.2)))

    async def _serve_scheduler(self) -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(self.fake, server)
        port = server.add_secure_port("127.0.0.1:0", Transport.load("scheduler", self.tls).server_credentials())
        await server.start()
        return server, port

    def close(self) -> None:
        self.loop.run(self.gateway.stop())
        self.loop.run(self.scheduler.stop(0))
        self.loop.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("client-tls"))
    yield s
    s.close()


def _channel(stack: Stack, root: bytes, name: str) -> grpc.Channel:
    return grpc.secure_channel(f"127.0.0.1:{stack.gateway.grpc_port}", grpc.ssl_channel_credentials(root),
                               options=[("grpc.ssl_target_name_override", name)])


def _der(pem: bytes | str) -> bytes:
    return x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem).public_bytes(
        serialization.Encoding.DER)


def test_clients_are_served_client_cert_on_grpc_and_https(stack: Stack) -> None:
    public = stack.cert.read_bytes()
    with _channel(stack, public, "localhost") as ch:  # trusts only the separate certificate
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
        req = gateway_pb2.GenerateRequest(tokenized=common_pb2.TokenizedInput(input_ids=[7] * 4),
                                          sampling_params=common_pb2.SamplingParams(max_new_tokens=4))
        out = list(gateway_pb2_grpc.GatewayStub(ch).Generate(req, timeout=10,
                                                              metadata=(("authorization", f"Bearer {KEY}"),)))
    assert out[-1].HasField("complete")  # and the gateway reached the scheduler over mTLS with gateway.crt
    assert stack.fake.submits and stack.fake.submits[-1].tenant.startswith("key-")
    served = ssl.get_server_certificate(("127.0.0.1", stack.gateway.http_port))
    assert _der(served) == _der(public) != _der((stack.tls / "gateway.crt").read_bytes())
    context = ssl.create_default_context(cadata=public.decode())
    r = httpx.get(f"https://localhost:{stack.gateway.http_port}/livez", verify=context, timeout=10)
    assert r.status_code == 200


def test_the_deployment_ca_does_not_vouch_for_the_client_facing_servers(stack: Stack) -> None:
    """gateway.crt is not what clients get: a client trusting only ca.crt fails the handshake."""
    with _channel(stack, (stack.tls / "ca.crt").read_bytes(), "gateway.accelgen") as ch:
        with pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    context = ssl.create_default_context(cafile=str(stack.tls / "ca.crt"))
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"https://127.0.0.1:{stack.gateway.http_port}/livez", verify=context, timeout=5)


def test_a_client_cert_whose_key_does_not_match_is_refused_at_start(tmp_path: Path) -> None:
    cert, _ = self_signed(tmp_path / "one")
    _, other_key = self_signed(tmp_path / "two")
    config: dict[str, Any] = dict(client_tls=True, client_cert=str(cert), client_key=str(other_key))
    with pytest.raises(ValueError, match="is not the key of the certificate"):
        GatewayConfig(**config).client_identity
    with pytest.raises(ValueError, match="cannot read"):
        GatewayConfig(client_tls=True, client_cert=str(cert), client_key=str(tmp_path / "missing.key")).client_identity
