#!/usr/bin/python3
"""h2check: an h2spec-like HTTP/2 server conformance and abuse driver (Debian's python3-h2 stack).

    /usr/bin/python3 spec/peers/h2check.py HOST PORT [--tls] [--case SUBSTRING]... [--list] [--json]
        [--routes moonwire|nghttpd] [--timeout-scale S] [--read-timeout S] [--max-time S]
    /usr/bin/python3 spec/peers/h2check.py --make-docroot DIR     (files for an nghttpd run)
    /usr/bin/python3 spec/peers/h2check.py --lax-server PORT      (a deliberately wrong server)

Opens raw TCP (or TLS with ALPN "h2", no certificate verification) connections, writes the
preface and hand-built frames (hyperframe for framing, an hpack Encoder or hand-coded HPACK for
header blocks, so invalid input never meets a client state machine) and judges the server's
reaction: the right GOAWAY / RST_STREAM error code, a closed connection, or a correct response.
Every read has a timeout (--read-timeout, 2 s), a case has a budget (10 s; the timeout cases
scale with --timeout-scale), the whole run is bounded (--max-time).

Output: one line per case, `PASS <id> <name>`, `FAIL <id> <name>: <reason>` or
`SKIP <id> <name>: <reason>` (a route the server does not have), then `N passed, N failed`
(plus `, N skipped`). Exit status 1 when a case failed. --json prints a JSON summary instead.

Ids: generic/... (h2spec's generic group), http2/<RFC 9113 section>/<n>, hpack/<RFC 7541
section>/<n>, abuse/... (moonwire's limits against hostile clients; after each abuse case a
fresh connection must still be served). A connection error passes on a GOAWAY with the expected
code or on the connection being closed; a stream error passes on RST_STREAM with the expected
code, or on the corresponding connection error; a malformed request passes on RST_STREAM
PROTOCOL_ERROR or a 400 response.

Routes the server must provide (--routes moonwire, the default): see ROUTE_* below.
--routes nghttpd maps them onto `nghttpd --no-tls --echo-upload --trailer 'x-checksum: nghttpd'
-d DIR PORT` serving the files written by --make-docroot DIR; cases needing /slow or /stats SKIP.
--lax-server PORT runs a server that answers every request and never reports an error, to check
that the error cases do not pass vacuously (against it, only the positive cases may pass).
"""
import argparse
import json
import os
import queue
import socket
import ssl
import struct
import sys
import threading
import time

from hpack import Decoder, Encoder
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hyperframe.frame import (ContinuationFrame, DataFrame, Frame, GoAwayFrame, HeadersFrame,
                              PingFrame, PriorityFrame, RstStreamFrame, SettingsFrame,
                              WindowUpdateFrame)

# ---- routes of the test server ---------------------------------------------------------------
ROUTE_ROOT = "/"                # GET -> 200 "hello"
ROUTE_ECHO = "/echo"            # POST -> 200 with the request body
ROUTE_SLOW = "/slow"            # GET -> 200 after 2 s (a running handler)
ROUTE_BIG = "/big?n=%d"         # GET -> n bytes of body
ROUTE_TRAILERS = "/trailers"    # GET -> 200 with a body and a trailer x-checksum
ROUTE_STATS = "/stats"          # GET -> {"handlers_started":N,"handlers_running":M}
ROOT_BODY = b"hello"
SLOW_SECONDS = 2.0
TRAILER_NAME = "x-checksum"

# nghttpd (reference server): files written by --make-docroot
NGHTTPD_ROOT = "/index.html"
NGHTTPD_BIG = "/big.bin"
NGHTTPD_BIG_SIZE = 100000

# ---- protocol constants ----------------------------------------------------------------------
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, \
    CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIO_FLAG = 0x4, 0x8, 0x20
ERRORS = ["NO_ERROR", "PROTOCOL_ERROR", "INTERNAL_ERROR", "FLOW_CONTROL_ERROR",
          "SETTINGS_TIMEOUT", "STREAM_CLOSED", "FRAME_SIZE_ERROR", "REFUSED_STREAM", "CANCEL",
          "COMPRESSION_ERROR", "CONNECT_ERROR", "ENHANCE_YOUR_CALM", "INADEQUATE_SECURITY",
          "HTTP_1_1_REQUIRED"]
(NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR, SETTINGS_TIMEOUT, STREAM_CLOSED,
 FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, CONNECT_ERROR, ENHANCE_YOUR_CALM,
 INADEQUATE_SECURITY, HTTP_1_1_REQUIRED) = range(14)
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS, S_INITIAL_WINDOW_SIZE, \
    S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = range(1, 7)
S_ENABLE_CONNECT_PROTOCOL, S_NO_RFC7540_PRIORITIES = 8, 9
MAX_WINDOW = 2 ** 31 - 1

HUFFMAN = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)


def ename(code):
    return ERRORS[code] if 0 <= code < len(ERRORS) else "0x%x" % code


def enames(codes):
    return "/".join(ename(c) for c in codes)


class Fail(Exception):
    pass


class Skip(Exception):
    pass


class Closed(Exception):
    pass


class WriteBlocked(Exception):
    pass


# ---- frame and HPACK building ----------------------------------------------------------------
def raw_frame(ftype, flags, sid, payload=b"", length=None):
    """A frame as bytes, any field possibly invalid (length defaults to len(payload))."""
    n = len(payload) if length is None else length
    return struct.pack(">I", n)[1:] + bytes([ftype, flags]) + struct.pack(">I", sid) + payload


def hp_int(value, prefix, first=0):
    top = (1 << prefix) - 1
    if value < top:
        return bytes([first | value])
    out = [first | top]
    value -= top
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def hp_str(s, huffman=False):
    b = s.encode("latin-1") if isinstance(s, str) else s
    if huffman:
        b = HUFFMAN.encode(b)
        return hp_int(len(b), 7, 0x80) + b
    return hp_int(len(b), 7, 0) + b


def hp_lit(name, value, mode="plain", huffman=False):
    """A literal field: name is a str (new name) or an int (static/dynamic index).
    mode: plain (without indexing), inc (incremental indexing), never (never indexed)."""
    prefix, first = {"plain": (4, 0x00), "inc": (6, 0x40), "never": (4, 0x10)}[mode]
    if isinstance(name, int):
        return hp_int(name, prefix, first) + hp_str(value, huffman)
    return bytes([first]) + hp_str(name, huffman) + hp_str(value, huffman)


def hp_indexed(index):
    return hp_int(index, 7, 0x80)


def hp_size_update(size):
    return hp_int(size, 5, 0x20)


def plain_block(fields):
    """A header block of literals without indexing (never touches the dynamic tables)."""
    return b"".join(hp_lit(n, v) for n, v in fields)


class Stream:
    def __init__(self):
        self.headers = None
        self.trailers = None
        self.data = bytearray()
        self.end = False
        self.rst = None
        self.data_frames = 0

    @property
    def status(self):
        for n, v in self.headers or ():
            if n == ":status":
                return int(v)
        return None


class RawFrame:
    """A frame hyperframe refused to parse."""

    def __init__(self, ftype, flags, sid, body, err):
        self.type, self.flags, self.stream_id, self.body, self.err = ftype, flags, sid, body, err


# ---- a client connection ---------------------------------------------------------------------
class Conn:
    def __init__(self, ctx, rcvbuf=None):
        self.ctx = ctx
        family, kind, proto, _, addr = socket.getaddrinfo(ctx.host, ctx.port, 0,
                                                          socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(ctx.read_timeout)
        try:
            sock.connect(addr)
        except OSError as e:
            sock.close()
            raise Fail("connect: %s" % e) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ctx.tls:
            tctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            tctx.check_hostname = False
            tctx.verify_mode = ssl.CERT_NONE
            tctx.set_alpn_protocols(["h2"])
            try:
                sock = tctx.wrap_socket(sock, server_hostname=ctx.host)
            except (OSError, ssl.SSLError) as e:
                raise Fail("TLS handshake: %s" % e) from None
            if sock.selected_alpn_protocol() != "h2":
                raise Fail("ALPN selected %r, not h2" % sock.selected_alpn_protocol())
        self.sock = sock
        ctx.conns.append(self)
        self.buf = bytearray()
        self.enc = Encoder()
        self.dec = Decoder()
        self.dec.max_header_list_size = 1 << 26
        self.plain = False          # True: requests use literals without indexing
        self.auto_ack = True        # ACK the server's SETTINGS
        self.auto_window = True     # give back every DATA byte (connection and stream)
        self.peer_settings = {}
        self.settings_acks = 0
        self.goaway = None
        self.closed = False
        self.streams = {}
        self.hblock = None
        self.frames = []
        self.next_sid = 1

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def stream(self, sid):
        st = self.streams.get(sid)
        if st is None:
            st = self.streams[sid] = Stream()
        return st

    def new_sid(self):
        sid = self.next_sid
        self.next_sid += 2
        return sid

    # -- output
    def send(self, data, timeout=None):
        if self.closed:
            raise Closed("connection already closed")
        self.sock.settimeout(timeout or self.ctx.write_timeout)
        try:
            self.sock.sendall(data)
        except socket.timeout:
            raise WriteBlocked("write blocked for %.1f s" % (timeout or self.ctx.write_timeout))
        except (OSError, ssl.SSLError) as e:
            self.closed = True
            raise Closed("write: %s" % e) from None

    def send_frame(self, frame):
        self.send(frame.serialize())

    def raw(self, ftype, flags, sid, payload=b"", length=None):
        self.send(raw_frame(ftype, flags, sid, payload, length))

    def settings(self, values=None, ack=False):
        f = SettingsFrame(0, settings=values or {})
        if ack:
            f.flags.add("ACK")
        self.send_frame(f)

    def ping(self, payload=b"h2check!", ack=False):
        f = PingFrame(0, opaque_data=payload)
        if ack:
            f.flags.add("ACK")
        self.send_frame(f)

    def window_update(self, sid, inc):
        self.send_frame(WindowUpdateFrame(sid, window_increment=inc))

    def rst(self, sid, code=CANCEL):
        self.send_frame(RstStreamFrame(sid, error_code=code))

    def data(self, sid, payload, end_stream=True, pad=None):
        f = DataFrame(sid, data=payload)
        if end_stream:
            f.flags.add("END_STREAM")
        if pad is not None:
            f.flags.add("PADDED")
            f.pad_length = pad
        self.send_frame(f)

    def headers_frame(self, sid, block, end_stream=True, end_headers=True, pad=None,
                      priority=None):
        f = HeadersFrame(sid, data=block)
        if end_stream:
            f.flags.add("END_STREAM")
        if end_headers:
            f.flags.add("END_HEADERS")
        if pad is not None:
            f.flags.add("PADDED")
            f.pad_length = pad
        if priority is not None:
            f.flags.add("PRIORITY")
            f.depends_on, f.stream_weight, f.exclusive = priority
        return f.serialize()

    def continuation(self, sid, block, end_headers=True):
        f = ContinuationFrame(sid, data=block)
        if end_headers:
            f.flags.add("END_HEADERS")
        self.send_frame(f)

    def fields(self, method="GET", path=None, extra=(), body=None):
        ctx = self.ctx
        h = [(":method", method), (":scheme", "https" if ctx.tls else "http"),
             (":path", path or ctx.routes.root), (":authority", ctx.authority)]
        if body is not None:
            h.append(("content-length", str(len(body))))
        return h + list(extra)

    def block(self, fields):
        return plain_block(fields) if self.plain else self.enc.encode(fields)

    def request(self, method="GET", path=None, extra=(), body=None, sid=None, end_stream=None,
                **kw):
        """Sends a request (HEADERS, then DATA when body is given); returns its stream id."""
        sid = sid or self.new_sid()
        block = self.block(self.fields(method, path, extra, body))
        if end_stream is None:
            end_stream = body is None
        self.send(self.headers_frame(sid, block, end_stream=end_stream, **kw))
        if body is not None:
            self.data(sid, body, end_stream=True)
        return sid

    def handshake(self, settings=None, preface=PREFACE):
        """Preface + our SETTINGS; waits for the server's SETTINGS (which we ACK)."""
        self.send(preface + SettingsFrame(0, settings=settings or {}).serialize())
        while True:
            try:
                f = self.read()
            except Closed as e:
                raise Fail("connection closed during the handshake (%s)" % e) from None
            if f is None:
                raise Fail("no SETTINGS from the server within %.1f s" % self.ctx.read_timeout)
            if isinstance(f, SettingsFrame) and "ACK" not in f.flags:
                return self
            if isinstance(f, GoAwayFrame):
                raise Fail("GOAWAY %s during the handshake" % ename(f.error_code))

    # -- input
    def _fill(self, n, deadline):
        first = True
        while len(self.buf) < n:
            if self.closed:
                raise Closed("EOF")
            remaining = deadline - time.monotonic()
            if remaining <= 0 and not first:
                return False
            first = False
            self.sock.settimeout(max(remaining, 0))
            try:
                chunk = self.sock.recv(65536)
            except (socket.timeout, BlockingIOError, ssl.SSLWantReadError):
                if remaining <= 0:
                    return False
                continue
            except (OSError, ssl.SSLError) as e:
                self.closed = True
                raise Closed("read: %s" % e) from None
            if not chunk:
                self.closed = True
                raise Closed("EOF")
            self.buf += chunk
        return True

    def read(self, timeout=None):
        """The next frame, None on timeout; raises Closed once the connection is closed."""
        timeout = self.ctx.read_timeout if timeout is None else timeout
        left = self.ctx.case_left()
        if left <= 0:
            raise Fail("case exceeded its time budget")
        deadline = time.monotonic() + min(timeout, left)
        if not self._fill(9, deadline):
            return None
        length = int.from_bytes(self.buf[:3], "big")
        if not self._fill(9 + length, deadline):
            return None
        hdr, body = bytes(self.buf[:9]), bytes(self.buf[9:9 + length])
        del self.buf[:9 + length]
        try:
            f, _ = Frame.parse_frame_header(memoryview(hdr))
            f.parse_body(memoryview(body))
        except Exception as e:  # noqa: BLE001 -- any parse failure: keep the raw frame
            f = RawFrame(hdr[3], hdr[4], int.from_bytes(hdr[5:9], "big") & MAX_WINDOW, body, e)
        f.wire_len = length
        self.frames.append(f)
        self._process(f)
        return f

    def _try_send(self, data):
        try:
            self.send(data)
        except (Closed, WriteBlocked):
            pass

    def _process(self, f):
        if isinstance(f, SettingsFrame):
            if "ACK" in f.flags:
                self.settings_acks += 1
            else:
                self.peer_settings.update(f.settings)
                if self.auto_ack:
                    self._try_send(raw_frame(SETTINGS, ACK, 0))
        elif isinstance(f, HeadersFrame):
            self.hblock = (f.stream_id, bytearray(f.data), "END_STREAM" in f.flags)
            if "END_HEADERS" in f.flags:
                self._end_block()
        elif isinstance(f, ContinuationFrame):
            if self.hblock:
                self.hblock[1].extend(f.data)
                if "END_HEADERS" in f.flags:
                    self._end_block()
        elif isinstance(f, DataFrame):
            st = self.stream(f.stream_id)
            st.data += f.data
            st.data_frames += 1
            if "END_STREAM" in f.flags:
                st.end = True
            if self.auto_window and f.wire_len:
                out = WindowUpdateFrame(0, window_increment=f.wire_len).serialize()
                if not st.end:
                    out += WindowUpdateFrame(f.stream_id, window_increment=f.wire_len).serialize()
                self._try_send(out)
        elif isinstance(f, RstStreamFrame):
            self.stream(f.stream_id).rst = f.error_code
        elif isinstance(f, GoAwayFrame):
            self.goaway = f
        elif isinstance(f, PingFrame) and "ACK" not in f.flags and self.auto_ack:
            self._try_send(raw_frame(PING, ACK, 0, f.opaque_data))

    def _end_block(self):
        sid, block, end = self.hblock
        self.hblock = None
        st = self.stream(sid)
        try:
            fields = [(n.decode("latin-1") if isinstance(n, bytes) else n,
                       v.decode("latin-1") if isinstance(v, bytes) else v)
                      for n, v in self.dec.decode(bytes(block), raw=True)]
        except Exception as e:  # noqa: BLE001
            raise Fail("cannot decode the server's header block: %s" % e) from None
        if st.headers is None or (st.status is not None and st.status < 200):
            st.headers = fields
        else:
            st.trailers = fields
        if end:
            st.end = True

    def drain(self):
        """Reads what is already there without waiting; returns False once closed."""
        try:
            while self.read(timeout=0) is not None:
                pass
        except Closed:
            return False
        return True

    # -- judgements
    def response(self, sid, what="response"):
        st = self.stream(sid)
        while not st.end:
            if st.rst is not None:
                raise Fail("stream %d reset with %s" % (sid, ename(st.rst)))
            try:
                f = self.read()
            except Closed as e:
                raise Fail("connection closed before the %s on stream %d (%s)" % (what, sid, e)) \
                    from None
            if f is None:
                raise Fail("no complete %s on stream %d within %.1f s" % (
                    what, sid, self.ctx.read_timeout))
            if isinstance(f, GoAwayFrame) and (f.error_code != NO_ERROR or
                                               f.last_stream_id < sid):
                raise Fail("GOAWAY %s before the %s on stream %d" % (ename(f.error_code), what, sid))
        if st.rst not in (None, NO_ERROR):
            raise Fail("stream %d reset with %s" % (sid, ename(st.rst)))
        return st

    def ok(self, sid, body=None, status=200):
        st = self.response(sid)
        if st.status != status:
            raise Fail("stream %d: status %s, expected %d" % (sid, st.status, status))
        if body is not None and bytes(st.data) != body:
            raise Fail("stream %d: body %r..., expected %r..." % (sid, bytes(st.data[:40]),
                                                                 body[:40]))
        return st

    def alive(self, what="the connection to stay open"):
        """PING round trip: the connection still works and no error was reported."""
        payload = os.urandom(8)
        try:
            self.ping(payload)
        except (Closed, WriteBlocked) as e:
            raise Fail("expected %s: %s" % (what, e)) from None
        while True:
            try:
                f = self.read()
            except Closed as e:
                raise Fail("expected %s, but it was closed (%s)" % (what, e)) from None
            if f is None:
                raise Fail("expected %s: no PING ACK within %.1f s" % (what, self.ctx.read_timeout))
            if isinstance(f, GoAwayFrame):
                raise Fail("expected %s, got GOAWAY %s" % (what, ename(f.error_code)))
            if isinstance(f, RstStreamFrame) and f.stream_id not in self.allowed_rst():
                raise Fail("expected %s, got RST_STREAM %s on stream %d" % (
                    what, ename(f.error_code), f.stream_id))
            if isinstance(f, PingFrame) and "ACK" in f.flags and f.opaque_data == payload:
                return

    def allowed_rst(self):
        return getattr(self, "rst_ok", ())

    def conn_error(self, *codes):
        """A connection error: GOAWAY with one of `codes`, or the connection closed."""
        while True:
            try:
                f = self.read()
            except Closed:
                return "closed"
            if f is None:
                seen = ["RST_STREAM %s on stream %d" % (ename(x.error_code), x.stream_id)
                        for x in self.frames if isinstance(x, RstStreamFrame)]
                raise Fail("expected GOAWAY %s or a closed connection, got neither within %.1f s%s"
                           % (enames(codes), self.ctx.read_timeout,
                              " (saw %s)" % ", ".join(seen[:3]) if seen else ""))
            if isinstance(f, GoAwayFrame):
                if f.error_code in codes:
                    return "goaway"
                raise Fail("GOAWAY %s, expected %s" % (ename(f.error_code), enames(codes)))

    def stream_error(self, sid, *codes, served_ok=()):
        """A stream error on sid: RST_STREAM with one of `codes` (or the same as a connection
        error). served_ok: statuses of a response that also pass (e.g. 400 for malformed)."""
        st = self.stream(sid)
        while True:
            if st.rst is not None:
                if st.rst in codes:
                    return "rst"
                raise Fail("RST_STREAM %s on stream %d, expected %s" % (
                    ename(st.rst), sid, enames(codes)))
            if st.status is not None and st.status in served_ok:
                return "status %d" % st.status
            if st.end:
                raise Fail("stream %d was answered with status %s, expected RST_STREAM %s%s" % (
                    sid, st.status, enames(codes),
                    "".join(" or %d" % s for s in served_ok)))
            try:
                f = self.read()
            except Closed:
                return "closed"
            if f is None:
                raise Fail("expected RST_STREAM %s on stream %d, got nothing within %.1f s" % (
                    enames(codes), sid, self.ctx.read_timeout))
            if isinstance(f, GoAwayFrame):
                if f.error_code in codes:
                    return "goaway"
                raise Fail("GOAWAY %s, expected %s" % (ename(f.error_code), enames(codes)))

    def malformed(self, sid):
        return self.stream_error(sid, PROTOCOL_ERROR, served_ok=(400,))

    def closed_within(self, seconds):
        """Waits up to `seconds` for the server to close (a GOAWAY counts); returns how."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                f = self.read(timeout=min(self.ctx.read_timeout, end - time.monotonic()))
            except Closed:
                return "closed"
            if isinstance(f, GoAwayFrame):
                return "goaway %s" % ename(f.error_code)
        return None


# ---- the run ---------------------------------------------------------------------------------
class Routes:
    def __init__(self, kind):
        self.kind = kind
        if kind == "nghttpd":
            self.root, self.echo, self.slow, self.stats = NGHTTPD_ROOT, "/echo", None, None
            self.trailers = NGHTTPD_ROOT
        else:
            self.root, self.echo, self.slow, self.stats = ROUTE_ROOT, ROUTE_ECHO, ROUTE_SLOW, \
                ROUTE_STATS
            self.trailers = ROUTE_TRAILERS

    def big(self, n):
        """(path, length) of a body of about n bytes."""
        if self.kind == "nghttpd":
            return NGHTTPD_BIG, NGHTTPD_BIG_SIZE
        return ROUTE_BIG % n, n


class Ctx:
    def __init__(self, args):
        self.host, self.port, self.tls = args.host, args.port, args.tls
        self.authority = "%s:%d" % (args.host, args.port)
        self.read_timeout = args.read_timeout
        self.write_timeout = args.read_timeout
        self.scale = args.timeout_scale
        self.routes = Routes(args.routes)
        self.deadline = time.monotonic()
        self.conns = []

    def case_left(self):
        return self.deadline - time.monotonic()

    def conn(self, **kw):
        return Conn(self, **kw)

    def need(self, what):
        path = getattr(self.routes, what)
        if path is None:
            raise Skip("route /%s is off under --routes %s" % (what, self.routes.kind))
        return path

    def stats(self):
        c = self.conn().handshake()
        sid = c.request(path=self.need("stats"))
        st = c.ok(sid)
        c.close()
        try:
            return json.loads(bytes(st.data))
        except ValueError:
            raise Fail("/stats is not JSON: %r" % bytes(st.data[:80])) from None


CASES = []


def case(cid, name, budget=10.0, abuse=False):
    def deco(fn):
        CASES.append({"id": cid, "name": name, "fn": fn, "budget": budget, "abuse": abuse})
        return fn
    return deco


def fresh_get_ok(ctx):
    c = ctx.conn().handshake()
    c.ok(c.request(), ROOT_BODY)
    c.close()


# =============================================================================================
# generic: h2spec's generic group (things a server must simply accept and serve)
# =============================================================================================
def half_closed_remote(ctx):
    """A stream the server holds half-closed (remote): our window is 0, so it cannot send DATA."""
    c = ctx.conn().handshake({S_INITIAL_WINDOW_SIZE: 0})
    sid = c.request()
    return c, sid


@case("generic/1/1", "preface and SETTINGS: the server sends SETTINGS and ACKs ours")
def _(ctx):
    c = ctx.conn().handshake()
    while c.settings_acks == 0:
        try:
            f = c.read()
        except Closed:
            raise Fail("closed before ACKing our SETTINGS") from None
        if f is None:
            raise Fail("no SETTINGS ACK within %.1f s" % ctx.read_timeout)


@case("generic/2/1", "PRIORITY on an idle stream is accepted")
def _(ctx):
    c = ctx.conn().handshake()
    c.send_frame(PriorityFrame(3, depends_on=0, stream_weight=16))
    c.alive()
    c.ok(c.request(sid=5), ROOT_BODY)


@case("generic/2/2", "WINDOW_UPDATE on a half-closed (remote) stream is accepted")
def _(ctx):
    c, sid = half_closed_remote(ctx)
    c.window_update(sid, 1)
    c.alive()


@case("generic/2/3", "PRIORITY on a half-closed (remote) stream is accepted")
def _(ctx):
    c, sid = half_closed_remote(ctx)
    c.send_frame(PriorityFrame(sid, depends_on=0, stream_weight=200))
    c.alive()


@case("generic/2/4", "RST_STREAM on a half-closed (remote) stream is accepted")
def _(ctx):
    c, sid = half_closed_remote(ctx)
    c.rst(sid, CANCEL)
    c.alive()


@case("generic/2/5", "PRIORITY on a closed stream is accepted")
def _(ctx):
    c = ctx.conn().handshake()
    sid = c.request()
    c.ok(sid)
    c.send_frame(PriorityFrame(sid, depends_on=0, stream_weight=16))
    c.alive()


@case("generic/3.1/1", "a DATA frame (POST) is served")
def _(ctx):
    c = ctx.conn().handshake()
    c.ok(c.request("POST", ctx.routes.echo, body=b"abc"), b"abc")


@case("generic/3.1/2", "several DATA frames (POST) are served")
def _(ctx):
    c = ctx.conn().handshake()
    sid = c.request("POST", ctx.routes.echo, extra=[("content-length", "9")], end_stream=False)
    for part in (b"abc", b"def", b"ghi"):
        c.data(sid, part, end_stream=False)
    c.data(sid, b"", end_stream=True)
    c.ok(sid, b"abcdefghi")


@case("generic/3.1/3", "a padded DATA frame is served")
def _(ctx):
    c = ctx.conn().handshake()
    sid = c.request("POST", ctx.routes.echo, extra=[("content-length", "3")], end_stream=False)
    c.data(sid, b"abc", end_stream=True, pad=8)
    c.ok(sid, b"abc")


@case("generic/3.2/1", "a HEADERS frame is served")
def _(ctx):
    c = ctx.conn().handshake()
    c.ok(c.request(), ROOT_BODY)


@case("generic/3.2/2", "a padded HEADERS frame is served")
def _(ctx):
    c = ctx.conn().handshake()
    c.ok(c.request(pad=16), ROOT_BODY)


@case("generic/3.2/3", "a HEADERS frame with priority is served")
def _(ctx):
    c = ctx.conn().handshake()
    c.ok(c.request(priority=(0, 255, False)), ROOT_BODY)


@case("generic/3.3/1", "PRIORITY with weight 1 is accepted")
def _(ctx):
    c = ctx.conn().handshake()
    c.send_frame(PriorityFrame(1, depends_on=0, stream_weight=0))
    c.alive()


@case("generic/3.3/2", "PRIORITY with weight 256 is accepted")
def _(ctx):
    c = ctx.conn().handshake()
    c.send_frame(PriorityFrame(1, depends_on=0, stream_weight=255))
    c.alive()


@case("generic/3.3/3", "PRIORITY with a stream dependency is accepted")
def _(ctx):
    c = ctx.conn().handshake()
    c.send_frame(PriorityFrame(3, depends_on=1, stream_weight=16))
    c.alive()


@case("generic/3.3/4", "an exclusive PRIORITY is accepted")
def _(ctx):
    c = ctx.conn().handshake()
    c.send_frame(PriorityFrame(3, depends_on=1, stream_weight=16, exclusive=True))
    c.alive()


@case("generic/3.3/5", "PRIORITY for an idle stream, then HEADERS on a higher stream is served")
def _(ctx):
    c = ctx.conn().handshake()
    c.send_frame(PriorityFrame(3, depends_on=0, stream_weight=16))
    c.ok(c.request(sid=5), ROOT_BODY)


@case("generic/3.4/1", "RST_STREAM on an open stream is accepted")
def _(ctx):
    c = ctx.conn().handshake()
    sid = c.request("POST", ctx.routes.echo, extra=[("content-length", "3")], end_stream=False)
    c.rst(sid, CANCEL)
    c.rst_ok = (sid,)
    c.alive()


for _i, (_sid, _val, _label) in enumerate([
        (S_HEADER_TABLE_SIZE, 8192, "SETTINGS_HEADER_TABLE_SIZE"),
        (S_ENABLE_PUSH, 0, "SETTINGS_ENABLE_PUSH"),
        (S_MAX_CONCURRENT_STREAMS, 50, "SETTINGS_MAX_CONCURRENT_STREAMS"),
        (S_INITIAL_WINDOW_SIZE, 100000, "SETTINGS_INITIAL_WINDOW_SIZE"),
        (S_MAX_FRAME_SIZE, 32768, "SETTINGS_MAX_FRAME_SIZE"),
        (S_MAX_HEADER_LIST_SIZE, 100000, "SETTINGS_MAX_HEADER_LIST_SIZE"),
        (0x7a7a, 1, "an unknown SETTINGS identifier")], 1):
    def _settings_case(ctx, _sid=_sid, _val=_val):
        c = ctx.conn().handshake()
        c.settings({_sid: _val})
        c.alive("an ACK for the SETTINGS")
        if c.settings_acks < 2:
            raise Fail("%d SETTINGS ACK(s) before the PING ACK, expected 2" % c.settings_acks)
        c.ok(c.request(), ROOT_BODY)
    case("generic/3.5/%d" % _i, "SETTINGS with %s=%d is ACKed" % (_label, _val))(_settings_case)


@case("generic/3.7/1", "PING is answered by a PING ACK with the same payload")
def _(ctx):
    ctx.conn().handshake().alive()


@case("generic/3.8/1", "after a GOAWAY from the client, the server closes the connection")
def _(ctx):
    c = ctx.conn().handshake()
    c.send_frame(GoAwayFrame(0, last_stream_id=0, error_code=NO_ERROR))
    how = c.closed_within(ctx.read_timeout * 2)
    if how is None:
        raise Fail("connection still open %.1f s after our GOAWAY" % (ctx.read_timeout * 2))


@case("generic/3.9/1", "WINDOW_UPDATE on stream 0 is accepted")
def _(ctx):
    c = ctx.conn().handshake()
    c.window_update(0, 1)
    c.alive()


@case("generic/3.9/2", "WINDOW_UPDATE on an open stream is accepted")
def _(ctx):
    c, sid = half_closed_remote(ctx)
    c.window_update(sid, 5)
    c.auto_window = True
    c.ok(sid, ROOT_BODY)


@case("generic/3.10/1", "HEADERS + CONTINUATION is served")
def _(ctx):
    c = ctx.conn().handshake()
    block = c.block(c.fields())
    c.send(c.headers_frame(1, block[:4], end_headers=False))
    c.continuation(1, block[4:])
    c.ok(1, ROOT_BODY)


@case("generic/3.10/2", "HEADERS + several CONTINUATION frames is served")
def _(ctx):
    c = ctx.conn().handshake()
    block = c.block(c.fields(extra=[("x-pad", "p" * 40)]))
    c.send(c.headers_frame(1, block[:3], end_headers=False))
    rest = block[3:]
    while len(rest) > 8:
        c.continuation(1, rest[:8], end_headers=False)
        rest = rest[8:]
    c.continuation(1, rest)
    c.ok(1, ROOT_BODY)


@case("generic/4/1", "GET / -> 200 and the body")
def _(ctx):
    c = ctx.conn().handshake()
    c.ok(c.request(), ROOT_BODY)


@case("generic/4/2", "HEAD / -> 200 without a body")
def _(ctx):
    c = ctx.conn().handshake()
    c.ok(c.request("HEAD"), b"")


@case("generic/4/3", "POST with a body is echoed")
def _(ctx):
    c = ctx.conn().handshake()
    body = bytes(range(256)) * 40
    c.ok(c.request("POST", ctx.routes.echo, body=body), body)


@case("generic/4/4", "POST with trailers is served")
def _(ctx):
    c = ctx.conn().handshake()
    sid = c.request("POST", ctx.routes.echo, extra=[("content-length", "4")], end_stream=False)
    c.data(sid, b"data", end_stream=False)
    c.send(c.headers_frame(sid, c.block([("x-trailer", "yes")]), end_stream=True))
    c.ok(sid, b"data")


@case("generic/4/5", "a response with a trailer (GET /trailers)")
def _(ctx):
    c = ctx.conn().handshake()
    st = c.ok(c.request(path=ctx.routes.trailers))
    names = [n for n, _ in st.trailers or ()]
    if TRAILER_NAME not in names:
        raise Fail("no %s trailer (trailers: %r)" % (TRAILER_NAME, st.trailers))


@case("generic/4/6", "a large body arrives whole through window updates")
def _(ctx):
    c = ctx.conn().handshake()
    path, n = ctx.routes.big(300000)
    st = c.ok(c.request(path=path))
    if len(st.data) != n:
        raise Fail("body of %d bytes, expected %d" % (len(st.data), n))


@case("generic/4/7", "ten concurrent requests on one connection are all served")
def _(ctx):
    c = ctx.conn().handshake()
    sids = [c.request() for _ in range(10)]
    for sid in sids:
        c.ok(sid, ROOT_BODY)


def hand_request(ctx, custom=b"", path=None):
    """A GET header block from hand-coded literals plus `custom` (a field under test)."""
    return (hp_indexed(2) + hp_indexed(7 if ctx.tls else 6) +
            hp_lit(4, path or ctx.routes.root) + hp_lit(1, ctx.authority) + custom)


for _i, (_label, _custom) in enumerate([
        ("an indexed field (static table)", hp_indexed(16)),       # accept-encoding: gzip, deflate
        ("a literal with incremental indexing, indexed name", hp_lit(19, "*/*", "inc")),
        ("a literal with incremental indexing, new name", hp_lit("x-test", "a", "inc")),
        ("a literal without indexing, indexed name", hp_lit(19, "*/*")),
        ("a literal without indexing, new name", hp_lit("x-test", "a")),
        ("a literal never indexed, indexed name", hp_lit(19, "*/*", "never")),
        ("a literal never indexed, new name", hp_lit("x-test", "a", "never")),
        ("Huffman-coded literals", hp_lit("x-test", "huffman value", huffman=True)),
        ], 1):
    def _hpack_case(ctx, _custom=_custom):
        c = ctx.conn().handshake()
        c.send(c.headers_frame(1, hand_request(ctx, _custom)))
        c.ok(1, ROOT_BODY)
    case("generic/5/%d" % _i, "HPACK: %s is served" % _label)(_hpack_case)


@case("generic/5/9", "HPACK: a dynamic table size update at the start of a block is served")
def _(ctx):
    c = ctx.conn().handshake()
    c.send(c.headers_frame(1, hp_size_update(0) + hp_size_update(1024) + hand_request(ctx)))
    c.ok(1, ROOT_BODY)


@case("generic/5/10", "HPACK: an entry of the dynamic table is used by a later request")
def _(ctx):
    c = ctx.conn().handshake()
    c.send(c.headers_frame(1, hand_request(ctx, hp_lit("x-dyn", "value", "inc"))))
    c.ok(1, ROOT_BODY)
    c.send(c.headers_frame(3, hand_request(ctx, hp_indexed(62))))
    c.ok(3, ROOT_BODY)


@case("generic/5/11", "HPACK: entries evicted from a full dynamic table stay in sync")
def _(ctx):
    c = ctx.conn().handshake()
    for i in range(6):   # hpack's Encoder indexes everything: 6 x 1 KiB values evict each other
        sid = c.request(extra=[("x-fill-%d" % i, "%d" % i * 1000), ("x-keep", "k")])
        c.ok(sid, ROOT_BODY)


# =============================================================================================
# http2: RFC 9113
# =============================================================================================
@case("http2/3.4/1", "an invalid connection preface -> PROTOCOL_ERROR or close")
def _(ctx):
    c = ctx.conn()
    c.send(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n" + raw_frame(SETTINGS, 0, 0))
    try:
        while True:
            f = c.read()
            if f is None:
                raise Fail("connection still open after a bad preface")
            if isinstance(f, GoAwayFrame):
                if f.error_code != PROTOCOL_ERROR:
                    raise Fail("GOAWAY %s, expected PROTOCOL_ERROR" % ename(f.error_code))
                return
    except Closed:
        return


@case("http2/3.4/2", "a preface not followed by SETTINGS -> PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn()
    c.send(PREFACE + raw_frame(PING, 0, 0, b"12345678"))
    return c.conn_error(PROTOCOL_ERROR)


@case("http2/4.1/1", "a frame of an unknown type is ignored")
def _(ctx):
    c = ctx.conn().handshake()
    c.raw(0x77, 0, 0, b"unknown")
    c.raw(0x78, 0xff, 1, b"")
    c.alive()


@case("http2/4.1/2", "undefined flags are ignored")
def _(ctx):
    c = ctx.conn().handshake()
    c.raw(PING, 0x16, 0, b"undefflg")
    c.alive()
    if not any(isinstance(f, PingFrame) and f.opaque_data == b"undefflg" and "ACK" in f.flags
               for f in c.frames):
        raise Fail("no ACK for a PING with undefined flags")
    c.send(raw_frame(HEADERS, END_STREAM | END_HEADERS | 0x40 | 0x80 | 0x2,
                     1, hand_request(ctx)))
    c.ok(1, ROOT_BODY)


@case("http2/4.1/3", "the reserved bit of the stream id is ignored")
def _(ctx):
    c = ctx.conn().handshake()
    c.send(raw_frame(HEADERS, END_STREAM | END_HEADERS, 0x80000001, hand_request(ctx)))
    c.ok(1, ROOT_BODY)


@case("http2/4.2/1", "a DATA frame of 2^14 octets is served")
def _(ctx):
    c = ctx.conn().handshake()
    body = b"x" * 16384
    c.ok(c.request("POST", ctx.routes.echo, body=body), body)


def over_max_frame(c):
    return c.peer_settings.get(S_MAX_FRAME_SIZE, 16384) + 1


@case("http2/4.2/2", "a DATA frame over SETTINGS_MAX_FRAME_SIZE -> FRAME_SIZE_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    n = over_max_frame(c)
    sid = c.request("POST", ctx.routes.echo, extra=[("content-length", str(n))], end_stream=False)
    c.raw(DATA, END_STREAM, sid, b"x" * n)
    return c.stream_error(sid, FRAME_SIZE_ERROR)


@case("http2/4.2/3", "a HEADERS frame over SETTINGS_MAX_FRAME_SIZE -> FRAME_SIZE_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    n = over_max_frame(c)
    block = hand_request(ctx)
    block += hp_lit("x-big", "b" * (n - len(block) - 4))
    c.raw(HEADERS, END_STREAM | END_HEADERS, 1, block.ljust(n, b"\0")[:n])
    return c.conn_error(FRAME_SIZE_ERROR)


@case("http2/4.2/4", "a PING frame over SETTINGS_MAX_FRAME_SIZE -> FRAME_SIZE_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    c.raw(PING, 0, 0, b"p" * over_max_frame(c))
    return c.conn_error(FRAME_SIZE_ERROR)


@case("http2/4.3/1", "an invalid header block fragment -> COMPRESSION_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    # literal with incremental indexing, new name, whose string length runs past the block
    c.raw(HEADERS, END_STREAM | END_HEADERS, 1, hand_request(ctx) + b"\x40\x7f\x10ab")
    return c.conn_error(COMPRESSION_ERROR)


@case("http2/4.3/2", "PRIORITY between HEADERS and CONTINUATION -> PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    block = hand_request(ctx)
    c.send(c.headers_frame(1, block[:4], end_headers=False))
    c.send_frame(PriorityFrame(1, depends_on=0, stream_weight=16))
    c.continuation(1, block[4:])
    return c.conn_error(PROTOCOL_ERROR)


@case("http2/4.3/3", "HEADERS on another stream inside a header block -> PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    block = hand_request(ctx)
    c.send(c.headers_frame(1, block[:4], end_headers=False))
    c.send(c.headers_frame(3, block))
    return c.conn_error(PROTOCOL_ERROR)


@case("http2/4.3/4", "a header block whose fields are split across a CONTINUATION is served")
def _(ctx):
    c = ctx.conn().handshake()
    block = hand_request(ctx, hp_lit("x-split", "s" * 30))
    cut = len(block) - 10           # inside a string literal
    c.send(c.headers_frame(1, block[:cut], end_headers=False))
    c.continuation(1, block[cut:])
    c.ok(1, ROOT_BODY)


@case("http2/5.1/1", "DATA on an idle stream -> PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    c.data(1, b"x")
    return c.conn_error(PROTOCOL_ERROR)


@case("http2/5.1/2", "RST_STREAM on an idle stream -> PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    c.rst(1, CANCEL)
    return c.conn_error(PROTOCOL_ERROR)


@case("http2/5.1/3", "WINDOW_UPDATE on an idle stream -> PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    c.window_update(1, 100)
    return c.conn_error(PROTOCOL_ERROR)


@case("http2/5.1/4", "CONTINUATION on an idle stream -> PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    c.continuation(1, hand_request(ctx))
    return c.conn_error(PROTOCOL_ERROR)


@case("http2/5.1/5", "DATA on a half-closed (remote) stream -> STREAM_CLOSED")
def _(ctx):
    c, sid = half_closed_remote(ctx)
    c.data(sid, b"x")
    return c.stream_error(sid, STREAM_CLOSED)


@case("http2/5.1/6", "HEADERS on a half-closed (remote) stream -> STREAM_CLOSED")
def _(ctx):
    c, sid = half_closed_remote(ctx)
    c.send(c.headers_frame(sid, plain_block([("x-trailer", "t")])))
    return c.stream_error(sid, STREAM_CLOSED)


@case("http2/5.1/7", "CONTINUATION on a half-closed (remote) stream -> STREAM_CLOSED or "
                     "PROTOCOL_ERROR")
def _(ctx):
    c, sid = half_closed_remote(ctx)
    c.continuation(sid, plain_block([("x-trailer", "t")]))
    return c.stream_error(sid, STREAM_CLOSED, PROTOCOL_ERROR)


@case("http2/5.1/8", "DATA on a closed stream (after RST_STREAM) -> STREAM_CLOSED")
def _(ctx):
    c = ctx.conn().handshake()
    sid = c.request("POST", ctx.routes.echo, extra=[("content-length", "6")], end_stream=False)
    c.rst(sid, CANCEL)
    c.data(sid, b"abcdef")
    return c.stream_error(sid, STREAM_CLOSED)


@case("http2/5.1/9", "HEADERS on a closed stream (after RST_STREAM) -> STREAM_CLOSED")
def _(ctx):
    c = ctx.conn().handshake()
    sid = c.request("POST", ctx.routes.echo, extra=[("content-length", "6")], end_stream=False)
    c.rst(sid, CANCEL)
    c.send(c.headers_frame(sid, plain_block([("x-trailer", "t")])))
    return c.stream_error(sid, STREAM_CLOSED)


@case("http2/5.1/10", "CONTINUATION on a closed stream (after RST_STREAM) -> STREAM_CLOSED or "
                      "PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    sid = c.request("POST", ctx.routes.echo, extra=[("content-length", "6")], end_stream=False)
    c.rst(sid, CANCEL)
    c.continuation(sid, plain_block([("x-trailer", "t")]))
    return c.stream_error(sid, STREAM_CLOSED, PROTOCOL_ERROR)


@case("http2/5.1/11", "DATA on a stream closed by END_STREAM both ways -> STREAM_CLOSED")
def _(ctx):
    c = ctx.conn().handshake()
    sid = c.request()
    c.ok(sid)
    c.streams.pop(sid)
    c.data(sid, b"late")
    return c.stream_error(sid, STREAM_CLOSED)


@case("http2/5.1/12", "HEADERS on a stream closed by END_STREAM both ways -> STREAM_CLOSED")
def _(ctx):
    c = ctx.conn().handshake()
    sid = c.request()
    c.ok(sid)
    c.streams.pop(sid)
    c.send(c.headers_frame(sid, plain_block([("x-late", "1")])))
    return c.stream_error(sid, STREAM_CLOSED)


@case("http2/5.1/13", "RST_STREAM then DATA on its stream in one write -> STREAM_CLOSED")
def _(ctx):
    # both frames reach the server in one read: the RST must close the stream before the
    # DATA behind it is judged
    c = ctx.conn().handshake()
    sid = c.request("POST", ctx.routes.echo, extra=[("content-length", "6")], end_stream=False)
    c.send(RstStreamFrame(sid, error_code=CANCEL).serialize() +
           DataFrame(sid, data=b"abcdef", flags=["END_STREAM"]).serialize())
    return c.stream_error(sid, STREAM_CLOSED)


@case("http2/5.1/14", "DATA after the server's RST_STREAM is ignored (the client had not ended)")
def _(ctx):
    # RFC 9113 5.1: frames on a stream we reset may still be in flight and MUST be ignored.
    # A POST answered (405) before its body ended: the server resets it with NO_ERROR.
    c = ctx.conn().handshake()
    sid = c.request("POST", ctx.routes.root, end_stream=False)
    st = c.stream(sid)
    while st.rst is None:
        try:
            f = c.read()
        except Closed as e:
            raise Fail("closed before the server reset stream %d (%s)" % (sid, e)) from None
        if f is None:
            raise Fail("stream %d was not reset within %.1f s" % (sid, ctx.read_timeout))
    c.data(sid, b"late body", end_stream=False)
    c.send(c.headers_frame(sid, plain_block([("x-trailer", "t")])))
    c.alive("DATA and trailers on a stream the server reset to be ignored")
    c.ok(c.request(), ROOT_BODY)
    return "ignored"


@case("http2/5.1/15", "a request, then DATA on a stream closed by END_STREAM both ways, in one "
                      "write -> STREAM_CLOSED")
def _(ctx):
    c = ctx.conn().handshake()
    first = c.request()
    c.ok(first, ROOT_BODY)
    c.streams.pop(first)
    c.send(c.headers_frame(c.new_sid(), c.block(c.fields()), end_stream=True) +
           DataFrame(first, data=b"late", flags=["END_STREAM"]).serialize())
    return c.stream_error(first, STREAM_CLOSED)


@case("http2/5.1.1/1", "an even stream id from the client -> PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    c.send(c.headers_frame(2, hand_request(ctx)))
    return c.conn_error(PROTOCOL_ERROR)


@case("http2/5.1.1/2", "a stream id lower than one already opened -> PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    c.send(c.headers_frame(5, hand_request(ctx)))
    c.send(c.headers_frame(3, hand_request(ctx)))
    return c.conn_error(PROTOCOL_ERROR)


@case("http2/5.1.2/1", "a stream over the advertised MAX_CONCURRENT_STREAMS -> REFUSED_STREAM "
                       "or PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake({S_INITIAL_WINDOW_SIZE: 0})
    limit = c.peer_settings.get(S_MAX_CONCURRENT_STREAMS)
    if limit is None:
        raise Fail("the server advertises no SETTINGS_MAX_CONCURRENT_STREAMS")
    if limit > 1000:
        raise Fail("SETTINGS_MAX_CONCURRENT_STREAMS %d: too many to test" % limit)
    out = bytearray()
    for _ in range(limit):
        out += c.headers_frame(c.new_sid(), plain_block(c.fields()))
    c.send(bytes(out))
    extra = c.request(sid=c.new_sid())
    return c.stream_error(extra, REFUSED_STREAM, PROTOCOL_ERROR)


@case("http2/5.3.1/1", "HEADERS depending on its own stream -> PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    c.send(c.headers_frame(1, hand_request(ctx), priority=(1, 16, False)))
    return c.stream_error(1, PROTOCOL_ERROR)


@case("http2/5.3.1/2", "PRIORITY depending on its own stream -> PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    c.send_frame(PriorityFrame(1, depends_on=1, stream_weight=16))
    return c.stream_error(1, PROTOCOL_ERROR)


@case("http2/5.4.1/1", "an invalid PING -> GOAWAY FRAME_SIZE_ERROR, then the connection closes")
def _(ctx):
    c = ctx.conn().handshake()
    c.raw(PING, 0, 0, b"123456")
    if c.conn_error(FRAME_SIZE_ERROR) == "goaway":
        if c.closed_within(ctx.read_timeout) != "closed":
            raise Fail("GOAWAY sent but the connection stayed open")


@case("http2/5.5/1", "an unknown extension frame is ignored")
def _(ctx):
    c = ctx.conn().handshake()
    c.raw(0xfe, 0x5, 0, b"\0" * 100)
    c.alive()
    c.ok(c.request(), ROOT_BODY)


@case("http2/5.5/2", "an unknown extension frame inside a header block -> PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    block = hand_request(ctx)
    c.send(c.headers_frame(1, block[:4], end_headers=False))
    c.raw(0xfe, 0, 0, b"ext")
    c.continuation(1, block[4:])
    return c.conn_error(PROTOCOL_ERROR)


@case("http2/6.1/1", "DATA on stream 0 -> PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    c.raw(DATA, END_STREAM, 0, b"x")
    return c.conn_error(PROTOCOL_ERROR)


@case("http2/6.1/2", "DATA with a pad length beyond the payload -> PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    sid = c.request("POST", ctx.routes.echo, extra=[("content-length", "4")], end_stream=False)
    c.raw(DATA, END_STREAM | PADDED, sid, b"\x06" + b"ab" + b"\0\0")
    return c.conn_error(PROTOCOL_ERROR)


@case("http2/6.1/3", "DATA with a pad length equal to the payload length -> PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    sid = c.request("POST", ctx.routes.echo, extra=[("content-length", "0")], end_stream=False)
    c.raw(DATA, END_STREAM | PADDED, sid, b"\x04abc")
    return c.conn_error(PROTOCOL_ERROR)


@case("http2/6.1/4", "a PADDED DATA frame with no room for the pad length -> FRAME_SIZE_ERROR "
                     "or PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    sid = c.request("POST", ctx.routes.echo, extra=[("content-length", "0")], end_stream=False)
    c.raw(DATA, END_STREAM | PADDED, sid, b"")
    return c.conn_error(FRAME_SIZE_ERROR, PROTOCOL_ERROR)


@case("http2/6.2/1", "HEADERS on stream 0 -> PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    c.raw(HEADERS, END_STREAM | END_HEADERS, 0, hand_request(ctx))
    return c.conn_error(PROTOCOL_ERROR)


@case("http2/6.2/2", "HEADERS with a pad length beyond the payload -> PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    block = hand_request(ctx)
    c.raw(HEADERS, END_STREAM | END_HEADERS | PADDED, 1, bytes([len(block) + 10]) + block)
    return c.conn_error(PROTOCOL_ERROR)


@case("http2/6.2/3", "HEADERS with the PRIORITY flag but too short -> FRAME_SIZE_ERROR or "
                     "PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    c.raw(HEADERS, END_STREAM | END_HEADERS | PRIO_FLAG, 1, b"\0\0\0")
    return c.conn_error(FRAME_SIZE_ERROR, PROTOCOL_ERROR)


@case("http2/6.2/4", "DATA inside a header block -> PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    block = plain_block(c.fields("POST", ctx.routes.echo, body=b"x"))
    c.send(c.headers_frame(1, block[:4], end_stream=False, end_headers=False))
    c.data(1, b"x")
    return c.conn_error(PROTOCOL_ERROR)


@case("http2/6.3/1", "PRIORITY on stream 0 -> PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    c.raw(PRIORITY, 0, 0, b"\0\0\0\1\x10")
    return c.conn_error(PROTOCOL_ERROR)


@case("http2/6.3/2", "PRIORITY with a length other than 5 -> FRAME_SIZE_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    c.raw(PRIORITY, 0, 1, b"\0\0\0\0\x10\0")
    return c.stream_error(1, FRAME_SIZE_ERROR)


@case("http2/6.4/1", "RST_STREAM on stream 0 -> PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    c.raw(RST_STREAM, 0, 0, b"\0\0\0\x08")
    return c.conn_error(PROTOCOL_ERROR)


@case("http2/6.4/2", "RST_STREAM with a length other than 4 -> FRAME_SIZE_ERROR")
def _(ctx):
    c, sid = half_closed_remote(ctx)
    c.raw(RST_STREAM, 0, sid, b"\0\0\x08")
    return c.conn_error(FRAME_SIZE_ERROR)


@case("http2/6.5/1", "SETTINGS ACK with a payload -> FRAME_SIZE_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    c.raw(SETTINGS, ACK, 0, b"\0\x01\0\0\x10\0")
    return c.conn_error(FRAME_SIZE_ERROR)


@case("http2/6.5/2", "SETTINGS on a stream other than 0 -> PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    c.raw(SETTINGS, 0, 1, b"\0\x03\0\0\0\x64")
    return c.conn_error(PROTOCOL_ERROR)


@case("http2/6.5/3", "SETTINGS with a length not a multiple of 6 -> FRAME_SIZE_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    c.raw(SETTINGS, 0, 0, b"\0\x03\0\0\0\x64\0")
    return c.conn_error(FRAME_SIZE_ERROR)


def settings_raw(pairs):
    return b"".join(struct.pack(">HI", k, v) for k, v in pairs)


for _i, (_label, _pairs, _code) in enumerate([
        ("SETTINGS_ENABLE_PUSH=2", [(S_ENABLE_PUSH, 2)], PROTOCOL_ERROR),
        ("SETTINGS_INITIAL_WINDOW_SIZE=2^31", [(S_INITIAL_WINDOW_SIZE, 2 ** 31)],
         FLOW_CONTROL_ERROR),
        ("SETTINGS_MAX_FRAME_SIZE=16383", [(S_MAX_FRAME_SIZE, 16383)], PROTOCOL_ERROR),
        ("SETTINGS_MAX_FRAME_SIZE=2^24", [(S_MAX_FRAME_SIZE, 2 ** 24)], PROTOCOL_ERROR),
        ("SETTINGS_ENABLE_CONNECT_PROTOCOL=2", [(S_ENABLE_CONNECT_PROTOCOL, 2)],
         PROTOCOL_ERROR),
        ("SETTINGS_INITIAL_WINDOW_SIZE=2^32-1", [(S_INITIAL_WINDOW_SIZE, 2 ** 32 - 1)],
         FLOW_CONTROL_ERROR),
        ], 1):
    def _bad_settings(ctx, _pairs=_pairs, _code=_code):
        c = ctx.conn().handshake()
        c.raw(SETTINGS, 0, 0, settings_raw(_pairs))
        return c.conn_error(_code)
    case("http2/6.5.2/%d" % _i, "%s -> %s" % (_label, ename(_code)))(_bad_settings)


@case("http2/6.5.2/7", "unknown SETTINGS identifiers are ignored")
def _(ctx):
    c = ctx.conn().handshake()
    c.raw(SETTINGS, 0, 0, settings_raw([(0xff01, 7), (0x0a0a, 2 ** 32 - 1)]))
    c.alive()
    c.ok(c.request(), ROOT_BODY)


def take_data(c, sid, seconds):
    """Reads for `seconds` (no WINDOW_UPDATE from us); returns the DATA bytes seen on sid."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            f = c.read(timeout=max(0.0, end - time.monotonic()))
        except Closed:
            raise Fail("connection closed while waiting for DATA") from None
        if isinstance(f, GoAwayFrame):
            raise Fail("GOAWAY %s while waiting for DATA" % ename(f.error_code))
        if isinstance(f, RstStreamFrame) and f.stream_id == sid:
            raise Fail("RST_STREAM %s while waiting for DATA" % ename(f.error_code))
    return len(c.stream(sid).data)


@case("http2/6.5.3/1", "multiple INITIAL_WINDOW_SIZE values in one SETTINGS: the last wins")
def _(ctx):
    c = ctx.conn()
    c.auto_window = False
    c.send(PREFACE + raw_frame(SETTINGS, 0, 0, settings_raw(
        [(S_INITIAL_WINDOW_SIZE, 100), (S_INITIAL_WINDOW_SIZE, 1)])))
    c.handshake(preface=b"")
    sid = c.request()
    got = take_data(c, sid, min(1.0, ctx.read_timeout))
    if got != 1:
        raise Fail("received %d DATA bytes with a stream window of 1" % got)


@case("http2/6.5.3/2", "SETTINGS without ACK is ACKed")
def _(ctx):
    c = ctx.conn().handshake()
    c.settings({S_MAX_CONCURRENT_STREAMS: 10})
    c.alive()
    if c.settings_acks < 2:
        raise Fail("%d SETTINGS ACK(s) before the PING ACK, expected 2" % c.settings_acks)


@case("http2/6.7/1", "PING is answered with ACK and the same payload")
def _(ctx):
    c = ctx.conn().handshake()
    c.alive()
    c.alive()


@case("http2/6.7/2", "a PING ACK from the client is not answered")
def _(ctx):
    c = ctx.conn().handshake()
    c.ping(b"ackack!!", ack=True)
    c.alive()
    for f in c.frames:
        if isinstance(f, PingFrame) and f.opaque_data == b"ackack!!":
            raise Fail("the server answered a PING ACK")


@case("http2/6.7/3", "PING on a stream other than 0 -> PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    c.raw(PING, 0, 1, b"h2check!")
    return c.conn_error(PROTOCOL_ERROR)


@case("http2/6.7/4", "PING with a length other than 8 -> FRAME_SIZE_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    c.raw(PING, 0, 0, b"1234567")
    return c.conn_error(FRAME_SIZE_ERROR)


@case("http2/6.8/1", "GOAWAY on a stream other than 0 -> PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    c.raw(GOAWAY, 0, 1, b"\0\0\0\0\0\0\0\0")
    return c.conn_error(PROTOCOL_ERROR)


@case("http2/6.8/2", "a request in flight with a client GOAWAY is still answered")
def _(ctx):
    c = ctx.conn().handshake()
    sid = c.new_sid()
    c.send(c.headers_frame(sid, c.block(c.fields())) +
           GoAwayFrame(0, last_stream_id=0, error_code=NO_ERROR).serialize())
    c.ok(sid, ROOT_BODY)


@case("http2/6.9/1", "WINDOW_UPDATE of 0 on the connection -> PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    c.raw(WINDOW_UPDATE, 0, 0, b"\0\0\0\0")
    return c.conn_error(PROTOCOL_ERROR)


@case("http2/6.9/2", "WINDOW_UPDATE of 0 on a stream -> PROTOCOL_ERROR")
def _(ctx):
    c, sid = half_closed_remote(ctx)
    c.raw(WINDOW_UPDATE, 0, sid, b"\0\0\0\0")
    return c.stream_error(sid, PROTOCOL_ERROR)


@case("http2/6.9/3", "WINDOW_UPDATE with a length other than 4 -> FRAME_SIZE_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    c.raw(WINDOW_UPDATE, 0, 0, b"\0\0\0\1\0")
    return c.conn_error(FRAME_SIZE_ERROR)


@case("http2/6.9.1/1", "INITIAL_WINDOW_SIZE=1: the server sends 1 DATA byte, then waits")
def _(ctx):
    c = ctx.conn()
    c.auto_window = False
    c.handshake({S_INITIAL_WINDOW_SIZE: 1})
    sid = c.request()
    got = take_data(c, sid, min(1.0, ctx.read_timeout))
    if got != 1:
        raise Fail("received %d DATA bytes with a stream window of 1" % got)
    c.window_update(sid, 100)
    c.window_update(0, 100)
    c.ok(sid, ROOT_BODY)


@case("http2/6.9.1/2", "WINDOW_UPDATE overflowing the connection window -> FLOW_CONTROL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    c.window_update(0, MAX_WINDOW)
    return c.conn_error(FLOW_CONTROL_ERROR)


@case("http2/6.9.1/3", "WINDOW_UPDATE overflowing a stream window -> FLOW_CONTROL_ERROR")
def _(ctx):
    c = ctx.conn()
    c.auto_window = False
    c.handshake({S_INITIAL_WINDOW_SIZE: 1})
    sid = c.request(path=ctx.routes.big(200000)[0])   # the connection window keeps it open
    c.window_update(sid, MAX_WINDOW)
    c.window_update(sid, MAX_WINDOW)
    return c.stream_error(sid, FLOW_CONTROL_ERROR)


@case("http2/6.9.1/4", "the server sends no more than the 65,535-byte connection window")
def _(ctx):
    c = ctx.conn()
    c.auto_window = False
    c.handshake({S_INITIAL_WINDOW_SIZE: MAX_WINDOW})
    path, n = ctx.routes.big(200000)
    sid = c.request(path=path)
    got = take_data(c, sid, min(1.0, ctx.read_timeout))
    if got > 65535:
        raise Fail("received %d DATA bytes with a connection window of 65,535" % got)
    if got == 0:
        raise Fail("no DATA at all")
    c.auto_window = True
    c.window_update(0, n)
    st = c.ok(sid)
    if len(st.data) != n:
        raise Fail("body of %d bytes after the WINDOW_UPDATE, expected %d" % (len(st.data), n))


@case("http2/6.9.1/5", "a stream blocked on its window resumes after WINDOW_UPDATE")
def _(ctx):
    c = ctx.conn()
    c.auto_window = False
    c.handshake({S_INITIAL_WINDOW_SIZE: 1000})
    path, n = ctx.routes.big(50000)
    sid = c.request(path=path)
    got = take_data(c, sid, min(1.0, ctx.read_timeout))
    if got != 1000:
        raise Fail("received %d DATA bytes with a stream window of 1,000" % got)
    c.window_update(sid, 3000)
    got = take_data(c, sid, min(1.0, ctx.read_timeout))
    if got != 4000:
        raise Fail("received %d DATA bytes in all after a WINDOW_UPDATE of 3,000 (window 4,000)"
                   % got)
    c.auto_window = True
    c.window_update(sid, n)
    c.window_update(0, n)
    st = c.ok(sid)
    if len(st.data) != n:
        raise Fail("body of %d bytes, expected %d" % (len(st.data), n))


@case("http2/6.9.2/1", "raising INITIAL_WINDOW_SIZE after HEADERS resumes a blocked stream")
def _(ctx):
    c = ctx.conn()
    c.auto_window = False
    c.handshake({S_INITIAL_WINDOW_SIZE: 0})
    sid = c.request()
    if take_data(c, sid, min(0.5, ctx.read_timeout)):
        raise Fail("DATA sent on a window of 0")
    c.auto_window = True
    c.settings({S_INITIAL_WINDOW_SIZE: 65535})
    c.ok(sid, ROOT_BODY)


@case("http2/6.9.2/2", "a SETTINGS change can make a stream window negative")
def _(ctx):
    c = ctx.conn()
    c.auto_window = False
    c.handshake({S_INITIAL_WINDOW_SIZE: 3})
    sid = c.request()
    if take_data(c, sid, min(0.5, ctx.read_timeout)) != 3:
        raise Fail("expected 3 DATA bytes first")
    c.settings({S_INITIAL_WINDOW_SIZE: 1})   # window 3-3 -> -2
    c.window_update(sid, 2)                   # -> 0: nothing may be sent
    if take_data(c, sid, min(0.5, ctx.read_timeout)) != 3:
        raise Fail("DATA sent while the stream window was 0 (after -2 + 2)")
    c.window_update(sid, 1)
    if take_data(c, sid, min(0.5, ctx.read_timeout)) != 4:
        raise Fail("expected exactly 1 more DATA byte on a window of 1")


@case("http2/6.9.2/3", "an INITIAL_WINDOW_SIZE change overflowing an open stream window -> "
                       "FLOW_CONTROL_ERROR")
def _(ctx):
    c = ctx.conn()
    c.auto_window = False
    c.handshake({S_INITIAL_WINDOW_SIZE: 0})
    path, _ = ctx.routes.big(200000)
    sid = c.request(path=path)
    c.window_update(sid, MAX_WINDOW)
    c.settings({S_INITIAL_WINDOW_SIZE: 100000})
    return c.conn_error(FLOW_CONTROL_ERROR)


@case("http2/6.10/1", "CONTINUATION followed by a frame other than CONTINUATION -> "
                      "PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    block = hand_request(ctx)
    c.send(c.headers_frame(1, block[:3], end_headers=False))
    c.continuation(1, block[3:6], end_headers=False)
    c.ping()
    return c.conn_error(PROTOCOL_ERROR)


@case("http2/6.10/2", "CONTINUATION on stream 0 -> PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    block = hand_request(ctx)
    c.send(c.headers_frame(1, block[:3], end_headers=False))
    c.raw(CONTINUATION, END_HEADERS, 0, block[3:])
    return c.conn_error(PROTOCOL_ERROR)


@case("http2/6.10/3", "CONTINUATION after HEADERS with END_HEADERS -> PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake({S_INITIAL_WINDOW_SIZE: 0})
    c.send(c.headers_frame(1, hand_request(ctx)))
    c.continuation(1, plain_block([("x-late", "1")]))
    return c.conn_error(PROTOCOL_ERROR, STREAM_CLOSED)


@case("http2/6.10/4", "CONTINUATION after CONTINUATION with END_HEADERS -> PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake({S_INITIAL_WINDOW_SIZE: 0})
    block = hand_request(ctx)
    c.send(c.headers_frame(1, block[:3], end_headers=False))
    c.continuation(1, block[3:])
    c.continuation(1, plain_block([("x-late", "1")]))
    return c.conn_error(PROTOCOL_ERROR, STREAM_CLOSED)


@case("http2/6.10/5", "CONTINUATION after DATA -> PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    sid = c.request("POST", ctx.routes.echo, extra=[("content-length", "6")], end_stream=False)
    c.data(sid, b"abc", end_stream=False)
    c.continuation(sid, plain_block([("x-late", "1")]))
    return c.conn_error(PROTOCOL_ERROR)


@case("http2/6.10/6", "CONTINUATION on another stream than its HEADERS -> PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    block = hand_request(ctx)
    c.send(c.headers_frame(1, block[:3], end_headers=False))
    c.continuation(3, block[3:])
    return c.conn_error(PROTOCOL_ERROR)


@case("http2/8.1/1", "a second HEADERS without END_STREAM (trailers) -> PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    sid = c.request("POST", ctx.routes.echo, extra=[("content-length", "4")], end_stream=False)
    c.data(sid, b"data", end_stream=False)
    c.send(c.headers_frame(sid, plain_block([("x-trailer", "t")]), end_stream=False))
    return c.stream_error(sid, PROTOCOL_ERROR)


@case("http2/8.1/2", "a response completed before the request body ended arrives whole, "
      "END_STREAM before any RST_STREAM (RFC 9113 8.1)")
def _(ctx):
    c = ctx.conn().handshake()
    path, n = ctx.routes.big(150000)
    sids = []
    for _ in range(2):          # one stream, then two at once
        sid = c.request(path=path, end_stream=False)
        c.data(sid, b"a" * 100, end_stream=False)
        sids.append(sid)
    for sid in sids:
        st = c.ok(sid)          # (fails on an RST_STREAM before END_STREAM)
        if len(st.data) != n:
            raise Fail("stream %d: body of %d bytes, expected %d" % (sid, len(st.data), n))


@case("http2/6.9/connection-window", "DATA of streams reset before they were served gives the "
      "connection window back (9.6 MB through an 8 MiB window)", budget=30.0)
def _(ctx):
    c = ctx.conn().handshake()
    c.rst_ok = set()
    piece = b"z" * 16000
    for _ in range(600):
        sid = c.new_sid()
        block = c.block(c.fields("POST", ctx.routes.echo, [("content-length", "99999")]))
        c.send(c.headers_frame(sid, block, end_stream=False) +
               raw_frame(DATA, 0, sid, piece) + raw_frame(RST_STREAM, 0, sid, CANCEL.to_bytes(4, "big")))
        c.rst_ok.add(sid)
        c.drain()
        time.sleep(0.005)       # each stream's three frames reach the server in one read
    # then an upload that needs the connection window back: 100 kB in frames of 16000
    body = b"y" * 100000
    sid = c.request("POST", ctx.routes.echo, extra=[("content-length", str(len(body)))],
                    end_stream=False)
    for i in range(0, len(body), 16000):
        c.data(sid, body[i:i + 16000], end_stream=i + 16000 >= len(body))
        c.drain()
    c.ok(sid, body)


@case("http2/8.1.1/1", "content-length larger than the DATA sent -> PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    sid = c.request("POST", ctx.routes.echo, extra=[("content-length", "10")], end_stream=False)
    c.data(sid, b"abc")
    return c.malformed(sid)


@case("http2/8.1.1/2", "content-length smaller than the DATA sent -> PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    sid = c.request("POST", ctx.routes.echo, extra=[("content-length", "2")], end_stream=False)
    c.data(sid, b"abc")
    return c.malformed(sid)


@case("http2/8.1.1/3", "content-length mismatch over several DATA frames -> PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    sid = c.request("POST", ctx.routes.echo, extra=[("content-length", "5")], end_stream=False)
    c.data(sid, b"abc", end_stream=False)
    c.data(sid, b"def", end_stream=True)
    return c.malformed(sid)


@case("http2/8.1.1/4", "DATA on a request with content-length 0 -> PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    sid = c.request("POST", ctx.routes.echo, extra=[("content-length", "0")], end_stream=False)
    c.data(sid, b"x")
    return c.malformed(sid)


def malformed_case(cid, name, make):
    """make(ctx, c) -> the request's fields; sent as literals without indexing."""
    def run(ctx):
        c = ctx.conn().handshake()
        c.send(c.headers_frame(1, plain_block(make(ctx, c))))
        return c.malformed(1)
    case(cid, name)(run)


def with_field(name, value):
    return lambda ctx, c: c.fields(extra=[(name, value)])


malformed_case("http2/8.2/1", "an uppercase field name -> malformed",
               with_field("X-Upper", "a"))
malformed_case("http2/8.2.1/1", "a field name with a space -> malformed",
               with_field("x bad", "a"))
malformed_case("http2/8.2.1/2", "a field name with a colon inside -> malformed",
               with_field("x:bad", "a"))
malformed_case("http2/8.2.1/3", "an empty field name -> malformed", with_field("", "a"))
malformed_case("http2/8.2.1/4", "a field value with CR LF -> malformed",
               with_field("x-v", "a\r\nx-injected: 1"))
malformed_case("http2/8.2.1/5", "a field value with NUL -> malformed",
               with_field("x-v", "a\0b"))
malformed_case("http2/8.2.1/6", "a field value with a leading space -> malformed",
               with_field("x-v", " a"))
malformed_case("http2/8.2.1/7", "a field value with a trailing tab -> malformed",
               with_field("x-v", "a\t"))
malformed_case("http2/8.2.2/1", "a connection field -> malformed",
               with_field("connection", "keep-alive"))
malformed_case("http2/8.2.2/2", "a keep-alive field -> malformed",
               with_field("keep-alive", "timeout=5"))
malformed_case("http2/8.2.2/3", "a proxy-connection field -> malformed",
               with_field("proxy-connection", "keep-alive"))
malformed_case("http2/8.2.2/4", "a transfer-encoding field -> malformed",
               with_field("transfer-encoding", "chunked"))
malformed_case("http2/8.2.2/5", "an upgrade field -> malformed",
               with_field("upgrade", "websocket"))
malformed_case("http2/8.2.2/6", "TE other than trailers -> malformed",
               with_field("te", "gzip"))


@case("http2/8.2.2/7", "TE: trailers is served")
def _(ctx):
    c = ctx.conn().handshake()
    c.send(c.headers_frame(1, plain_block(c.fields(extra=[("te", "trailers")]))))
    c.ok(1, ROOT_BODY)


malformed_case("http2/8.3/1", "an unknown pseudo-header -> malformed",
               with_field(":foo", "bar"))
malformed_case("http2/8.3/2", "a response pseudo-header in a request -> malformed",
               with_field(":status", "200"))
malformed_case("http2/8.3/3", "a pseudo-header after a regular field -> malformed",
               lambda ctx, c: [f for f in c.fields() if f[0] != ":authority"] +
               [("x-a", "b"), (":authority", ctx.authority)])


@case("http2/8.3/4", "a pseudo-header in trailers -> malformed")
def _(ctx):
    c = ctx.conn().handshake()
    sid = c.request("POST", ctx.routes.echo, extra=[("content-length", "4")], end_stream=False)
    c.data(sid, b"data", end_stream=False)
    c.send(c.headers_frame(sid, plain_block([(":method", "POST")]), end_stream=True))
    return c.malformed(sid)


def without(name):
    return lambda ctx, c: [f for f in c.fields() if f[0] != name]


def doubled(name):
    def make(ctx, c):
        fields = c.fields()
        return fields + [f for f in fields if f[0] == name]
    return make


malformed_case("http2/8.3.1/1", "an empty :path -> malformed",
               lambda ctx, c: [(n, "" if n == ":path" else v) for n, v in c.fields()])
malformed_case("http2/8.3.1/2", "no :method -> malformed", without(":method"))
malformed_case("http2/8.3.1/3", "no :scheme -> malformed", without(":scheme"))
malformed_case("http2/8.3.1/4", "no :path -> malformed", without(":path"))
malformed_case("http2/8.3.1/5", "a duplicated :method -> malformed", doubled(":method"))
malformed_case("http2/8.3.1/6", "a duplicated :scheme -> malformed", doubled(":scheme"))
malformed_case("http2/8.3.1/7", "a duplicated :path -> malformed", doubled(":path"))
malformed_case("http2/8.3.1/8", "a :path not starting with / -> malformed",
               lambda ctx, c: [(n, "index.html" if n == ":path" else v)
                               for n, v in c.fields()])
malformed_case("http2/8.3.1/9", "CONNECT with :scheme and :path (no :protocol) -> malformed",
               lambda ctx, c: c.fields("CONNECT"))
malformed_case("http2/8.3.1/10", "a duplicated :authority -> malformed", doubled(":authority"))
malformed_case("http2/8.3.1/11", "a :path with a fragment -> malformed",
               lambda ctx, c: [(n, "/#frag" if n == ":path" else v) for n, v in c.fields()])
malformed_case("http2/8.3.1/12", "an asterisk :path for a method other than OPTIONS -> malformed",
               lambda ctx, c: [(n, "*" if n == ":path" else v) for n, v in c.fields()])


@case("http2/8.4/1", "PUSH_PROMISE from a client -> PROTOCOL_ERROR")
def _(ctx):
    c = ctx.conn().handshake()
    c.raw(PUSH_PROMISE, END_HEADERS, 1, b"\0\0\0\x02" + hand_request(ctx))
    return c.conn_error(PROTOCOL_ERROR)


@case("http2/8.2.3/1", "cookie crumbs in separate fields are served")
def _(ctx):
    c = ctx.conn().handshake()
    c.send(c.headers_frame(1, plain_block(c.fields(extra=[("cookie", "a=1"),
                                                            ("cookie", "b=2")]))))
    c.ok(1, ROOT_BODY)


# =============================================================================================
# hpack: RFC 7541
# =============================================================================================
def compression_case(cid, name, block_fn):
    def run(ctx):
        c = ctx.conn().handshake()
        c.raw(HEADERS, END_STREAM | END_HEADERS, 1, block_fn(ctx))
        return c.conn_error(COMPRESSION_ERROR)
    case(cid, name)(run)


compression_case("hpack/2.3.3/1", "an indexed field beyond the tables -> COMPRESSION_ERROR",
                 lambda ctx: hand_request(ctx, hp_indexed(70)))
compression_case("hpack/2.3.3/2", "a literal whose name index is beyond the tables -> "
                 "COMPRESSION_ERROR", lambda ctx: hand_request(ctx, hp_lit(70, "v")))
compression_case("hpack/4.2/1", "a table size update above SETTINGS_HEADER_TABLE_SIZE -> "
                 "COMPRESSION_ERROR", lambda ctx: hp_size_update(4097) + hand_request(ctx))
compression_case("hpack/5.1/1", "an integer overflowing 32 bits -> COMPRESSION_ERROR",
                 lambda ctx: hand_request(ctx, b"\xff\xff\xff\xff\xff\xff\xff\x7f"))
compression_case("hpack/5.2/1", "a Huffman string containing EOS -> COMPRESSION_ERROR",
                 lambda ctx: hand_request(ctx, b"\x00\x81\xf0" + b"\x84\xff\xff\xff\xfc"))
compression_case("hpack/5.2/2", "Huffman padding longer than 7 bits -> COMPRESSION_ERROR",
                 lambda ctx: hand_request(ctx, b"\x00\x81\xf0" + b"\x82\x1f\xff"))
compression_case("hpack/5.2/3", "Huffman padding not of ones -> COMPRESSION_ERROR",
                 lambda ctx: hand_request(ctx, b"\x00\x81\xf0" + b"\x81\x18"))
compression_case("hpack/5.2/4", "a string length past the end of the block -> "
                 "COMPRESSION_ERROR", lambda ctx: hand_request(ctx, b"\x00\x05ab"))
compression_case("hpack/6.1/1", "an indexed field with index 0 -> COMPRESSION_ERROR",
                 lambda ctx: hand_request(ctx, b"\x80"))
compression_case("hpack/6.3/1", "a table size update after a field -> COMPRESSION_ERROR",
                 lambda ctx: hand_request(ctx, hp_size_update(100)))
compression_case("hpack/6.3/2", "a dynamic-table index gone after a size update to 0 -> "
                 "COMPRESSION_ERROR",
                 lambda ctx: hp_size_update(0) + hand_request(ctx, hp_lit("x-a", "b", "inc") +
                                                              hp_indexed(62)))


@case("hpack/4.4/1", "an entry larger than the table empties it and is not added")
def _(ctx):
    c = ctx.conn().handshake()
    c.send(c.headers_frame(1, hand_request(ctx, hp_lit("x-small", "s", "inc"))))
    c.ok(1, ROOT_BODY)
    c.send(c.headers_frame(3, hand_request(ctx, hp_lit("x-huge", "h" * 5000, "inc"))))
    c.ok(3, ROOT_BODY)
    c.raw(HEADERS, END_STREAM | END_HEADERS, 5, hand_request(ctx, hp_indexed(62)))
    return c.conn_error(COMPRESSION_ERROR)


# =============================================================================================
# abuse: moonwire's limits against hostile clients
# =============================================================================================
def max_streams(c):
    m = c.peer_settings.get(S_MAX_CONCURRENT_STREAMS)
    if m is None:
        raise Fail("the server advertises no SETTINGS_MAX_CONCURRENT_STREAMS")
    return m


@case("abuse/streams/advertised", "SETTINGS_MAX_CONCURRENT_STREAMS is advertised and <= 100",
      abuse=True)
def _(ctx):
    c = ctx.conn().handshake()
    m = max_streams(c)
    if not 1 <= m <= 100:
        raise Fail("SETTINGS_MAX_CONCURRENT_STREAMS %d" % m)


def collect(c, sids, seconds):
    """Waits up to `seconds` until every stream in sids is answered or reset.
    Returns (served, {code: count})."""
    end = time.monotonic() + seconds
    pending = set(sids)
    while pending and time.monotonic() < end:
        for sid in list(pending):
            st = c.stream(sid)
            if st.end or st.rst is not None:
                pending.discard(sid)
        if not pending:
            break
        try:
            f = c.read(timeout=min(ctx_read(c), end - time.monotonic()))
        except Closed:
            break
        if isinstance(f, GoAwayFrame):
            break
    served = sum(1 for s in sids if c.stream(s).end and c.stream(s).rst is None)
    resets = {}
    for s in sids:
        r = c.stream(s).rst
        if r is not None:
            resets[ename(r)] = resets.get(ename(r), 0) + 1
    return served, resets, pending


def ctx_read(c):
    return max(0.05, c.ctx.read_timeout)


@case("abuse/streams/slow-limit", "MAX_CONCURRENT_STREAMS running /slow handlers + 1: the "
      "extra stream is refused, the others are served", budget=15, abuse=True)
def _(ctx):
    slow = ctx.need("slow")
    c = ctx.conn().handshake()
    m = max_streams(c)
    sids = [c.new_sid() for _ in range(m)]
    c.send(b"".join(c.headers_frame(s, plain_block(c.fields(path=slow))) for s in sids))
    extra = c.new_sid()
    c.send(c.headers_frame(extra, plain_block(c.fields(path=slow))))
    how = c.stream_error(extra, REFUSED_STREAM, PROTOCOL_ERROR)
    if how != "rst":
        return how      # a connection error: the others cannot be served
    served, resets, pending = collect(c, sids, SLOW_SECONDS + ctx.read_timeout * 2)
    if served != m:
        raise Fail("%d of %d /slow streams served (resets %r, %d pending)" % (
            served, m, resets, len(pending)))
    return "extra stream reset with %s, %d served" % (ename(c.stream(extra).rst), served)


@case("abuse/streams/reset-still-count", "streams reset while their handlers run still count: "
      "100 /slow, RST all, 100 more -> some REFUSED_STREAM", budget=15, abuse=True)
def _(ctx):
    slow = ctx.need("slow")
    c = ctx.conn().handshake()
    m = max_streams(c)
    first = [c.new_sid() for _ in range(m)]
    c.send(b"".join(c.headers_frame(s, plain_block(c.fields(path=slow))) for s in first))
    c.alive()   # the server has read them all (handlers started)
    c.send(b"".join(RstStreamFrame(s, error_code=CANCEL).serialize() for s in first))
    second = [c.new_sid() for _ in range(m)]
    c.send(b"".join(c.headers_frame(s, plain_block(c.fields(path=slow))) for s in second))
    served, resets, pending = collect(c, second, SLOW_SECONDS * 2 + ctx.read_timeout * 2)
    if c.goaway is not None and c.goaway.error_code not in (NO_ERROR,):
        raise Fail("GOAWAY %s instead of REFUSED_STREAM" % ename(c.goaway.error_code))
    if resets.get("REFUSED_STREAM", 0) == 0:
        raise Fail("no stream refused while %d reset handlers still ran (served %d, resets %r)"
                   % (m, served, resets))


@case("abuse/rapid-reset", "2,000 HEADERS+RST_STREAM pairs: the server ends the connection and "
      "does not run 2,000 handlers", budget=20, abuse=True)
def _(ctx):
    before = ctx.stats() if ctx.routes.stats else None
    path = ctx.routes.slow or ctx.routes.root
    c = ctx.conn().handshake()
    c.plain = True
    m = max_streams(c)
    ended = None
    try:
        for _ in range(2000 // 50):
            out = bytearray()
            for _ in range(50):
                sid = c.new_sid()
                out += c.headers_frame(sid, plain_block(c.fields(path=path)))
                out += RstStreamFrame(sid, error_code=CANCEL).serialize()
            c.send(bytes(out))
            if not c.drain() or c.goaway is not None:
                break
    except (Closed, WriteBlocked) as e:
        ended = str(e)
    if c.goaway is None and not c.closed:
        ended = c.closed_within(ctx.read_timeout)
    if c.goaway is None and not c.closed and not ended:
        raise Fail("2,000 HEADERS+RST_STREAM pairs accepted: no GOAWAY, connection open")
    if c.goaway is not None and c.goaway.error_code == NO_ERROR:
        raise Fail("GOAWAY NO_ERROR (expected ENHANCE_YOUR_CALM or another error)")
    how = "GOAWAY %s" % ename(c.goaway.error_code) if c.goaway is not None else "closed"
    if before is not None:
        time.sleep(0.2)
        after = ctx.stats()
        started = after.get("handlers_started", 0) - before.get("handlers_started", 0) - 1
        if started > 2 * m + 10:
            raise Fail("%s, but %d handlers started for the reset streams (limit %d)" % (
                how, started, 2 * m))
        how += ", %d handlers started" % started
    return how + " after %d streams" % (c.next_sid // 2)


@case("abuse/continuation-flood", "more than 8 CONTINUATION frames for one header block -> "
      "the connection is closed", abuse=True)
def _(ctx):
    c = ctx.conn().handshake()
    block = hand_request(ctx, b"".join(hp_lit("x-c%d" % i, "v" * 20) for i in range(40)))
    c.send(c.headers_frame(1, block[:10], end_headers=False))
    rest, parts = block[10:], 30
    size = len(rest) // parts + 1
    try:
        for i in range(parts):
            chunk = rest[i * size:(i + 1) * size]
            c.continuation(1, chunk, end_headers=(i == parts - 1))
    except (Closed, WriteBlocked) as e:
        return "while sending CONTINUATION %d: %s" % (i + 1, e)
    return c.conn_error(ENHANCE_YOUR_CALM, PROTOCOL_ERROR, INTERNAL_ERROR)


def refused_and_alive(c, sid):
    st = c.stream(sid)
    while st.rst is None and st.status is None:
        try:
            f = c.read()
        except Closed:
            raise Fail("connection closed (the stream alone should be refused)") from None
        if f is None:
            raise Fail("no answer to the oversized request within %.1f s" % c.ctx.read_timeout)
        if isinstance(f, GoAwayFrame):
            raise Fail("GOAWAY %s (the stream alone should be refused)" % ename(f.error_code))
    if st.status is not None and st.status not in (431, 400):
        raise Fail("served with status %d" % st.status)
    c.rst_ok = (sid,)
    c.alive("the connection to survive the refused stream")
    c.ok(c.request(), ROOT_BODY)
    return "status %d" % st.status if st.rst is None else "RST_STREAM %s" % ename(st.rst)


def send_block(c, sid, block):
    size = c.peer_settings.get(S_MAX_FRAME_SIZE, 16384)
    parts = [block[i:i + size] for i in range(0, len(block), size)]
    c.send(c.headers_frame(sid, parts[0], end_headers=len(parts) == 1))
    for i, p in enumerate(parts[1:], 2):
        c.continuation(sid, p, end_headers=i == len(parts))


@case("abuse/headers/size", "a header list over 64 KiB -> the stream is refused (431 or RST), "
      "the connection survives", abuse=True)
def _(ctx):
    c = ctx.conn().handshake()
    c.plain = True
    send_block(c, 1, plain_block(c.fields(extra=[("x-big-%d" % i, "b" * 4000)
                                                 for i in range(18)])))
    c.next_sid = 3
    return refused_and_alive(c, 1)


@case("abuse/headers/count", "a header list of 200 small fields -> the stream is refused, the "
      "connection survives", abuse=True)
def _(ctx):
    c = ctx.conn().handshake()
    c.plain = True
    send_block(c, 1, plain_block(c.fields(extra=[("x-f%d" % i, "v") for i in range(200)])))
    c.next_sid = 3
    return refused_and_alive(c, 1)


@case("abuse/headers/hpack-bomb", "a small block decoding to > 64 KiB (dynamic table "
      "references) -> the stream is refused, the connection survives", abuse=True)
def _(ctx):
    c = ctx.conn().handshake()
    c.plain = True
    block = hand_request(ctx, hp_lit("x-bomb", "b" * 3000, "inc") + hp_indexed(62) * 100)
    send_block(c, 1, block)
    c.next_sid = 3
    return refused_and_alive(c, 1)


@case("abuse/settings/many", "a SETTINGS frame with 100 entries -> GOAWAY ENHANCE_YOUR_CALM",
      abuse=True)
def _(ctx):
    c = ctx.conn().handshake()
    c.raw(SETTINGS, 0, 0, settings_raw([(S_HEADER_TABLE_SIZE, 4096 + i) for i in range(100)]))
    return c.conn_error(ENHANCE_YOUR_CALM)


def flood(ctx, c, frame_bytes, count=10000, batch=200):
    """Sends `count` copies, reading between batches; passes on GOAWAY ENHANCE_YOUR_CALM or
    a close, fails when all were accepted."""
    try:
        for _ in range(count // batch):
            c.send(frame_bytes * batch)
            if not c.drain() or c.goaway is not None:
                break
    except (Closed, WriteBlocked):
        pass
    if c.goaway is None and not c.closed:
        c.closed_within(ctx.read_timeout)
    if c.goaway is not None:
        if c.goaway.error_code != ENHANCE_YOUR_CALM:
            raise Fail("GOAWAY %s, expected ENHANCE_YOUR_CALM" % ename(c.goaway.error_code))
        return "GOAWAY ENHANCE_YOUR_CALM"
    if not c.closed:
        raise Fail("%d frames accepted: no GOAWAY, connection open" % count)
    return "closed without GOAWAY"


@case("abuse/flood/empty-data", "10,000 empty DATA frames -> GOAWAY ENHANCE_YOUR_CALM",
      abuse=True, budget=20)
def _(ctx):
    c = ctx.conn().handshake()
    sid = c.request("POST", ctx.routes.echo, extra=[("content-length", "1")], end_stream=False)
    return flood(ctx, c, raw_frame(DATA, 0, sid))


@case("abuse/flood/window-update", "10,000 WINDOW_UPDATE frames -> GOAWAY ENHANCE_YOUR_CALM",
      abuse=True, budget=20)
def _(ctx):
    c = ctx.conn().handshake()
    return flood(ctx, c, WindowUpdateFrame(0, window_increment=1).serialize())


def download_giving_back(ctx, c, n, step, inc_of):
    """GETs n bytes with auto_window off, giving credit back whenever `step` bytes of DATA
    came since the last time, on the stream and on the connection, in WINDOW_UPDATEs of
    inc_of(bytes owed) each (repeated until all is given back). Returns what ended it."""
    c.auto_window = False
    path, n = ctx.routes.big(n)
    sid = c.request(path=path)
    owed, end = 0, time.monotonic() + 20
    while time.monotonic() < end:
        try:
            f = c.read(timeout=max(0.0, end - time.monotonic()))
        except Closed:
            return "closed"
        if f is None:
            continue
        if isinstance(f, GoAwayFrame):
            return "GOAWAY " + ename(f.error_code)
        if isinstance(f, RstStreamFrame) and f.stream_id == sid:
            return "RST_STREAM " + ename(f.error_code)
        if isinstance(f, DataFrame) and f.stream_id == sid:
            owed += f.wire_len
            st = c.stream(sid)
            if st.end:
                return "body %d" % len(st.data)
            if owed >= step:
                out = b""
                while owed > 0:
                    inc = min(owed, inc_of(owed))
                    out += (WindowUpdateFrame(sid, window_increment=inc).serialize() +
                            WindowUpdateFrame(0, window_increment=inc).serialize())
                    owed -= inc
                c.send(out)
    return "timeout"


@case("abuse/window-update/earned", "a client giving credit back every 4 KiB it reads, on the "
      "stream and the connection (Go's transport): 24 MB served, no GOAWAY", budget=30.0)
def _(ctx):
    # (every WINDOW_UPDATE counted as a useless frame: two per 4 KiB against a budget that
    # grows by one per 16 KiB of DATA ended such a download with ENHANCE_YOUR_CALM at 16 MB)
    c = ctx.conn().handshake()
    n = 24000000
    got = download_giving_back(ctx, c, n, 4096, lambda owed: owed)
    if got != "body %d" % n:
        raise Fail("expected the whole body of %d bytes, got: %s" % (n, got))


@case("abuse/window-update/tiny", "credit given back 1 byte per WINDOW_UPDATE during a download "
      "-> GOAWAY ENHANCE_YOUR_CALM", abuse=True, budget=30.0)
def _(ctx):
    c = ctx.conn().handshake()
    got = download_giving_back(ctx, c, 24000000, 4096, lambda owed: 1)
    if got != "GOAWAY ENHANCE_YOUR_CALM":
        raise Fail("expected GOAWAY ENHANCE_YOUR_CALM, got: %s" % got)


@case("abuse/flood/priority", "10,000 PRIORITY frames -> GOAWAY ENHANCE_YOUR_CALM",
      abuse=True, budget=20)
def _(ctx):
    c = ctx.conn().handshake()
    return flood(ctx, c, PriorityFrame(3, depends_on=0, stream_weight=16).serialize())


@case("abuse/flood/settings", "10,000 SETTINGS frames -> GOAWAY ENHANCE_YOUR_CALM",
      abuse=True, budget=20)
def _(ctx):
    c = ctx.conn().handshake()
    return flood(ctx, c, raw_frame(SETTINGS, 0, 0))


@case("abuse/flood/ping", "10,000 PING frames -> GOAWAY ENHANCE_YOUR_CALM", abuse=True,
      budget=20)
def _(ctx):
    c = ctx.conn().handshake()
    return flood(ctx, c, raw_frame(PING, 0, 0, b"floodpng"))


@case("abuse/flood/rst", "10,000 RST_STREAM frames on a closed stream -> GOAWAY "
      "ENHANCE_YOUR_CALM", abuse=True, budget=20)
def _(ctx):
    c = ctx.conn().handshake()
    sid = c.request()
    c.ok(sid)
    return flood(ctx, c, RstStreamFrame(sid, error_code=CANCEL).serialize())


@case("abuse/output-flood", "PINGs while never reading: the server closes or stops reading "
      "(bounded output buffer)", abuse=True, budget=30)
def _(ctx):
    c = ctx.conn(rcvbuf=4096).handshake()
    batch = raw_frame(PING, 0, 0, b"outflood") * 1000
    sent = 0
    cap = max(ctx.flood_pings, 100000)
    try:
        while sent < cap:
            c.send(batch)
            sent += 1000
    except (Closed, WriteBlocked) as e:
        return "after %d PINGs: %s" % (sent, e)
    raise Fail("%d PINGs (%d MB) written without the server stalling or closing" % (
        sent, sent * 17 // 1000000))


@case("abuse/timeout/no-preface", "no preface: closed after the server's head timeout",
      abuse=True, budget=-1)
def _(ctx):
    c = ctx.conn()
    c.auto_ack = False      # no bytes at all from us
    return wait_closed(ctx, c)


@case("abuse/timeout/partial-preface", "half a preface: closed after the head timeout",
      abuse=True, budget=-1)
def _(ctx):
    c = ctx.conn()
    c.auto_ack = False
    c.send(PREFACE[:10])
    return wait_closed(ctx, c)


@case("abuse/timeout/unfinished-block", "HEADERS without END_HEADERS and no CONTINUATION: "
      "closed after a timeout", abuse=True, budget=-1)
def _(ctx):
    c = ctx.conn().handshake()
    block = hand_request(ctx)
    c.send(c.headers_frame(1, block[:4], end_headers=False))
    return wait_closed(ctx, c)


@case("abuse/timeout/idle", "an idle connection gets GOAWAY or is closed after the idle "
      "timeout", abuse=True, budget=-1)
def _(ctx):
    c = ctx.conn().handshake()
    c.ok(c.request(), ROOT_BODY)
    return wait_closed(ctx, c)


def timeout_wait(ctx):
    return ctx.scale * 3 + 1


def wait_closed(ctx, c):
    t0 = time.monotonic()
    how = c.closed_within(timeout_wait(ctx))
    if how is None:
        raise Fail("still open after %.1f s (--timeout-scale %g)" % (timeout_wait(ctx), ctx.scale))
    if how.startswith("goaway") and c.closed_within(ctx.read_timeout + ctx.scale) is None:
        raise Fail("%s after %.1f s, but the connection stayed open" % (how, time.monotonic() - t0))
    return "%s after %.1f s" % (how, time.monotonic() - t0)


# ---- the lax server (for checking that cases can fail) ---------------------------------------
def lax_server(port, grumpy=False):
    """Answers every finished request with 200 "hello" (or the echoed body / n bytes), ACKs
    SETTINGS and PING, ignores everything else, never sends GOAWAY or RST_STREAM, ignores flow
    control, never times out, and queues output without limit.
    grumpy: the opposite mistake, GOAWAY PROTOCOL_ERROR for every frame a server must accept
    but this one does not expect (PRIORITY, RST_STREAM, WINDOW_UPDATE, unknown types, PING ACK,
    PING with undefined flags, unknown settings, a set reserved bit)."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(64)
    print("lax server on 127.0.0.1:%d" % srv.getsockname()[1], flush=True)

    def serve(sock):
        out = queue.Queue()

        def writer():
            while True:
                item = out.get()
                if item is None:
                    sock.close()
                    return
                try:
                    sock.sendall(item)
                except OSError:
                    return
        threading.Thread(target=writer, daemon=True).start()
        enc, dec = Encoder(), Decoder()
        buf = bytearray()
        bodies, blocks, paths = {}, {}, {}

        def respond(sid):
            path = paths.get(sid, "/")
            body = bytes(bodies.get(sid, b"")) if path.startswith("/echo") else ROOT_BODY
            if path.startswith("/big?n="):
                body = b"x" * int(path[7:])
            out.put(raw_frame(HEADERS, END_HEADERS, sid, enc.encode([(":status", "200")])))
            for i in range(0, len(body), 16384):
                out.put(raw_frame(DATA, 0, sid, body[i:i + 16384]))
            out.put(raw_frame(HEADERS, END_HEADERS | END_STREAM, sid,
                              enc.encode([(TRAILER_NAME, "lax")])))

        try:
            out.put(raw_frame(SETTINGS, 0, 0, settings_raw([(S_MAX_CONCURRENT_STREAMS, 100)])))
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if buf.startswith(PREFACE[:len(buf)]) and len(buf) < 24:
                    continue
                if buf.startswith(PREFACE):
                    del buf[:24]
                while len(buf) >= 9:
                    n = int.from_bytes(buf[:3], "big")
                    if len(buf) < 9 + n:
                        break
                    t, fl, sid = buf[3], buf[4], int.from_bytes(buf[5:9], "big") & MAX_WINDOW
                    body = bytes(buf[9:9 + n])
                    reserved = buf[5] & 0x80
                    del buf[:9 + n]
                    if grumpy and (t in (PRIORITY, RST_STREAM, WINDOW_UPDATE) or t > 9 or
                                   (t == PING and fl) or reserved or
                                   (t == SETTINGS and any(body[i] or body[i + 1] > 6
                                                          for i in range(0, n - 5, 6)))):
                        out.put(raw_frame(GOAWAY, 0, 0, struct.pack(">II", 0, PROTOCOL_ERROR)))
                        out.put(None)
                        return
                    if t == SETTINGS and not fl & ACK:
                        out.put(raw_frame(SETTINGS, ACK, 0))
                    elif t == PING and not fl & ACK:
                        out.put(raw_frame(PING, ACK, 0, body[:8].ljust(8, b"\0")))
                    elif t in (HEADERS, CONTINUATION):
                        if t == HEADERS:
                            p = body[0] + 1 if fl & PADDED and body else 0
                            frag = body[p + (5 if fl & PRIO_FLAG else 0):len(body) -
                                        (body[0] if fl & PADDED and body else 0)]
                            blocks[sid] = [bytearray(frag), bool(fl & END_STREAM)]
                        elif sid in blocks:
                            blocks[sid][0] += body
                        else:
                            continue
                        if fl & END_HEADERS:
                            try:
                                fields = dec.decode(bytes(blocks[sid][0]))
                                for k, v in fields:
                                    if k == ":path":
                                        paths.setdefault(sid, v)
                            except Exception:  # noqa: BLE001
                                dec = Decoder()
                            if blocks.pop(sid)[1]:
                                respond(sid)
                    elif t == DATA:
                        p = body[0] + 1 if fl & PADDED and body else 0
                        bodies.setdefault(sid, bytearray()).extend(body[p:])
                        if fl & END_STREAM:
                            respond(sid)
        except OSError:
            pass
        finally:
            out.put(None)

    while True:
        s, _ = srv.accept()
        threading.Thread(target=serve, args=(s,), daemon=True).start()


def make_docroot(d):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "index.html"), "wb") as f:
        f.write(ROOT_BODY)
    with open(os.path.join(d, "big.bin"), "wb") as f:
        f.write((b"0123456789abcdef" * (NGHTTPD_BIG_SIZE // 16 + 1))[:NGHTTPD_BIG_SIZE])
    print("nghttpd --no-tls --echo-upload --trailer '%s: nghttpd' -d %s PORT" % (TRAILER_NAME, d))


# ---- main ------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description="HTTP/2 server conformance and abuse checks")
    ap.add_argument("host", nargs="?")
    ap.add_argument("port", nargs="?", type=int)
    ap.add_argument("--tls", action="store_true", help="TLS with ALPN h2 (no verification)")
    ap.add_argument("--case", action="append", default=[], metavar="SUBSTRING",
                    help="run only cases whose id or name contains SUBSTRING (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--json", action="store_true", help="print a JSON summary")
    ap.add_argument("-v", "--verbose", action="store_true",
                    help="print how each case passed (GOAWAY, RST_STREAM, close, status)")
    ap.add_argument("--routes", choices=["moonwire", "nghttpd"], default="moonwire")
    ap.add_argument("--no-abuse", action="store_true", help="skip the abuse/ cases")
    ap.add_argument("--timeout-scale", type=float, default=1.0, metavar="S",
                    help="the server's head/idle/header timeouts are at most S seconds (1)")
    ap.add_argument("--read-timeout", type=float, default=2.0, metavar="S",
                    help="the longest wait for one expected frame (2)")
    ap.add_argument("--max-time", type=float, default=900.0, metavar="S",
                    help="the whole run's budget; later cases fail (900)")
    ap.add_argument("--flood-pings", type=int, default=3000000, metavar="N",
                    help="abuse/output-flood: PINGs to write before judging (>= 100000)")
    ap.add_argument("--make-docroot", metavar="DIR", help="write nghttpd's files and exit")
    ap.add_argument("--lax-server", type=int, metavar="PORT", help="run the lax server")
    ap.add_argument("--grumpy", action="store_true",
                    help="with --lax-server: reject what a server must accept instead")
    args = ap.parse_args()

    if args.make_docroot:
        make_docroot(args.make_docroot)
        return 0
    if args.lax_server is not None:
        lax_server(args.lax_server, args.grumpy)
        return 0
    selected = [c for c in CASES
                if (not args.case or any(s in c["id"] or s in c["name"] for s in args.case))
                and not (args.no_abuse and c["abuse"])]
    if args.list:
        for c in selected:
            print("%s %s" % (c["id"], c["name"]))
        print("%d cases" % len(selected))
        return 0
    if args.host is None or args.port is None:
        ap.error("HOST and PORT are required")

    ctx = Ctx(args)
    ctx.flood_pings = args.flood_pings
    run_end = time.monotonic() + args.max_time
    results = []
    for c in selected:
        t0 = time.monotonic()
        detail = None
        budget = c["budget"] if c["budget"] > 0 else timeout_wait(ctx) * 2 + ctx.read_timeout + 5
        if t0 >= run_end:
            result, reason = "FAIL", "the run's --max-time budget is exhausted"
        else:
            ctx.deadline = min(t0 + budget, run_end)
            ctx.conns = []
            try:
                detail = c["fn"](ctx)
                result, reason = "PASS", ""
                if c["abuse"]:
                    for conn in ctx.conns:
                        conn.close()
                    ctx.deadline = min(time.monotonic() + ctx.read_timeout * 3, run_end + 5)
                    try:
                        fresh_get_ok(ctx)
                    except Fail as e:
                        result, reason = "FAIL", "after the case, a fresh GET / failed: %s" % e
            except Fail as e:
                result, reason = "FAIL", str(e)
            except Skip as e:
                result, reason = "SKIP", str(e)
            except Closed as e:
                result, reason = "FAIL", "connection closed unexpectedly (%s)" % e
            except WriteBlocked as e:
                result, reason = "FAIL", "our write blocked (%s)" % e
            except Exception as e:  # noqa: BLE001 -- a driver bug must not stop the run
                result, reason = "FAIL", "driver error %s: %s" % (type(e).__name__, e)
            finally:
                for conn in ctx.conns:
                    conn.close()
        secs = time.monotonic() - t0
        results.append({"id": c["id"], "name": c["name"], "result": result, "reason": reason,
                        "seconds": round(secs, 3)})
        if result == "PASS" and detail:
            results[-1]["detail"] = str(detail)
        if not args.json:
            line = "%s %s %s" % (result, c["id"], c["name"])
            print(line + (": " + reason if reason else ""), flush=True)
            if args.verbose and result == "PASS" and detail:
                print("    (%s, %.2f s)" % (detail, secs), flush=True)
    passed = sum(r["result"] == "PASS" for r in results)
    failed = sum(r["result"] == "FAIL" for r in results)
    skipped = sum(r["result"] == "SKIP" for r in results)
    if args.json:
        print(json.dumps({"passed": passed, "failed": failed, "skipped": skipped,
                          "cases": results}, indent=1))
    else:
        print("%d passed, %d failed%s" % (passed, failed,
                                          ", %d skipped" % skipped if skipped else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
