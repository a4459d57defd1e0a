"""``accelgen drain WORKER``: take a worker out of service from outside, as its SIGTERM does.

The scheduler marks the worker draining (durably, in Redis), routes it no new request, and lets
the requests it has run to the end; past ``--grace`` seconds it hands the rest to the other
workers (recomputed there). The worker hears of the drain in its next heartbeat answer and, once
it has nothing left, deregisters and exits 0. ``--wait`` polls the scheduler until the worker has
left.

With mutual TLS the command presents the gateway role's certificate (``--tls-dir`` with ca.crt,
gateway.crt and gateway.key), the role the operator's tools call the scheduler with; a worker's
own certificate may drain only that worker.
"""

from __future__ import annotations

import argparse
import time

import grpc

from accelgen.common.grpc_server import channel_target
from accelgen.common.tls import Transport, open_sync_channel
from accelgen.v1 import scheduler_pb2, scheduler_pb2_grpc
from launcher.errors import CliError

POLL_S = 0.5
RPC_TIMEOUT_S = 10.0


def add_command(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser("drain", help="take a worker out of service: no new requests, its running ones finish, "
                                     "then it exits 0", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("worker", help="the worker's id (its --worker-id; `accelgen up` names them worker-0, worker-1...)")
    p.add_argument("--scheduler", default="127.0.0.1:50051",
                   help="host:port of the scheduler, or the list ip:port,ip:port of the leader and its standbys")
    p.add_argument("--grace", type=float, default=30.0,
                   help="seconds its requests may run to the end; the rest are then recomputed elsewhere")
    p.add_argument("--wait", action="store_true", help="return once the worker has left the scheduler")
    p.add_argument("--timeout", type=float, default=None,
                   help="with --wait: give up after this many seconds (default: --grace + 60)")
    p.add_argument("--tls-dir", default=None,
                   help="mutual TLS: a directory with ca.crt, gateway.crt and gateway.key (`accelgen certs`)")
    p.set_defaults(func=cmd_drain)


def cmd_drain(args: argparse.Namespace) -> int:
    if args.grace <= 0:
        raise ValueError(f"--grace must be > 0 seconds, got {args.grace:g}")
    transport = Transport.load("gateway", args.tls_dir) if args.tls_dir else None
    with open_sync_channel(channel_target(args.scheduler), transport, "scheduler") as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        try:
            reply = stub.DrainWorker(scheduler_pb2.DrainWorkerRequest(worker_id=args.worker, grace_s=args.grace),
                                     timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise _explained(exc, args) from None
        print(f"worker {args.worker} is draining: {reply.assigned} request(s) still running on it; the grace "
              f"period ends in {reply.drain_left_s:.1f} s", flush=True)
        if not args.wait:
            return 0
        return _wait_gone(stub, args, time.monotonic() + (args.timeout if args.timeout is not None else args.grace + 60))


def _wait_gone(stub: scheduler_pb2_grpc.SchedulerStub, args: argparse.Namespace, deadline: float) -> int:
    """Poll until the scheduler no longer knows the worker (or knows a new, undrained one by its id)."""
    query = scheduler_pb2.DrainWorkerRequest(worker_id=args.worker, query=True)
    last = None
    while time.monotonic() < deadline:
        try:
            reply = stub.DrainWorker(query, timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                print(f"worker {args.worker} drained and left", flush=True)
                return 0
            if exc.code() != grpc.StatusCode.UNAVAILABLE:  # a scheduler failing over: keep asking
                raise _explained(exc, args) from None
            time.sleep(POLL_S)
            continue
        if not reply.draining:
            print(f"worker {args.worker} drained; a new worker registered under its id", flush=True)
            return 0
        if reply.assigned != last:
            print(f"  {reply.assigned} request(s) left, {reply.drain_left_s:.1f} s of grace left", flush=True)
            last = reply.assigned
        time.sleep(POLL_S)
    raise TimeoutError(f"worker {args.worker} has not left after --timeout; it is still draining (see its log)")


def _explained(exc: grpc.RpcError, args: argparse.Namespace) -> Exception:
    """A refusal as one line that says what to change."""
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return ConnectionError(f"no scheduler answers at {args.scheduler} ({details}); check --scheduler, and "
                               "--tls-dir if the scheduler runs mutual TLS")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionError(f"the scheduler refused the drain: {details}; give --tls-dir a directory with "
                               "the gateway role's certificate (`accelgen certs`)")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return CliError(f"the scheduler at {args.scheduler} is older than DrainWorker: upgrade it, or stop "
                            "the worker with SIGTERM")
    return CliError(f"{code.name}: {details}")
