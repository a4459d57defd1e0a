"""The client examples in examples/ run against a real stack and do what their README says.

One stack for the module, secured as a deployment would be: a sim worker, API keys, and a gateway
serving its clients over TLS (``client_tls``, a certificate for 127.0.0.1), so every flag the
examples document (address, key, CA certificate) is used. Each example runs as a user would run
it, as a subprocess, and its output is checked: tokens streamed, a cancel acknowledged and the
stream ended with "abort", the status code of a refused request printed.

grpcurl is not installable on every machine (it is a Go binary from GitHub, not a Debian
package). Where it is on PATH the script runs as is; otherwise the test checks what the script
relies on without it: the gateway's reflection lists the Gateway service and resolves every
method and message the script names, and the script's JSON body parses into the reflected
``GenerateRequest`` and streams tokens when sent as grpcurl sends it (a dynamic message built
from the reflected descriptors, no generated stubs).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc

from accelgen.common.certs import CertsRequest, make_certs
from accelgen.common.grpc_server import free_port
from accelgen.v1 import gateway_pb2
from launcher.stack import Proc, Stack, python_module, spawn, start_stack

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
KEY = "examples-key-" + "e" * 24


@dataclass
class Served:
    """The stack and the client-facing gateway the examples call (TLS, API keys)."""

    stack: Stack
    gateway_address: str
    ca_cert: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The stack's own gateway is plaintext (the launcher probes it so); the examples call a
    second gateway on the same scheduler that serves clients over TLS with the API keys."""
    root = tmp_path_factory.mktemp("examples")
    tls = root / "tls"
    make_certs(CertsRequest(tls, hosts=("127.0.0.1", "localhost")))
    keys = root / "api-keys"
    keys.write_text(f"{KEY} name=examples\n")
    s = start_stack(workers=1, executor="sim", worker_args=["--time-scale", "0.02", "--log-level", "WARNING"],
                    scheduler_args=["--log-level", "WARNING"], log_dir=root, tls_dir=tls,
                    gateway_args=["--api-keys", str(keys), "--log-level", "WARNING"])
    try:
        address = f"127.0.0.1:{free_port()}"
        gateway = spawn("gateway-tls", python_module(
            "gateway.main", "--scheduler-address", s.scheduler_address, "--grpc-port", address.rsplit(":", 1)[1],
            "--http-port", str(free_port()), *s.tls_args(), "--api-keys", str(keys), "--client-tls",
            "--log-level", "WARNING"), root)
        s.procs.append(gateway)
        wait_tls_healthy(address, (tls / "ca.crt").read_bytes(), gateway)
        yield Served(s, address, str(tls / "ca.crt"))
    finally:
        s.stop()


def wait_tls_healthy(address: str, ca: bytes, proc: Proc, timeout_s: float = 60.0) -> None:
    with grpc.secure_channel(address, grpc.ssl_channel_credentials(ca)) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        deadline = time.monotonic() + timeout_s
        while True:
            assert proc.alive(), f"the TLS gateway exited; see {proc.log_path}"
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service="accelgen.v1.Gateway"), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, f"the TLS gateway at {address} not serving after {timeout_s:g} s"
            time.sleep(0.1)


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def client_flags(stack: Served) -> list[str]:
    return ["--address", stack.gateway_address, "--api-key", KEY, "--ca-cert", stack.ca_cert]


def sections(output: str) -> dict[str, str]:
    """The output of ``--mode all`` split at its ``== NAME:`` headers."""
    parts = re.split(r"^== (\w+):.*$", output, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def tokens_printed(text: str) -> list[int]:
    return [int(t) for line in re.findall(r"^tokens: (?:\[\d+\] )?\[([\d, ]*)\]", text, flags=re.M)
            for t in line.split(",") if t.strip()]


def check_client_output(output: str, max_tokens: int, cancel_after: int) -> None:
    """What both language examples print for ``--mode all``."""
    parts = sections(output)
    assert set(parts) == {"stream", "cancel", "error"}, output
    stream = parts["stream"]
    assert len(tokens_printed(stream)) == max_tokens, stream
    assert re.search(rf"^complete: finish_reason=length completion_tokens={max_tokens} ", stream, flags=re.M), stream
    rid = re.search(r"^request_id: (\w+)$", stream, flags=re.M)
    assert rid and rid.group(1) != "example-stream", "the gateway makes the id; the client's is a label"

    cancel = parts["cancel"]
    assert re.search(r"^cancel: request_id=\w+ cancelled=(True|true)$", cancel, flags=re.M), cancel
    done = re.search(r"^complete: finish_reason=abort completion_tokens=(\d+) ", cancel, flags=re.M)
    assert done, cancel
    assert cancel_after <= int(done.group(1)) < 2000 and len(tokens_printed(cancel)) == int(done.group(1))

    errors = re.findall(r"^error: (\w+): (.+)$", parts["error"], flags=re.M)
    assert [code for code, _ in errors] == ["INVALID_ARGUMENT", "NOT_FOUND"], parts["error"]
    assert "temperature" in errors[0][1]


def test_python_example_streams_cancels_and_shows_errors(stack: Served) -> None:
    out = run([sys.executable, "examples/python/generate.py", *client_flags(stack), "--mode", "all",
               "--app-class", "code", "--ttft-ms", "2000", "--tbt-ms", "100", "--max-tokens", "12"])
    assert out.returncode == 0, out.stderr + out.stdout
    check_client_output(out.stdout, max_tokens=12, cancel_after=3)
    assert "SLO ttft=2000.0 ms tbt=100.0 ms" in out.stdout


def test_python_example_sends_stop_strings_and_n_samples(stack: Served) -> None:
    """``--stop`` and ``--n`` (GenerateRequest fields 8 and 9): two samples, each its own request id
    and its own complete. (The sim worker's tokens decode to no text, so no stop string matches
    here: the stop itself is tested where the gateway's stop strings are.)"""
    out = run([sys.executable, "examples/python/generate.py", *client_flags(stack), "--mode", "stream",
               "--n", "2", "--temperature", "0.8", "--stop", "fox", "--max-tokens", "5"])
    assert out.returncode == 0, out.stderr + out.stdout
    assert "stop=['fox'], n=2" in out.stdout
    completes = re.findall(r"^complete: \[(\d)\] finish_reason=length completion_tokens=5 ", out.stdout, flags=re.M)
    assert sorted(completes) == ["0", "1"], out.stdout
    assert len(set(re.findall(r"^request_id: (\w+)$", out.stdout, flags=re.M))) == 2
    assert len(tokens_printed(out.stdout)) == 10


def test_python_example_without_the_key_prints_unauthenticated(stack: Served) -> None:
    out = run([sys.executable, "examples/python/generate.py", "--address", stack.gateway_address,
               "--ca-cert", stack.ca_cert, "--mode", "stream"], env={"ACCELGEN_API_KEY": ""})
    assert out.returncode == 1
    assert re.search(r"^error: UNAUTHENTICATED: ", out.stderr, flags=re.M), out.stderr


def node_ready() -> str | None:
    """Why the Node example cannot run here, or None."""
    if shutil.which("node") is None:
        return "node is not installed (scripts/install_system_deps.sh installs nodejs and npm; `make install`)"
    if not (EXAMPLES / "node" / "node_modules" / "@grpc" / "grpc-js").is_dir():
        return "examples/node/node_modules is missing: run `make install` (npm ci --prefix examples/node)"
    return None


def test_node_example_streams_cancels_and_shows_errors(stack: Served) -> None:
    reason = node_ready()
    if reason:
        pytest.skip(reason)
    # The key from the environment, as a deployment passes secrets.
    flags = ["--address", stack.gateway_address, "--ca-cert", stack.ca_cert]
    out = run(["node", "examples/node/generate.js", *flags, "--mode", "all", "--max-tokens", "10", "--cancel-after",
               "4"], env={"ACCELGEN_API_KEY": KEY})
    assert out.returncode == 0, out.stderr + out.stdout
    check_client_output(out.stdout, max_tokens=10, cancel_after=4)
    bad = run(["node", "examples/node/generate.js", *flags, "--mode", "stream"], env={"ACCELGEN_API_KEY": ""})
    assert bad.returncode == 1 and re.search(r"^error: UNAUTHENTICATED: ", bad.stderr, flags=re.M), bad.stderr


# -- grpcurl --------------------------------------------------------------------------------------
SCRIPT = EXAMPLES / "grpcurl" / "generate.sh"
BODY = EXAMPLES / "grpcurl" / "generate_request.json"


LOCAL_BIN = REPO / ".cache" / "bin"  # where `make install` puts grpcurl (scripts/install_grpcurl.sh)


def test_grpcurl_script_runs_where_grpcurl_is_installed(stack: Served) -> None:
    path = f"{LOCAL_BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    if shutil.which("grpcurl", path=path) is None:
        pytest.skip("grpcurl is neither on PATH nor in .cache/bin (make install downloads it from GitHub where "
                    "GitHub is reachable; no Debian package); test_grpcurl_script_works_through_reflection "
                    "checks the script without it")
    out = run(["bash", str(SCRIPT), stack.gateway_address],
              env={"ACCELGEN_API_KEY": KEY, "ACCELGEN_CA_CERT": stack.ca_cert, "PATH": path})
    assert out.returncode == 0, out.stderr + out.stdout
    assert "accelgen.v1.Gateway" in out.stdout and "rpc Generate" in out.stdout
    assert '"finishReason": "length"' in out.stdout and '"tokenIds"' in out.stdout
    assert '"index": 1' in out.stdout  # the n = 2 call's second sample
    assert "NotFound" in out.stdout + out.stderr


def reflected_pool(channel: grpc.Channel) -> tuple[list[str], DescriptorPool]:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    db = ProtoReflectionDescriptorDatabase(channel)
    return list(db.get_services()), DescriptorPool(db)


def resolves(pool: DescriptorPool, name: str) -> bool:
    """Whether ``name`` is a service or a message the reflected pool knows (grpcurl's describe)."""
    for find in (pool.FindServiceByName, pool.FindMessageTypeByName):
        try:
            find(name)
            return True
        except KeyError:
            pass
    return False


def grpcurl_calls(script: str) -> list[tuple[str | None, str]]:
    """(inline JSON body, or None for ``-d @`` = generate_request.json; method) of each grpcurl call."""
    pattern = r"-d (?:'([^']*)'|@) \"\$ADDR\" accelgen\.v1\.Gateway/(\w+)"
    return [(body or None, method) for body, method in re.findall(pattern, script)]


def test_grpcurl_script_works_through_reflection(stack: Served) -> None:
    """What grpcurl does for the script, done with reflection from Python: list, describe, and each
    call with the script's JSON body on a message built from the reflected descriptors."""
    script = SCRIPT.read_text()
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    calls = grpcurl_calls(script)
    assert [m for _, m in calls] == ["Generate", "Generate", "Cancel"] and calls[0][0] is None, calls
    creds = grpc.ssl_channel_credentials(Path(stack.ca_cert).read_bytes())
    with grpc.secure_channel(stack.gateway_address, creds) as channel:
        services, pool = reflected_pool(channel)  # reflection is open: no API key needed
        assert "accelgen.v1.Gateway" in services  # `grpcurl ADDR list`
        for name in re.findall(r"describe (\S+)", script):  # `grpcurl ADDR describe NAME`
            assert resolves(pool, name), f"reflection does not resolve {name!r}"
        gateway = pool.FindServiceByName("accelgen.v1.Gateway")
        printed: list[list[dict]] = []
        for body, method_name in calls:
            method = gateway.methods_by_name[method_name]
            request_cls = message_factory.GetMessageClass(method.input_type)
            response_cls = message_factory.GetMessageClass(method.output_type)
            request = json_format.Parse(body or BODY.read_text(), request_cls())  # grpcurl's -d: proto JSON
            invoke = channel.unary_stream if method.server_streaming else channel.unary_unary
            call = invoke(f"/accelgen.v1.Gateway/{method_name}", request_serializer=request_cls.SerializeToString,
                          response_deserializer=response_cls.FromString)
            try:
                answer = call(request, timeout=60, metadata=(("authorization", f"Bearer {KEY}"),))
                answers = answer if method.server_streaming else [answer]
                printed.append([json_format.MessageToDict(r) for r in answers])
            except grpc.RpcError as exc:
                printed.append([{"code": exc.code().name}])
    body = json_format.Parse(BODY.read_text(), gateway_pb2.GenerateRequest())
    assert body.app_class == "chat" and body.slo.tbt_ms == 100 and body.stream and list(body.stop) == ["\n\n"]
    chunks = [p["chunk"] for p in printed[0] if "chunk" in p]
    complete = printed[0][-1]["complete"]
    assert sum(len(c["tokenIds"]) for c in chunks) == body.sampling_params.max_new_tokens
    assert complete["finishReason"] == "length"
    assert complete["outputIds"] == [t for c in chunks for t in c["tokenIds"]]
    # n = 2: one complete per sample, index 0 and 1 (proto JSON leaves out index 0, the default)
    assert sorted(p["complete"].get("index", 0) for p in printed[1] if "complete" in p) == [0, 1]
    assert printed[2] == [{"code": "NOT_FOUND"}]
