"""``accelgen certs``: a CA and one certificate per role, each with its role's identity, usable as
server and client, signed by the CA, keys readable by their owner only; an existing CA is kept."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from accelgen.common.certs import ROLES, CertsError, CertsRequest, make_certs
from accelgen.common.tls import Transport, check_transport, is_loopback, tls_dir_problem
from launcher.cli import main as cli


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_certs_have_role_identities_usages_and_private_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tls"
    assert cli(["certs", "--out", str(out), "--host", "10.0.0.7", "--host", "sched.example", "--days", "30"]) == 0
    assert "wrote 8 files" in capsys.readouterr().out
    ca = _cert(out / "ca.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for role in ROLES:
        cert = _cert(out / f"{role}.crt")
        cert.verify_directly_issued_by(ca)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.DNSName) == [f"{role}.accelgen", "sched.example"]
        assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert 29 <= (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 30
        assert tls_dir_problem(out, role) is None
        assert Transport.load(role, out).secure
    for key in ["ca.key", *(f"{role}.key" for role in ROLES)]:
        assert stat.S_IMODE((out / key).stat().st_mode) == 0o600, key


def test_an_existing_ca_is_not_overwritten_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_certs(CertsRequest(tmp_path))
    before = (tmp_path / "ca.crt").read_bytes()
    assert cli(["certs", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "ca.crt exists" in err and "--force" in err
    assert (tmp_path / "ca.crt").read_bytes() == before
    with pytest.raises(CertsError, match="ca.crt exists"):
        make_certs(CertsRequest(tmp_path))
    make_certs(CertsRequest(tmp_path, force=True))
    assert (tmp_path / "ca.crt").read_bytes() != before
    assert stat.S_IMODE((tmp_path / "worker.key").stat().st_mode) == 0o600


def test_bad_requests_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CertsError, match="role identities"):
        CertsRequest(tmp_path, hosts=("worker.accelgen",))  # would make every cert a worker's
    with pytest.raises(CertsError, match="--days"):
        CertsRequest(tmp_path, days=0)


def test_a_directory_of_another_ca_or_role_is_named(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    make_certs(CertsRequest(a))
    make_certs(CertsRequest(b))
    assert "cannot read ca.crt" in (tls_dir_problem(tmp_path, "worker") or "")
    (b / "worker.crt").write_bytes((a / "worker.crt").read_bytes())
    assert "not signed by a CA in ca.crt" in (tls_dir_problem(b, "worker") or "")
    (b / "gateway.crt").write_bytes((b / "scheduler.crt").read_bytes())
    assert "does not carry the DNS name gateway.accelgen" in (tls_dir_problem(b, "gateway") or "")
    with pytest.raises(ValueError, match="not signed by a CA in ca.crt"):
        Transport.load("worker", b)


def test_plaintext_only_on_loopback() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["evil.localhost", "localhost.example.com", "0.0.0.0", "::", ""]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "", "10.0.0.1", "sched.internal"]))
    check_transport("worker", None, False, binds=[("host", "127.0.0.1")], dials=[("scheduler", "127.0.0.1:1,[::1]:2")])
    with pytest.raises(ValueError, match=r"the worker dials 10\.0\.0\.2 \(scheduler\).*--tls-dir DIR.*--insecure"):
        check_transport("worker", None, False, binds=[("host", "127.0.0.1")], dials=[("scheduler", "127.0.0.1:1,10.0.0.2:1")])
    with pytest.raises(ValueError, match=r"the scheduler binds 0\.0\.0\.0 \(host\)"):
        check_transport("scheduler", None, False, binds=[("host", "0.0.0.0")], dials=[])
    check_transport("scheduler", None, True, binds=[("host", "0.0.0.0")], dials=[])
    check_transport("scheduler", "/etc/accelgen/tls", False, binds=[("host", "0.0.0.0")], dials=[])
    with pytest.raises(ValueError, match="exclude each other"):
        check_transport("scheduler", "/etc/accelgen/tls", True, binds=[], dials=[])


def test_during_a_ca_rotation_both_cas_are_trusted(tmp_path: Path) -> None:
    """ca.crt holding the old and the new CA: a service still on the old CA's certificate and one
    already on the new CA's pass the start-up check and complete a real mutual TLS handshake."""
    import asyncio

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from accelgen.common.grpc_server import listen, make_server, set_serving
    from accelgen.common.tls import open_channel

    old, new, both = tmp_path / "old", tmp_path / "new", tmp_path / "both"
    make_certs(CertsRequest(old))
    make_certs(CertsRequest(new))
    both.mkdir()
    (both / "ca.crt").write_bytes((old / "ca.crt").read_bytes() + (new / "ca.crt").read_bytes())
    for name, source in (("scheduler", old), ("worker", new)):
        for suffix in (".crt", ".key"):
            (both / f"{name}{suffix}").write_bytes((source / f"{name}{suffix}").read_bytes())
    assert tls_dir_problem(both, "scheduler") is None and tls_dir_problem(both, "worker") is None

    async def handshake() -> int:
        scheduler, worker = Transport.load("scheduler", both), Transport.load("worker", both)
        server, health = make_server(["x"], scheduler)
        port = listen(server, "127.0.0.1", 0, scheduler.server_credentials())
        await server.start()
        await set_serving(health, ["x"], True)
        try:
            async with open_channel(f"127.0.0.1:{port}", [], worker, "scheduler") as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
                return reply.status
        finally:
            await server.stop(None)

    assert asyncio.run(handshake()) == health_pb2.HealthCheckResponse.SERVING


def test_a_certificate_naming_several_roles_is_refused(tmp_path: Path) -> None:
    """A CA that issued one certificate for two roles: the start-up check names it, and a server's
    RoleGuard refuses it over a real handshake even for a method one of its roles may call."""
    import asyncio
    import datetime

    import grpc
    from cryptography.hazmat.primitives import serialization

    from accelgen.common.authz import method_rules
    from accelgen.common.certs import _make_leaf
    from accelgen.common.grpc_server import listen, make_server
    from accelgen.common.tls import open_channel

    make_certs(CertsRequest(tmp_path))
    ca_key = serialization.load_pem_private_key((tmp_path / "ca.key").read_bytes(), password=None)
    ca_cert = _cert(tmp_path / "ca.crt")
    key, cert = _make_leaf("gateway", ["worker.accelgen"], 1, datetime.datetime.now(datetime.timezone.utc),
                           ca_key, ca_cert)  # type: ignore[arg-type]
    two = tmp_path / "two"
    two.mkdir()
    (two / "ca.crt").write_bytes((tmp_path / "ca.crt").read_bytes())
    (two / "gateway.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (two / "gateway.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    assert "several roles" in (tls_dir_problem(two, "gateway") or "")

    async def call(transport: Transport) -> tuple[grpc.StatusCode, str]:
        scheduler = Transport.load("scheduler", tmp_path)
        server, _ = make_server(["test.Echo"], scheduler, method_rules("test.Echo", {"Call": "gateway"}))

        async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return request

        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "test.Echo", {"Call": grpc.unary_unary_rpc_method_handler(echo)}),))
        port = listen(server, "127.0.0.1", 0, scheduler.server_credentials())
        await server.start()
        try:
            async with open_channel(f"127.0.0.1:{port}", [], transport, "scheduler") as channel:
                reply = await channel.unary_unary("/test.Echo/Call")(b"hi", timeout=10)
            return grpc.StatusCode.OK, reply.decode()
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
        finally:
            await server.stop(None)

    rogue = Transport("gateway", two, ca=(two / "ca.crt").read_bytes(), cert=(two / "gateway.crt").read_bytes(),
                      key=(two / "gateway.key").read_bytes())
    code, why = asyncio.run(call(rogue))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "several roles" in why
    assert asyncio.run(call(Transport.load("gateway", tmp_path))) == (grpc.StatusCode.OK, "hi")  # the real one passes


def test_one_more_certificate_from_the_same_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`accelgen certs --issue worker --name node1`: a per-node --tls-dir signed by the existing CA,
    with a certificate of its own (not a copy of worker.crt)."""
    assert cli(["certs", "--out", str(tmp_path)]) == 0
    assert cli(["certs", "--out", str(tmp_path), "--issue", "worker", "--name", "node1", "--host", "10.0.0.7"]) == 0
    node = tmp_path / "node1"
    assert sorted(p.name for p in node.iterdir()) == ["ca.crt", "worker.crt", "worker.key"]
    assert tls_dir_problem(node, "worker") is None
    assert _cert(node / "worker.crt") != _cert(tmp_path / "worker.crt")
    assert stat.S_IMODE((node / "worker.key").stat().st_mode) == 0o600
    assert ipaddress.ip_address("10.0.0.7") in _cert(node / "worker.crt").extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress)
    capsys.readouterr()
    assert cli(["certs", "--out", str(tmp_path), "--issue", "worker", "--name", "node1"]) == 2  # no overwrite
    assert "exists" in capsys.readouterr().err
    assert cli(["certs", "--out", str(tmp_path / "none"), "--issue", "worker", "--name", "x"]) == 2
    assert "no usable CA" in capsys.readouterr().err
