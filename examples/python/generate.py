#!/usr/bin/env python3
"""A gRPC client of the AccelGen gateway, built only on the stubs generated from protos/.

It shows what an application does with the ``accelgen.v1.Gateway`` service:

* ``stream``: a streaming ``Generate`` with an application class (its default SLO) or an explicit
  SLO, printing each chunk's tokens as they arrive and the final ``GenerateComplete``;
* ``cancel``: a stream cancelled after a few tokens with the ``Cancel`` RPC (the request id is the
  one the gateway made, sent on every response); the stream then ends with ``finish_reason
  "abort"``;
* ``error``: a request the gateway refuses, and how to read the status code, its message and the
  ``retry-after-ms`` trailer that a RESOURCE_EXHAUSTED answer carries.

Authentication is ``authorization: Bearer KEY`` metadata on every call (``--api-key`` or
``$ACCELGEN_API_KEY``); TLS with ``--tls`` (system roots) or ``--ca-cert`` (the gateway's CA).

Run from the repository root, where ``accelgen.v1`` is importable (``pip install -e .`` puts it on
the path); another project generates its own stubs with ``python -m grpc_tools.protoc -Iprotos
--python_out=. --grpc_python_out=. protos/accelgen/v1/*.proto``.

    python examples/python/generate.py --address 127.0.0.1:50050 --mode all
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Iterator, Sequence

import grpc

from accelgen.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    """Plaintext by default (a gateway on a trusted network); TLS when asked for."""
    if args.tls or args.ca_cert:
        root = open(args.ca_cert, "rb").read() if args.ca_cert else None
        return grpc.secure_channel(args.address, grpc.ssl_channel_credentials(root_certificates=root))
    return grpc.insecure_channel(args.address)


def metadata(args: argparse.Namespace) -> Sequence[tuple[str, str]] | None:
    """The API key, as the gateway reads it: ``authorization: Bearer KEY``."""
    return (("authorization", f"Bearer {args.api_key}"),) if args.api_key else None


def make_request(args: argparse.Namespace, max_tokens: int, label: str,
                 newer_fields: bool = True) -> gateway_pb2.GenerateRequest:
    """A streamed text request; an explicit SLO (``--ttft-ms`` / ``--tbt-ms``) overrides the class's."""
    req = gateway_pb2.GenerateRequest(
        request_id=label,  # the client's own label; the gateway makes the request id
        text=args.prompt,
        sampling_params=common_pb2.SamplingParams(max_new_tokens=max_tokens, temperature=args.temperature),
        app_class=args.app_class,
        stream=True,
    )
    if args.ttft_ms or args.tbt_ms:
        req.slo.CopyFrom(common_pb2.SLOSpec(ttft_ms=args.ttft_ms, tbt_ms=args.tbt_ms))
    if newer_fields:
        add_newer_fields(req, args)
    return req


def add_newer_fields(req: gateway_pb2.GenerateRequest, args: argparse.Namespace) -> None:
    """``stop`` strings and ``n`` completions, when the gateway.proto these stubs come from has them."""
    fields = req.DESCRIPTOR.fields_by_name
    if args.stop:
        if "stop" not in fields:
            raise SystemExit("--stop: this gateway.proto has no GenerateRequest.stop field")
        req.stop.extend(args.stop)
    if args.n > 1:
        if "n" not in fields:
            raise SystemExit("--n: this gateway.proto has no GenerateRequest.n field")
        req.n = args.n


def sample_tag(message: object, many: bool) -> str:
    """``[i] `` for sample i of an ``n`` > 1 request (chunks and completes carry ``index``)."""
    return f"[{getattr(message, 'index', 0)}] " if many else ""


def stop_reason(complete: gateway_pb2.GenerateComplete) -> str:
    """`` stop_reason=...``: the stop string or stop token id that ended a "stop" finish, if any."""
    which = complete.WhichOneof("stop_reason") if "stop_string" in complete.DESCRIPTOR.fields_by_name else None
    return f" stop_reason={getattr(complete, which)!r}" if which else ""


def print_stream(responses: Iterator[gateway_pb2.GenerateResponse], on_first_id=None,
                 cancel_after: int | None = None, many: bool = False) -> list[gateway_pb2.GenerateComplete]:
    """Print tokens as they come; ``on_first_id(request_id)`` is called once (to cancel). With
    ``n`` > 1 (``many``) the samples' chunks interleave, each tagged with its index."""
    completes, seen, announced = [], 0, set()
    for resp in responses:
        if resp.request_id not in announced:  # one id per sample
            print(f"request_id: {resp.request_id}", flush=True)
            announced.add(resp.request_id)
        if resp.HasField("chunk"):
            chunk = resp.chunk
            seen += len(chunk.token_ids)
            print(f"tokens: {sample_tag(chunk, many)}{list(chunk.token_ids)} text={chunk.text!r} "
                  f"(completion_tokens={chunk.completion_tokens})", flush=True)
            if on_first_id is not None and cancel_after is not None and seen >= cancel_after:
                on_first_id(resp.request_id)
                on_first_id = None
        elif resp.HasField("complete"):
            complete = resp.complete
            completes.append(complete)
            print(f"complete: {sample_tag(complete, many)}finish_reason={complete.finish_reason} "
                  f"completion_tokens={complete.completion_tokens} prompt_tokens={complete.prompt_tokens} "
                  f"ttft_ms={complete.ttft_ms:.1f} mean_tbt_ms={complete.mean_tbt_ms:.1f} "
                  f"slo_met={complete.slo_met}{stop_reason(complete)}", flush=True)
            print(f"text: {sample_tag(complete, many)}{complete.text!r}", flush=True)
    return completes


def run_stream(stub: gateway_pb2_grpc.GatewayStub, args: argparse.Namespace) -> None:
    slo = f"SLO ttft={args.ttft_ms} ms tbt={args.tbt_ms} ms" if args.ttft_ms or args.tbt_ms else "its class's SLO"
    extra = "".join([f", stop={args.stop}" if args.stop else "", f", n={args.n}" if args.n > 1 else ""])
    print(f"== stream: app_class={args.app_class!r} with {slo}{extra}", flush=True)
    responses = stub.Generate(make_request(args, args.max_tokens, "example-stream"), timeout=args.timeout,
                              metadata=metadata(args))
    print_stream(responses, many=args.n > 1)


def run_cancel(stub: gateway_pb2_grpc.GatewayStub, args: argparse.Namespace) -> None:
    """Cancel from the same client after ``--cancel-after`` tokens: the stream ends with "abort".

    (Leaving the stream, ``responses.cancel()``, cancels the request too; ``Cancel`` is for
    another process, or for a client that wants the final ``GenerateComplete``.)"""
    print(f"== cancel: after {args.cancel_after} tokens of a {args.long_tokens}-token request", flush=True)
    req = make_request(args, args.long_tokens, "example-cancel", newer_fields=False)  # one sample, no stop
    responses = stub.Generate(req, timeout=args.timeout, metadata=metadata(args))

    def cancel(request_id: str) -> None:
        reply = stub.Cancel(common_pb2.CancelRequest(request_id=request_id), timeout=10, metadata=metadata(args))
        print(f"cancel: request_id={request_id} cancelled={reply.cancelled}", flush=True)

    print_stream(responses, on_first_id=cancel, cancel_after=args.cancel_after)


def describe_error(exc: grpc.RpcError) -> str:
    """``CODE: message`` plus the retry hint a RESOURCE_EXHAUSTED answer carries."""
    text = f"{exc.code().name}: {exc.details()}"
    trailers = dict(exc.trailing_metadata() or ())
    if "retry-after-ms" in trailers:
        text += f" (retry after {trailers['retry-after-ms']} ms)"
    return text


def run_error(stub: gateway_pb2_grpc.GatewayStub, args: argparse.Namespace) -> None:
    """Two refusals: a bad field (INVALID_ARGUMENT) and Cancel of an unknown id (NOT_FOUND)."""
    print("== error: a negative temperature, then Cancel of an unknown id", flush=True)
    bad = make_request(args, 4, "example-error", newer_fields=False)
    bad.sampling_params.temperature = -1.0
    try:
        list(stub.Generate(bad, timeout=args.timeout, metadata=metadata(args)))
        print("error: none (the gateway accepted a negative temperature)", flush=True)
    except grpc.RpcError as exc:
        print(f"error: {describe_error(exc)}", flush=True)
    try:
        stub.Cancel(common_pb2.CancelRequest(request_id="no-such-request"), timeout=10, metadata=metadata(args))
    except grpc.RpcError as exc:
        print(f"error: {describe_error(exc)}", flush=True)


MODES = {"stream": run_stream, "cancel": run_cancel, "error": run_error}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default="127.0.0.1:50050", help="the gateway's gRPC address")
    p.add_argument("--mode", choices=[*MODES, "all"], default="all", help="which example to run")
    p.add_argument("--api-key", default=os.environ.get("ACCELGEN_API_KEY"),
                   help="sent as 'authorization: Bearer KEY' (default: $ACCELGEN_API_KEY)")
    p.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    p.add_argument("--ca-cert", default=None, help="TLS, trusting this CA certificate (PEM)")
    p.add_argument("--prompt", default="The quick brown fox")
    p.add_argument("--app-class", default="chat", help="application class: its default SLO")
    p.add_argument("--ttft-ms", type=float, default=0.0, help="explicit SLO: time to first token")
    p.add_argument("--tbt-ms", type=float, default=0.0, help="explicit SLO: time between tokens")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--long-tokens", type=int, default=2000, help="length of the request the cancel example cuts")
    p.add_argument("--cancel-after", type=int, default=3, help="tokens to wait for before Cancel")
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable; needs gateway.proto's stop)")
    p.add_argument("--n", type=int, default=1,
                   help="samples of the prompt (needs gateway.proto's n; n > 1 needs --temperature > 0)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--timeout", type=float, default=60.0, help="deadline of each call, seconds")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with open_channel(args) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        try:
            for name, run in MODES.items():
                if args.mode in (name, "all"):
                    run(stub, args)
        except grpc.RpcError as exc:  # what a stream or call that fails looks like to a client
            print(f"error: {describe_error(exc)}", file=sys.stderr, flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
