"""A TCP proxy the campaign controls: the link between two services that it can cut.

Each worker advertises a second loopback address (``--advertise-host 127.0.0.2``, same port),
where this proxy listens and forwards to the worker's real address, so the scheduler's plan
calls cross it; the worker's own calls to the scheduler cross a second proxy. ``cut(seconds)``
drops every open connection and, for that long, accepts and immediately closes new ones (a
refused link, which gRPC sees as UNAVAILABLE), then forwards again. No service code changes:
loopback is all of 127.0.0.0/8 on Linux.
"""

from __future__ import annotations

import selectors
import socket
import threading
import time


class TcpProxy:
    """Forward ``listen`` (host, port) to ``target`` (host, port) on a thread of its own."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.listen, self.target = listen, target
        self._cut_until = 0.0
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._sel = selectors.DefaultSelector()
        self._srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(listen)
        self._srv.listen(128)
        self._srv.setblocking(False)
        self._sel.register(self._srv, selectors.EVENT_READ, None)
        self._stop = False
        self._drop_now = False
        self.cuts = 0
        self._thread = threading.Thread(target=self._loop, name=f"proxy-{listen[1]}", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"{self.listen[0]}:{self.listen[1]}"

    def cut(self, seconds: float) -> None:
        """Drop every connection now and refuse new ones for ``seconds``."""
        with self._lock:
            self._cut_until = time.monotonic() + seconds
            self.cuts += 1
            self._drop_now = True  # the loop thread closes them: it owns the selector

    def is_cut(self) -> bool:
        return time.monotonic() < self._cut_until

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=5)
        for a, b in self._pairs:
            self._close_pair(a, b)
        self._srv.close()

    # -- the loop -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop:
            if self._drop_now:
                with self._lock:
                    pairs, self._pairs, self._drop_now = self._pairs, [], False
                for a, b in pairs:
                    self._close_pair(a, b)
            for key, _ in self._sel.select(timeout=0.1):
                if key.data is None:
                    self._accept()
                else:
                    self._pump(key.fileobj, key.data)

    def _accept(self) -> None:
        try:
            client, _ = self._srv.accept()
        except OSError:
            return
        if self.is_cut():
            client.close()
            return
        try:
            upstream = socket.create_connection(self.target, timeout=2)
        except OSError:
            client.close()
            return
        for s in (client, upstream):
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._pairs.append((client, upstream))
        self._sel.register(client, selectors.EVENT_READ, upstream)
        self._sel.register(upstream, selectors.EVENT_READ, client)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            data = src.recv(65536)
            if data:
                dst.settimeout(5.0)
                dst.sendall(data)
                dst.setblocking(False)
                return
        except OSError:
            pass
        with self._lock:
            self._pairs = [p for p in self._pairs if src not in p]
        self._close_pair(src, dst)

    def _close_pair(self, a: socket.socket, b: socket.socket) -> None:
        for s in (a, b):
            try:
                self._sel.unregister(s)
            except (KeyError, ValueError, OSError):
                pass
            try:
                s.close()
            except OSError:
                pass
