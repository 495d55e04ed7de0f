"""A push's bytes over a plain TCP (or TLS) connection instead of gRPC: the bulk transport.

Python gRPC's own stream of 1 MiB messages reaches 0.34-0.54 of a raw socket on this machine whatever
the message size (``docs/performance.md``), so no push over it reaches half the socket. The bulk
transport carries the very same messages (a serialized ``PushRequest`` header, then chunk messages as
``chunkwire`` writes them) in length-prefixed frames over a socket, and hands them to the node's one
receive path (``NodeRuntime.receive``) through the same ``authorize`` as the gRPC ``Push``: identity
from the verified client certificate with TLS, from the call's metadata on plaintext, exactly as
``Security.peer`` reads a gRPC call; every check, limit, metric and status is the gRPC path's.

Frames, little-endian, per push on a connection (connections are kept and reused by the client):

- client: ``u32 n`` + ``n`` bytes of JSON, the call's metadata (``[[key, value], ...]``);
  then per message ``u32 n`` (1 <= n <= ``MAX_FRAME``) + the serialized message, or, for a chunk
  message, ``u32 SPLIT | p`` (1 <= p <= ``MAX_PREFIX``) + the message's first ``p`` bytes (everything
  before the chunk's data: ``chunkwire.ChunkMessage.prefix``) + the data, as many bytes as that prefix
  declares (at most ``MAX_FRAME``); then ``u32 0``;
- server: ``u8 code`` (``grpc.StatusCode``'s number; 0 OK) + ``u32 n`` + ``n`` bytes: the serialized
  ``PushAck`` when OK, else the status's details (UTF-8).

A chunk frame's bytes are the chunk message's, as in the other frames; the prefix's length in front lets
the receiver learn the chunk's module, offset and length before its data, and read the data straight into
the module's receive buffer (``PushAssembler.place``, asked through ``_Frames.placer``): no frame buffer
and no copy out of it. The sender hands the prefix and the encoded blobs' own pieces to ``sendmsg``: no
copy either. Both sides' copies are then the kernel's alone, as with a raw socket.

A push refused before its last frame is answered at once; the server then reads and drops what the
client still sends (up to the frame limit per frame, for at most ``drain_s``) so that the answer is
not lost to a reset, and closes the connection.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import Any

import grpc

from services.common.chunkwire import (
    MAX_MESSAGE_BYTES,
    ChunkMessage,
    RawChunk,
    parse_chunk_prefix,
    parse_push_request,
    serialize_push_request,
)
from services.rpc import pb

log = logging.getLogger("hffm.bulk")

MAX_FRAME = MAX_MESSAGE_BYTES  # the largest message a gRPC push may carry too
SPLIT = 1 << 31  # a chunk frame: its prefix's length in the low bits
MAX_PREFIX = 64  # a chunk message's bytes before its data: 1 + 5 + (1 + 5) + (1 + 10) + (1 + 5) at most
_U32 = struct.Struct("<I")
_REPLY = struct.Struct("<BI")
_CODES = {c.value[0]: c for c in grpc.StatusCode}


class BulkError(grpc.RpcError):
    """A bulk push's failure with its status, read like a gRPC call's (``code()``, ``details()``): what a
    sender's call ends with, and on the listener what ``context.abort`` raises and what frames breaking
    the transport's rules raise (a ``grpc.RpcError``, so handlers pass it on as they pass on a gRPC call's
    own abort)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def _recv_into(
    sock: socket.socket, view: memoryview, stop: Callable[[], bool] | None = None, wait_s: float = 0.0
) -> bool:
    """Fill ``view`` from ``sock``; False at a clean end of stream before the first byte. With ``stop``:
    ``sock``'s timeout is a slice of the wait, ``stop()`` is asked after each, and the read gives up
    (ConnectionError) when it turns true, or with the slice's TimeoutError after ``wait_s`` in all."""
    n, got = len(view), 0
    deadline = time.monotonic() + wait_s
    while got < n:
        if stop is not None and stop():
            raise ConnectionError("the push ended")
        try:
            k = sock.recv_into(view[got:], n - got)
        except TimeoutError:
            if stop is None or time.monotonic() >= deadline:
                raise
            continue
        if k == 0:
            if got == 0:
                return False
            raise ConnectionError(f"connection closed {got} bytes into a {n}-byte read")
        got += k
    return True


def _recv_exact(sock: socket.socket, n: int) -> bytearray | None:
    """``n`` bytes from ``sock``; None at a clean end of stream before the first byte."""
    buf = bytearray(n)
    return buf if _recv_into(sock, memoryview(buf)) else None


class _Context:
    """What ``authorize`` and ``abort_for`` ask of a gRPC servicer context, for a bulk call: the
    call's metadata, the verified client certificate (TLS) and ``abort``."""

    def __init__(self, metadata: list[tuple[str, str]], peer_pem: str | None) -> None:
        self._metadata = tuple(metadata)
        self._pem = peer_pem

    def invocation_metadata(self):
        return self._metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_pem_cert": [self._pem.encode()]} if self._pem else {}

    def abort(self, code: grpc.StatusCode, details: str):
        raise BulkError(code, details)


class BulkServer:
    """Accepts bulk connections for one node and feeds each push to ``handle(frames, context)`` (the
    node's gRPC ``Push`` handler, ``ModuleExchangeServicer.Push``). Each connection is one thread, and
    ``max_connections`` bounds them: at the bound a new connection takes the place of the one idle
    longest (kept open by its client between pushes), or is closed at once when none is idle. A client
    gets ``handshake_timeout_s`` for its TLS handshake, ``idle_timeout_s`` between pushes and
    ``frame_timeout_s`` for each next read inside one."""

    def __init__(
        self,
        handle: Callable[[Iterator, _Context], pb.PushAck],
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        max_connections: int = 64,
        handshake_timeout_s: float = 10.0,
        idle_timeout_s: float = 60.0,
        frame_timeout_s: float = 30.0,
        drain_s: float = 2.0,
    ) -> None:
        self.handle, self.tls = handle, tls
        self.max_connections = max_connections
        self.handshake_timeout_s, self.idle_timeout_s = handshake_timeout_s, idle_timeout_s
        self.frame_timeout_s, self.drain_s = frame_timeout_s, drain_s
        self._idle: dict[socket.socket, float] = {}  # connections waiting for their next push, since
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.create_server((host, port), family=family, dualstack_ipv6=host == "::")
        self.port = self._sock.getsockname()[1]
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, name=f"bulk-accept-{self.port}", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                if len(self._conns) >= self.max_connections:
                    if not self._idle:
                        conn.close()
                        continue
                    oldest = min(self._idle, key=self._idle.__getitem__)
                    del self._idle[oldest]
                    self._conns.discard(oldest)
                    try:
                        oldest.shutdown(socket.SHUT_RDWR)  # its thread ends; its client opens another
                    except OSError:
                        pass
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="bulk-conn", daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        conn = raw
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.settimeout(self.handshake_timeout_s)
            pem = None
            if self.tls is not None:
                conn = self.tls.wrap_socket(raw, server_side=True)
                der = conn.getpeercert(binary_form=True)
                pem = ssl.DER_cert_to_PEM_cert(der) if der else None
            while not self._stopped.is_set():
                conn.settimeout(self.idle_timeout_s)
                with self._lock:
                    self._idle[raw] = time.monotonic()
                try:
                    head = _recv_exact(conn, 4)
                finally:
                    with self._lock:
                        self._idle.pop(raw, None)
                if head is None:
                    return
                conn.settimeout(self.frame_timeout_s)
                if not self._one_push(conn, _U32.unpack(head)[0], pem):
                    return
        except (OSError, ssl.SSLError, ConnectionError) as err:
            log.debug("bulk connection ended: %s", err)
        finally:
            with self._lock:
                self._conns.discard(raw)
                self._idle.pop(raw, None)
            try:
                conn.close()
            except OSError:
                pass

    def _one_push(self, conn: socket.socket, meta_len: int, pem: str | None) -> bool:
        """One push on ``conn``; True when the connection may carry another."""
        state = {"ended": False}
        try:
            if meta_len > 64 << 10:
                raise BulkError(grpc.StatusCode.INVALID_ARGUMENT, f"bulk call metadata of {meta_len} bytes")
            meta_raw = _recv_exact(conn, meta_len) if meta_len else bytearray()
            if meta_raw is None:
                raise ConnectionError("closed before the call's metadata")
            try:
                meta = [(str(k), str(v)) for k, v in json.loads(bytes(meta_raw) or b"[]")]
            except (ValueError, TypeError) as err:
                raise BulkError(grpc.StatusCode.INVALID_ARGUMENT, f"bulk call metadata: {err}") from None
            frames = _Frames(conn, state, self.frame_timeout_s)
            try:
                ack = self.handle(frames, _Context(meta, pem))
            finally:
                frames.close()  # the handler's reader thread reads no more: the socket is this thread's
            if not state["ended"]:  # the handler returned before the end frame (nothing may follow it)
                raise BulkError(grpc.StatusCode.INVALID_ARGUMENT, "frames after the push was complete")
            body = ack.SerializeToString()
            conn.sendall(_REPLY.pack(0, len(body)) + body)
            return True
        except BulkError as err:
            self._refuse(conn, err.code(), err.details(), state)
            return False

    def _refuse(self, conn: socket.socket, code: grpc.StatusCode, details: str, state: dict) -> None:
        body = details.encode()[: 16 << 10]
        try:
            conn.sendall(_REPLY.pack(code.value[0], len(body)) + body)
            if state["ended"]:
                return
            # read and drop what the client still sends, so that the answer is not lost to a reset
            deadline = time.monotonic() + self.drain_s
            conn.settimeout(self.drain_s)
            scratch = bytearray(1 << 16)
            while time.monotonic() < deadline and conn.recv_into(scratch):
                pass
        except (OSError, ssl.SSLError):
            pass

    def stop(self) -> None:
        self._stopped.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accept (a close alone leaves it listening)
        except OSError:
            pass
        try:
            self._sock.close()
        except OSError:
            pass
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Frames:
    """The messages of one push on ``conn``, read as the node's Push handler iterates them (on its reader
    thread: ``limits.TimedStream``). A client gone or silent mid-push (nothing for ``frame_timeout_s``)
    ends it as a gRPC call's stream would (CANCELLED, DEADLINE_EXCEEDED), not as a server error. A chunk
    frame's data is read into ``placer(index, offset, n)``'s buffer when the handler set one
    (``TimedStream.place_into``), else into a buffer of its own."""

    _SLICE_S = 0.25  # reads wait this long at a time, so that ``close`` is seen

    def __init__(self, conn: socket.socket, state: dict, frame_timeout_s: float) -> None:
        self.conn, self.state, self.frame_timeout_s = conn, state, frame_timeout_s
        self.placer: Callable[[int, int, int], memoryview] | None = None
        self._lock = threading.Lock()  # held while a frame is read
        self._closing = False
        conn.settimeout(min(self._SLICE_S, frame_timeout_s))

    def close(self) -> None:
        """No more frames are read: a read in progress gives up within ``_SLICE_S``, so that afterwards the
        connection's own thread alone answers and drains it (a TLS connection must never be read or
        written by two threads at once)."""
        self._closing = True
        with self._lock:
            self.conn.settimeout(self.frame_timeout_s)

    def _fill(self, view: memoryview) -> bool:
        """Fill ``view``; False at a clean end of stream before the first byte."""
        return _recv_into(self.conn, view, lambda: self._closing, self.frame_timeout_s)

    def _exact(self, n: int, what: str) -> bytearray:
        buf = bytearray(n)
        if not self._fill(memoryview(buf)):
            raise ConnectionError(f"closed {what}")
        return buf

    def __iter__(self) -> _Frames:
        return self

    def __next__(self) -> RawChunk | pb.PushRequest:
        with self._lock:
            if self._closing:
                raise StopIteration
            try:
                return self._next()
            except TimeoutError:
                raise BulkError(grpc.StatusCode.DEADLINE_EXCEEDED, "the client sent nothing in time") from None
            except (OSError, ssl.SSLError) as err:  # ConnectionError included
                raise BulkError(grpc.StatusCode.CANCELLED, f"the client went away: {err}") from None

    def _next(self) -> RawChunk | pb.PushRequest:
        n = _U32.unpack(self._exact(4, "inside a push"))[0]
        if n == 0:
            self.state["ended"] = True
            raise StopIteration
        if n & SPLIT:
            return self._chunk(n & ~SPLIT)
        if n > MAX_FRAME:
            raise BulkError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"a frame of {n} bytes (at most {MAX_FRAME})")
        return parse_push_request(self._exact(n, "inside a frame"))

    def _chunk(self, p: int) -> RawChunk:
        if not 0 < p <= MAX_PREFIX:
            why = f"a chunk frame with a {p}-byte prefix (1 to {MAX_PREFIX})"
            raise BulkError(grpc.StatusCode.INVALID_ARGUMENT, why)
        prefix = self._exact(p, "inside a frame")
        head = parse_chunk_prefix(prefix)
        if head is None:
            raise BulkError(grpc.StatusCode.INVALID_ARGUMENT, "a chunk frame whose prefix is not a chunk message's")
        index, offset, n = head
        if p + n > MAX_FRAME:
            raise BulkError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"a frame of {p + n} bytes (at most {MAX_FRAME})")
        placer = self.placer
        if placer is not None:
            target = placer(index, offset, n)  # a ModuleError (out of bounds) ends the push with its status
            if not self._fill(target):
                raise ConnectionError("closed inside a frame")
            return RawChunk(index, offset, target, b"", True)
        buf = bytearray(p + n)
        buf[:p] = prefix
        if not self._fill(memoryview(buf)[p:]):
            raise ConnectionError("closed inside a frame")
        return RawChunk(index, offset, memoryview(buf)[p:], buf)


def _send_frame(sock: socket.socket, msg: Any) -> None:
    """A push message with its length in front; a chunk message as a chunk frame, its prefix and the
    blobs' pieces given to ``sendmsg`` as they are (TLS: ``SSLSocket`` has no ``sendmsg``; each part is
    written, and encrypted, from where it is)."""
    if isinstance(msg, ChunkMessage) and msg.pieces:
        parts = [_U32.pack(SPLIT | len(msg.prefix)) + msg.prefix, *msg.pieces]
    else:
        body = serialize_push_request(msg)
        parts = [_U32.pack(len(body)), body]
    if isinstance(sock, ssl.SSLSocket):
        for part in parts:
            sock.sendall(part)
        return
    parts = [memoryview(p).cast("B") for p in parts]
    while parts:
        sent = sock.sendmsg(parts)
        while parts and sent >= len(parts[0]):
            sent -= len(parts[0])
            parts.pop(0)
        if parts and sent:
            parts[0] = parts[0][sent:]


class _Call:
    """A bulk push in flight, read like a gRPC call's future (``done``, ``cancel``, ``cancelled``,
    ``exception(timeout)``, ``result(timeout)``), so the sender's retry and abort logic is the same."""

    def __init__(self) -> None:
        self.future: Future = Future()
        self.sock: socket.socket | None = None
        self._cancelled = False

    def done(self) -> bool:
        return self.future.done()

    def cancel(self) -> bool:
        if self.future.done():
            return False
        self._cancelled = True
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return True

    def cancelled(self) -> bool:
        return self._cancelled

    def exception(self, timeout: float | None = None):
        try:
            return self.future.exception(timeout)
        except TimeoutError:
            raise grpc.FutureTimeoutError() from None

    def result(self, timeout: float | None = None):
        try:
            return self.future.result(timeout)
        except TimeoutError:
            raise grpc.FutureTimeoutError() from None


class BulkPush:
    """``push.future(requests, timeout=, metadata=)`` over the bulk transport to one receiver, like
    ``client.push_callable``'s gRPC call. Connections are kept (one per push in flight) and reused."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None = None, server_hostname: str = "") -> None:
        self.host, self.port, self.tls, self.server_hostname = host, port, tls, server_hostname
        self._lock = threading.Lock()
        self._idle: list[socket.socket] = []
        self.broken = False  # a push got no answer (refused, reset): push over gRPC once, then ask again

    def _connect(self, timeout: float) -> socket.socket:
        while True:  # a kept connection the receiver closed meanwhile (idle timeout, restart) is dropped
            with self._lock:
                if not self._idle:
                    break
                s = self._idle.pop()
            if not select.select([s], [], [], 0)[0]:  # nothing to read on a kept one: it is still open
                return s
            s.close()
        try:
            s = socket.create_connection((self.host, self.port), timeout=timeout)
        except OSError:
            self.broken = True
            raise
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls is not None:
            s = self.tls.wrap_socket(s, server_hostname=self.server_hostname or self.host)
        return s

    def future(
        self, requests: Iterable[Any], timeout: float | None = None, metadata: Iterable[tuple[str, str]] | None = None
    ) -> _Call:
        call = _Call()
        threading.Thread(
            target=self._run, args=(call, requests, timeout, list(metadata or ())), name="bulk-push", daemon=True
        ).start()
        return call

    def __call__(self, requests, timeout=None, metadata=None):
        return self.future(requests, timeout, metadata).result()

    def _run(self, call: _Call, requests: Iterable[Any], timeout: float | None, metadata) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            call.future.set_result(self._push(call, requests, deadline, metadata))
        except BulkError as err:
            call.future.set_exception(err)
        except Exception as err:  # noqa: BLE001 - a failed call is its status, like gRPC's
            self.broken = self.broken or not call.cancelled()  # no answer came: the sender tries gRPC next
            if call.cancelled():
                call.future.set_exception(BulkError(grpc.StatusCode.CANCELLED, "cancelled"))
            elif deadline is not None and time.monotonic() >= deadline:
                call.future.set_exception(BulkError(grpc.StatusCode.DEADLINE_EXCEEDED, f"bulk push: {err}"))
            else:
                call.future.set_exception(BulkError(grpc.StatusCode.UNAVAILABLE, f"bulk push: {err}"))

    def _push(self, call: _Call, requests: Iterable[Any], deadline: float | None, metadata) -> pb.PushAck:
        left = None if deadline is None else max(0.001, deadline - time.monotonic())
        sock = self._connect(left or 30.0)
        call.sock = sock
        sock.settimeout(left)
        meta = json.dumps(metadata).encode()
        reusable = False
        try:
            send_error: Exception | None = None
            try:
                sock.sendall(_U32.pack(len(meta)) + meta)
                for req in requests:
                    if call.cancelled():
                        raise BulkError(grpc.StatusCode.CANCELLED, "cancelled")
                    _send_frame(sock, req)
                    if deadline is not None:
                        sock.settimeout(max(0.001, deadline - time.monotonic()))
                sock.sendall(_U32.pack(0))
            except (OSError, ssl.SSLError) as err:
                send_error = err  # the receiver may have refused the push early: read its answer
            head = _recv_exact(sock, _REPLY.size)
            if head is None:
                raise ConnectionError(f"closed before the answer ({send_error or 'no error sending'})")
            code, n = _REPLY.unpack(bytes(head))
            body = bytes(_recv_exact(sock, n) or b"") if n else b""
            if code != 0:
                raise BulkError(_CODES.get(code, grpc.StatusCode.UNKNOWN), body.decode(errors="replace"))
            if send_error is not None:
                raise ConnectionError(str(send_error))
            reusable = True
            return pb.PushAck.FromString(body)
        finally:
            call.sock = None
            if reusable and not call.cancelled():
                sock.settimeout(None)
                with self._lock:
                    self._idle.append(sock)
            else:
                try:
                    sock.close()
                except OSError:
                    pass

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for s in idle:
            s.close()
