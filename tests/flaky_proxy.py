"""A TCP proxy of the tests' own that can stop answering for a while: a storage outage without
restarting the storage (moto's in-memory server loses its data when restarted).

Every connection to ``proxy.host_port`` is piped to the upstream server by a thread of this
process, as it is (a side's close reaches the other as a close, and no timeout is added),
until an outage, which is one of:

- ``refuse``: the connections open now are closed, and a new one is accepted and closed at
  once (the client reads a reset or an empty reply, as from a server that went down);
- ``stall``: nothing is forwarded either way, and a new connection is accepted but never
  answered (a black hole: the client waits for its own timeouts); when the outage ends, the
  connections held are closed, so no request held back reaches the server late.

When the outage ends the proxy passes everything through again::

    with FlakyProxy("127.0.0.1", 9000) as proxy:
        client_uses(proxy.host_port)
        proxy.outage("stall", seconds=20)   # returns at once; passes through again in 20 s
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import struct
import threading
import time

logger = logging.getLogger(__name__)

MODES = ("pass", "refuse", "stall")
_POLL_S = 0.05  # how soon a pipe sees a change of mode


class FlakyProxy:
    """Listens on 127.0.0.1 (a free port) and pipes connections to ``host:port``.

    Args:
        host: the upstream server's address.
        port: its port.
    """

    def __init__(self, host: str, port: int):
        self.upstream = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_POLL_S)
        self._lock = threading.Lock()
        self._mode = "pass"
        self._until = 0.0  # when the outage ends (time.monotonic)
        self._generation = 0  # bumped at each outage: pipes opened before it are ended
        self._closed = threading.Event()
        self._held: list[socket.socket] = []  # accepted while stalled, never answered
        self.outages: list[tuple[str, float, float]] = []  # (mode, start, end) monotonic
        self.refused = 0  # connections refused or held during outages
        self._thread = threading.Thread(target=self._serve, name="flaky-proxy", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._listener.getsockname()[1]

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def mode(self) -> str:
        """``pass``, or the outage going on now."""
        with self._lock:
            if self._mode != "pass" and time.monotonic() >= self._until:
                self._end_outage()
            return self._mode

    def outage(self, mode: str, seconds: float) -> None:
        """Starts an outage of ``mode`` (``refuse`` or ``stall``) that ends ``seconds`` from now;
        returns at once.

        Raises:
            ValueError: an unknown mode, or a duration that is not positive.
        """
        if mode not in ("refuse", "stall"):
            raise ValueError(f"mode must be 'refuse' or 'stall', not {mode!r}")
        if not seconds > 0:
            raise ValueError(f"seconds must be positive, not {seconds!r}")
        with self._lock:
            self._mode, self._generation = mode, self._generation + 1
            now = time.monotonic()
            self._until = now + seconds
            self.outages.append((mode, now, self._until))
        logger.warning("storage outage (%s) for %.1f s through %s", mode, seconds, self.host_port)

    def restore(self) -> None:
        """Ends the outage now (the connections it holds are closed)."""
        with self._lock:
            if self._mode != "pass":
                self._end_outage()
                mode, began, _ = self.outages[-1]
                self.outages[-1] = (mode, began, time.monotonic())

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)
        self._listener.close()
        with self._lock:
            self._release_held()

    def __enter__(self) -> FlakyProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- inside the threads ----------------------------------------------------------------

    def _end_outage(self) -> None:  # with the lock held
        self._mode = "pass"
        self._generation += 1  # the pipes frozen by a stall are ended, not resumed
        self._release_held()

    def _release_held(self) -> None:
        for held in self._held:
            with contextlib.suppress(OSError):
                held.close()
        self._held.clear()

    def _serve(self) -> None:
        while not self._closed.is_set():
            mode = self.mode  # also ends an outage that is over
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if mode == "refuse":
                self.refused += 1
                _reset(client)
                continue
            if mode == "stall":
                self.refused += 1
                with self._lock:
                    self._held.append(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                _reset(client)
                continue
            server.settimeout(None)  # from now on the server's pace is the client's business
            with self._lock:
                generation = self._generation
            threading.Thread(
                target=self._pipe, args=(client, server, generation), daemon=True
            ).start()

    def _pipe(self, client: socket.socket, server: socket.socket, generation: int) -> None:
        """Copies bytes both ways until both sides have closed (a side's close is passed on as
        a close, so the proxy is not seen between outages), the proxy closes, or an outage
        begins (refuse: reset now; stall: frozen until the outage ends, then reset)."""
        peer = {client: server, server: client}
        open_ = [client, server]  # the sides that may still send
        try:
            while open_ and not self._closed.is_set():
                with self._lock:
                    ended = self._generation != generation
                    stalled = self._mode == "stall"
                if ended and not stalled:
                    return
                if stalled:  # neither side hears anything
                    time.sleep(_POLL_S)
                    continue
                readable, _, _ = select.select(open_, [], [], _POLL_S)
                for source in readable:
                    data = source.recv(1 << 16)
                    if data:
                        peer[source].sendall(data)
                    else:  # the source closed its side: close the same side to its peer
                        open_.remove(source)
                        with contextlib.suppress(OSError):
                            peer[source].shutdown(socket.SHUT_WR)
        except OSError:
            return
        finally:
            for sock in (client, server):
                if open_:  # cut short (an outage, the proxy's close, an error): reset
                    _reset(sock)
                else:  # both sides closed
                    sock.close()


def _reset(sock: socket.socket) -> None:
    """Closes ``sock`` with a reset (SO_LINGER 0), as a dead server's host answers."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()
