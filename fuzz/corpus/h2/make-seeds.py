#!/usr/bin/python3
"""Writes the seed corpus of fuzz/h2_frames.c into this directory: valid HTTP/2 frame
sequences a client sends after its preface (the harness adds the preface itself). Each
header block of a seed is HPACK-encoded by one encoder, so the dynamic table stays in step
with the server's decoder. The handler's behaviour depends on a selector byte computed from
the request target (see fuzz/h2_frames.c: last byte of the target xor 7 * its length), so
the seeds pick targets that give the selectors they want. Run: /usr/bin/python3 make-seeds.py
"""
import os
import string

import hpack
from hyperframe.frame import (ContinuationFrame, DataFrame, GoAwayFrame, HeadersFrame,
                              PingFrame, PriorityFrame, RstStreamFrame, SettingsFrame,
                              WindowUpdateFrame)

HERE = os.path.dirname(os.path.abspath(__file__))
READ_ALL, READ_CHUNK, DISCARD, NO_READ = 0, 1, 2, 3
SEND, STREAM, STREAM_204, RESET = 0, 4, 8, 12
SMALL_MAX, BIG, HINT, TRAILERS = 16, 48, 64, 128


def target(sel, prefix="/t"):
    """A target (printable, no '?') whose selector is sel."""
    for pad in range(0, 40):
        for ch in string.ascii_letters + string.digits + "-._~":
            t = prefix + "x" * pad + ch
            if (ord(t[-1]) ^ (len(t) * 7)) & 0xFF == sel:
                return t
    raise ValueError(sel)


class Conn:
    def __init__(self, settings=None):
        self.enc = hpack.Encoder()
        self.out = b""
        s = SettingsFrame(0)
        for k, v in (settings or {}).items():
            s.settings[k] = v
        self.add(s)
        self.add(SettingsFrame(0, flags=["ACK"]))

    def add(self, frame):
        self.out += frame.serialize()

    def headers(self, sid, fields, end_stream=True, split=0, **kw):
        block = self.enc.encode(fields)
        flags = ["END_STREAM"] if end_stream else []
        if split and len(block) > split:
            self.add(HeadersFrame(sid, block[:split], flags=flags, **kw))
            rest = block[split:]
            while rest:
                piece, rest = rest[:split], rest[split:]
                self.add(ContinuationFrame(sid, piece, flags=[] if rest else ["END_HEADERS"]))
        else:
            self.add(HeadersFrame(sid, block, flags=flags + ["END_HEADERS"], **kw))

    def request(self, sid, method, sel, body=None, extra=(), end_stream=None, **kw):
        fields = [(":method", method), (":scheme", "https"), (":path", target(sel)),
                  (":authority", "example.com")] + list(extra)
        if end_stream is None:
            end_stream = body is None
        self.headers(sid, fields, end_stream=end_stream, **kw)
        if body is not None:
            self.add(DataFrame(sid, body, flags=["END_STREAM"]))

    def save(self, name):
        with open(os.path.join(HERE, name + ".bin"), "wb") as f:
            f.write(self.out)


def main():
    c = Conn()
    c.save("settings")

    c = Conn()
    c.request(1, "GET", READ_ALL | SEND)
    c.save("get")

    c = Conn()
    c.request(1, "HEAD", READ_ALL | SEND | BIG)
    c.save("head")

    c = Conn()
    c.request(1, "POST", READ_ALL | SEND, body=b"hello=world",
              extra=[("content-length", "11"), ("content-type", "text/plain")])
    c.save("post")

    c = Conn()
    c.request(1, "POST", READ_CHUNK | STREAM | TRAILERS, end_stream=False)
    c.add(DataFrame(1, b"one "))
    c.add(DataFrame(1, b"two ", pad_length=5, flags=["PADDED"]))
    c.add(DataFrame(1, b"three"))
    c.headers(1, [("x-trailer", "yes")], end_stream=True)
    c.save("post_chunks_trailers")

    c = Conn()
    c.request(1, "PUT", DISCARD | STREAM_204, body=b"x" * 3000, extra=[("content-length", "3000")])
    c.save("put_discard")

    c = Conn()
    c.request(1, "POST", READ_ALL | SEND, body=b"short", extra=[("content-length", "10")])
    c.save("content_length_mismatch")

    c = Conn()
    c.request(1, "GET", NO_READ | SEND | HINT, split=40,
              extra=[("user-agent", "seed/1.0 " + "u" * 60), ("accept", "*/*"),
                     ("cookie", "a=1"), ("cookie", "b=2"), ("x-rep", "1"), ("x-rep", "2")])
    c.save("continuation")

    c = Conn()
    c.request(1, "POST", READ_ALL | SEND, end_stream=False)
    c.add(DataFrame(1, b"partial"))
    c.add(RstStreamFrame(1, error_code=8))
    c.request(3, "GET", READ_CHUNK | RESET)
    c.save("rst_stream")

    c = Conn()
    c.add(PingFrame(0, opaque_data=b"12345678"))
    c.add(WindowUpdateFrame(0, window_increment=100000))
    c.add(PriorityFrame(3, depends_on=0, stream_weight=200, exclusive=False))
    c.request(1, "GET", READ_ALL | STREAM | BIG)
    c.add(WindowUpdateFrame(1, window_increment=65536))
    c.add(PingFrame(0, opaque_data=b"abcdefgh", flags=["ACK"]))
    c.save("ping_window_priority")

    c = Conn()
    hf = c.enc.encode([(":method", "GET"), (":scheme", "http"), (":path", target(SEND | TRAILERS)),
                       (":authority", "localhost")])
    c.add(HeadersFrame(1, hf, flags=["END_STREAM", "END_HEADERS", "PRIORITY"],
                       depends_on=0, stream_weight=32, exclusive=True))
    c.save("headers_priority")

    c = Conn()
    c.request(1, "GET", READ_ALL | SEND)
    c.request(3, "GET", NO_READ | STREAM)
    c.add(GoAwayFrame(0, last_stream_id=0, error_code=0, additional_data=b"bye"))
    c.save("goaway")

    c = Conn()
    for i, sel in enumerate([READ_ALL | SEND, READ_CHUNK | STREAM, DISCARD | STREAM_204,
                             NO_READ | RESET, READ_ALL | SEND | BIG | TRAILERS, HINT | STREAM]):
        c.request(1 + 2 * i, "GET", sel)
    c.save("many_streams")

    c = Conn()
    c.headers(1, [(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "https"),
                  (":path", target(READ_CHUNK | STREAM)), (":authority", "example.com"),
                  ("sec-websocket-version", "13")], end_stream=False)
    c.add(DataFrame(1, b"\x81\x85\x00\x00\x00\x00hello"))
    c.save("extended_connect")

    c = Conn()
    c.request(1, "POST", READ_ALL | SEND, end_stream=False,
              extra=[("expect", "100-continue"), ("content-length", "4")])
    c.add(DataFrame(1, b"body", flags=["END_STREAM"]))
    c.save("expect_continue")

    c = Conn(settings={SettingsFrame.INITIAL_WINDOW_SIZE: 16, SettingsFrame.MAX_FRAME_SIZE: 16384})
    c.request(1, "GET", READ_ALL | STREAM | BIG)
    c.add(WindowUpdateFrame(1, window_increment=1000))
    c.add(SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 65535}))
    c.save("small_window")

    c = Conn()
    c.request(1, "POST", READ_CHUNK | SEND, end_stream=False)
    for _ in range(3):
        c.add(DataFrame(1, b"y" * 2000))
    c.add(DataFrame(1, b"", flags=["END_STREAM"]))
    c.save("body_window")

    c = Conn()
    c.request(1, "POST", READ_ALL | SEND | SMALL_MAX, end_stream=False)
    c.add(DataFrame(1, b"z" * 5000, flags=["END_STREAM"]))
    c.save("body_too_large")

    c = Conn(settings={SettingsFrame.HEADER_TABLE_SIZE: 0, SettingsFrame.ENABLE_PUSH: 0,
                       SettingsFrame.MAX_CONCURRENT_STREAMS: 10})
    c.enc.header_table_size = 256
    c.request(1, "OPTIONS", READ_ALL | SEND, extra=[("x-long", "v" * 200)])
    c.request(3, "DELETE", READ_ALL | SEND, extra=[("x-long", "v" * 200)])
    c.save("hpack_table")

    for name, sel in (("patch_shutdown_a", READ_ALL | STREAM), ("patch_shutdown_b", READ_CHUNK | SEND)):
        c = Conn()
        c.request(1, "GET", READ_CHUNK | STREAM, end_stream=False)
        c.request(3, "PATCH", sel, body=b"{}")
        c.add(DataFrame(1, b"after the shutdown", flags=["END_STREAM"]))
        c.request(5, "GET", READ_ALL | SEND)
        c.save(name)

    # a connection error (a frame longer than SETTINGS_MAX_FRAME_SIZE) while a handler reads
    # a body / streams a response: nghttp2 ends the session with GOAWAY(FRAME_SIZE_ERROR)
    c = Conn()
    c.request(1, "POST", READ_ALL | SEND, end_stream=False)
    c.add(DataFrame(1, b"partial"))
    c.out += b"\x01\x00\x04\x00\x00\x00\x00\x00\x01" + b"x" * 20
    c.save("connection_error_partial_body")
    c = Conn()
    c.request(1, "GET", READ_ALL | STREAM | BIG)
    c.out += b"\x01\x00\x04\x00\x00\x00\x00\x00\x01" + b"x" * 20
    c.save("connection_error_streaming")


if __name__ == "__main__":
    main()
