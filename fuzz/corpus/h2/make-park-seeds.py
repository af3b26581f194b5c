#!/usr/bin/python3
"""Writes the seeds of fuzz/h2_frames.c that pause (a frame of type 0xEE: the harness waits
there until the server has idled, trimmed its session and, for an input of even length,
parked its HPACK table): requests that index fields, the acknowledgement of the parking
SETTINGS, the size update that follows it, and requests after the unparking. Standard
library only (the HPACK blocks are written by hand). Run: /usr/bin/python3 make-park-seeds.py
"""
import os
import string
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
READ_ALL, READ_CHUNK, DISCARD, NO_READ = 0, 1, 2, 3
SEND, STREAM, STREAM_204, RESET = 0, 4, 8, 12


def target(sel, prefix="/p"):
    for pad in range(0, 40):
        for ch in string.ascii_letters + string.digits + "-._~":
            t = prefix + "x" * pad + ch
            if (ord(t[-1]) ^ (len(t) * 7)) & 0xFF == sel:
                return t
    raise ValueError(sel)


def frame(ftype, flags, sid, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", sid) + payload


def lit(s):
    s = s.encode()
    assert len(s) < 127
    return bytes([len(s)]) + s


def indexed_new(name, value):
    """a literal field with incremental indexing, new name"""
    return b"\x40" + lit(name) + lit(value)


def headers(sid, block, end_stream=True):
    return frame(1, 0x4 | (0x1 if end_stream else 0), sid, block)


SETTINGS = frame(4, 0, 0)
ACK = frame(4, 1, 0)
PAUSE = frame(0xEE, 0, 0)
SIZE0 = b"\x20"                 # dynamic table size update: 0
SIZE4096 = b"\x3f\xe1\x1f"      # dynamic table size update: 4096


def req(sel, extra=b""):
    # :method GET, :scheme https, :path (indexed name 4, incremental indexing), :authority
    return (b"\x82\x87" + b"\x44" + lit(target(sel)) + b"\x41" + lit("example.com") + extra)


def save(name, out):
    if len(out) % 2:
        out += frame(0xEF, 0, 0)[:1]     # even length: park_hpack on (a cut frame at the end)
    with open(os.path.join(HERE, name + ".bin"), "wb") as f:
        f.write(out)


def main():
    # request, pause (park), the parking acknowledged, pause (the rings' page trimmed), a
    # request with the size update, its SETTINGS (unpark) acknowledged, pause, requests that
    # index into the restored table and refer to the entries
    fields = indexed_new("x-a", "a" * 40) + indexed_new("cookie", "c=" + "k" * 100)
    out = SETTINGS + ACK + headers(1, req(READ_ALL | SEND, fields)) + PAUSE
    out += ACK + PAUSE
    out += headers(3, SIZE0 + req(READ_ALL | SEND)) + ACK + PAUSE
    out += headers(5, SIZE4096 + req(READ_CHUNK | STREAM, fields))
    out += headers(7, req(DISCARD | SEND, b"\xbe\xbf")) + PAUSE
    out += ACK + headers(9, SIZE0 + req(READ_ALL | SEND))
    save("park_cycle", out)

    # a request whose body comes after a pause (the session trimmed while a stream is open)
    out = SETTINGS + ACK + headers(1, req(READ_CHUNK | SEND, indexed_new("x-b", "b" * 60)), end_stream=False)
    out += frame(0, 0, 1, b"first") + PAUSE + frame(0, 1, 1, b"second") + PAUSE
    out += ACK + headers(3, SIZE0 + req(READ_ALL | STREAM)) + PAUSE + ACK
    save("park_body", out)

    # pauses with nothing parked (no dynamic entries), then a request
    out = SETTINGS + ACK + PAUSE + headers(1, req(READ_ALL | SEND)) + PAUSE + ACK
    out += headers(3, req(NO_READ | RESET)) + PAUSE + frame(6, 0, 0, b"pingpong")
    save("pause_idle", out)


if __name__ == "__main__":
    main()
