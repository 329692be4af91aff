"""Run an MQTT client's network I/O on an asyncio event loop instead of paho's own thread.

    loop.add_reader(sock) ─▶ client.loop_read()    a packet in ─▶ callbacks, on the loop
    publish() ─▶ client.loop_write() at once        (register_write covers a full socket)
    loop.call_later(1 s)  ─▶ client.loop_misc()     keepalive pings, dead-broker detection
    socket closed ─▶ reconnect in an executor thread after a backoff with jitter

Why: the daemon's offload requests are published from, and their answers consumed on, the
API's event loop. With paho's network thread, every round trip crossed threads twice
(a wake-up byte on paho's socket pair to send, `call_soon_threadsafe` to deliver), and each
crossing waits for the other thread to let go of the GIL: measured ~0.3–0.6 ms of a ~1.2 ms
round trip on this 2-core machine. Here the loop does it all, as paho's external-loop API
intends (`on_socket_open/close/register_write/unregister_write`). Only the TCP connect runs
in an executor thread (a blocking `socket.create_connection` must not stall the API).

This module holds no paho import: it drives the client object that client.py made.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

MISC_INTERVAL_S = 1.0
"""How often keepalive is checked (paho's own loop does it about once a second too)."""


class LoopDriver:
    """Drives one paho client (already given its host with `connect_async`) on `loop`."""

    def __init__(
        self,
        client: Any,
        loop: asyncio.AbstractEventLoop,
        reconnect_s: tuple[float, float],
        on_open: Callable[[Any], None],
    ) -> None:
        self._client = client
        self.loop = loop
        self._min, self._max = reconnect_s
        self._delay = self._min
        self._on_open = on_open
        self._stopping = False
        self._connecting = False
        self._timer: asyncio.TimerHandle | None = None
        self._misc: asyncio.TimerHandle | None = None
        self._sock: Any = None
        client.on_socket_open = self._socket_open
        client.on_socket_close = self._socket_close
        client.on_socket_register_write = self._register_write
        client.on_socket_unregister_write = self._unregister_write

    # -- control ----------------------------------------------------------------------------

    def start(self) -> None:
        self._soon(self._connect)

    def stop(self) -> None:
        """Send DISCONNECT and close; safe from any thread while the loop runs. If the loop
        is not running any more, the socket is simply closed."""
        self._stopping = True
        if self.on_loop() or not self.loop.is_running():
            self._stop_here()
            return
        done = threading.Event()

        def stop_and_signal() -> None:
            try:
                self._stop_here()
            finally:
                done.set()

        self.loop.call_soon_threadsafe(stop_and_signal)
        done.wait(5.0)

    def on_loop(self) -> bool:
        """Is the caller running on this driver's loop right now?"""
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    def flush(self) -> None:
        """Write what publish() queued now, not at the next loop iteration (loop thread)."""
        if self._sock is not None:
            self._client.loop_write()

    def flush_soon(self) -> None:
        """From another thread: have the loop write what is queued."""
        with contextlib.suppress(RuntimeError):  # the loop closed: nothing to write to
            self.loop.call_soon_threadsafe(self.flush)

    # -- internals (loop thread unless said otherwise) ---------------------------------------

    def _stop_here(self) -> None:
        for h in (self._timer, self._misc):
            if h is not None:
                h.cancel()
        if self._sock is not None:
            self._client.disconnect()
            self._client.loop_write()  # DISCONNECT goes out; paho then closes the socket
        if self._sock is not None:  # it could not be written: close anyway
            self._client._sock_close()

    def _soon(self, fn: Callable[[], None]) -> None:
        if self.on_loop():
            fn()
        elif not self.loop.is_closed():  # closed: nothing is watching sockets any more
            self.loop.call_soon_threadsafe(fn)

    def _connect(self) -> None:
        if self._stopping or self._connecting or self._sock is not None:
            return
        self._connecting = True
        # A blocking connect (TCP, TLS handshake): off the loop. paho calls _socket_open and
        # _register_write (CONNECT) from that thread; both hop back to the loop.
        fut = self.loop.run_in_executor(None, self._client.reconnect)
        fut.add_done_callback(self._connect_done)

    def _connect_done(self, fut: asyncio.Future[Any]) -> None:
        self._connecting = False
        exc = fut.exception()
        if exc is None:
            self._delay = self._min
            return
        if self._stopping:
            return
        delay = self._delay * random.uniform(0.5, 1.5)  # a fleet must not retry in lockstep
        self._delay = min(self._max, self._delay * 2)
        log.debug("cannot connect to the broker (%s); retrying in %.2f s", exc, delay)
        self._timer = self.loop.call_later(delay, self._connect)

    def _socket_open(self, client: Any, userdata: Any, sock: Any) -> None:  # any thread
        self._on_open(sock)

        def watch() -> None:
            if self._stopping:  # stop() came while this connect was under way
                self._client._sock_close()
                return
            self._sock = sock
            self.loop.add_reader(sock, self._read)
            self._misc = self.loop.call_later(MISC_INTERVAL_S, self._tick)

        self._soon(watch)

    def _socket_close(self, client: Any, userdata: Any, sock: Any) -> None:
        # paho closes the socket right after this returns: stop watching it first.
        if self.on_loop() or not self.loop.is_running():
            self._forget(sock)
        else:  # a connect that failed half-way, in the executor thread
            self.loop.call_soon_threadsafe(self._forget, sock)

    def _forget(self, sock: Any) -> None:
        if self._sock is sock:
            self._sock = None
            if self._misc is not None:
                self._misc.cancel()
        if not self.loop.is_closed():
            self.loop.remove_reader(sock)
            self.loop.remove_writer(sock)
        if not self._stopping and not self.loop.is_closed():
            delay = self._delay * random.uniform(0.5, 1.5)
            self._timer = self.loop.call_later(delay, self._connect)

    def _register_write(self, client: Any, userdata: Any, sock: Any) -> None:  # any thread
        self._soon(lambda: self.loop.add_writer(sock, self._write))

    def _unregister_write(self, client: Any, userdata: Any, sock: Any) -> None:
        self._soon(lambda: self._unwatch_write(sock))

    def _unwatch_write(self, sock: Any) -> None:
        self.loop.remove_writer(sock)

    def _read(self) -> None:
        self._client.loop_read()

    def _write(self) -> None:
        self._client.loop_write()

    def _tick(self) -> None:
        if self._sock is None:
            return
        self._client.loop_misc()
        if self._sock is not None:
            self._misc = self.loop.call_later(MISC_INTERVAL_S, self._tick)
