"""Who may call what: each method of a service is for one role, read from the caller's certificate.

Mutual TLS (``accelgen.common.tls``) proves a caller holds a certificate from the deployment's
CA; ``RoleGuard`` then decides by *which* one. A certificate's role is the ``<role>.accelgen``
DNS name among its subject alternative names (gRPC exposes them in the call's auth context as
``x509_subject_alternative_name``). A service gives a table ``{method name: role}``; a call whose
caller does not hold that role ends with PERMISSION_DENIED naming the role it needs, before the
servicer sees anything (a method open to several roles names them as a tuple; the servicer may
then tell them apart with ``peer_roles``). A method the table does not name is refused too (deny by default: a new
RPC cannot ship open by accident); health checking and reflection are open to any certificate
from the CA (``ANY``).

A server interceptor in gRPC's aio API sees the method name but not the call's context, so the
check wraps each handler (as ``accelgen.common.decode_guard`` does) and runs as the call starts.
"""

from __future__ import annotations

import inspect
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping

import grpc

from accelgen.common.certs import ROLES, role_name

ANY = "*"  # any certificate from the CA
SAN_KEY = "x509_subject_alternative_name"
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")


def peer_roles(context: grpc.aio.ServicerContext) -> set[str]:
    """The roles the caller's certificate carries (empty without one)."""
    names = {raw.decode("utf-8", "replace") for raw in context.auth_context().get(SAN_KEY, [])}
    return {role for role in ROLES if role_name(role) in names}


Rule = str | tuple[str, ...]  # one role, ANY, or several roles


def method_rules(service: str, rules: Mapping[str, Rule]) -> dict[str, Rule]:
    """``{"Submit": "gateway"}`` for ``accelgen.v1.Scheduler`` -> full method names."""
    return {f"/{service}/{method}": role for method, role in rules.items()}


class RoleGuard(grpc.aio.ServerInterceptor):
    """See the module docstring; ``rules`` maps full method names (``/pkg.Service/Method``) to a
    role or ``ANY``."""

    def __init__(self, rules: Mapping[str, Rule]) -> None:
        bad = {role for rule in rules.values() for role in _roles_of(rule) if role != ANY and role not in ROLES}
        if bad:
            raise ValueError(f"unknown role(s) {sorted(bad)} in the method table")
        self.rules = dict(rules)

    def required(self, method: str) -> Rule | None:
        """The role (or roles) ``method`` needs, ``ANY``, or None: no role may call it."""
        if method.startswith(OPEN_SERVICES):
            return ANY
        return self.rules.get(method)

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        needed = self.required(method)
        if handler is None or needed == ANY:
            return handler

        async def check(context: grpc.aio.ServicerContext) -> None:
            roles = peer_roles(context)
            if needed is None:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{method} is open to no role")
            if len(roles) > 1:  # a CA that issued one certificate for several roles: trust none of them
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"the caller's certificate names several roles ({', '.join(sorted(roles))}); "
                                    "AccelGen accepts one role per certificate")
            allowed = _roles_of(needed)
            if not roles & set(allowed):
                held = ", ".join(sorted(role_name(r) for r in roles)) or "no AccelGen role"
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"{method} is for the {' or '.join(allowed)} role: it needs a certificate for "
                                    f"{' or '.join(role_name(r) for r in allowed)}; the caller's certificate has {held}")

        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_guard_unary(handler.unary_unary, check))
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=_guard_unary(handler.stream_unary, check))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=_guard_stream(handler.unary_stream, check))
        if handler.stream_stream is not None:
            return handler._replace(stream_stream=_guard_stream(handler.stream_stream, check))
        return handler


def _roles_of(rule: Rule | None) -> tuple[str, ...]:
    return () if rule is None else (rule,) if isinstance(rule, str) else tuple(rule)


Check = Callable[[grpc.aio.ServicerContext], Awaitable[None]]


def _guard_unary(inner: Callable[..., Any], check: Check) -> Callable[..., Awaitable[Any]]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await check(context)
        result = inner(request, context)
        return await result if inspect.isawaitable(result) else result
    return call


def _guard_stream(inner: Callable[..., Any], check: Check) -> Callable[..., Any]:
    """An async generator stays one (gRPC sends what it yields); a handler that writes with
    ``context.write`` stays a coroutine (mixing the two styles is an error in gRPC)."""
    if inspect.isasyncgenfunction(inner):
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await check(context)
            async for response in inner(request, context):
                yield response
        return stream

    async def written(request: Any, context: grpc.aio.ServicerContext) -> None:
        await check(context)
        result = inner(request, context)
        if inspect.isawaitable(result):
            await result
        elif result is not None:  # a plain iterator of responses
            for response in result:
                await context.write(response)
    return written
