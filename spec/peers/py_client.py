#!/usr/bin/python3
"""WebSocket client for moonwire's interop specs (Debian's python3-websockets, asyncio).

    /usr/bin/python3 spec/peers/py_client.py URL [--protocols a,b] [--deflate default|off|JSON]

Runs the same exchange twice against a server that echoes and knows the text commands
`cmd:ping DATA` (ping us, then send "pong:DATA") and `cmd:close CODE REASON`:
  c1 (URL + "/c1"): text, binary, 1 MiB text and binary, repeated compressible messages (context
     takeover), a message with long-distance repeats (window bits), a ping of ours, a ping of
     the server's, then WE close with 4000 "python says bye";
  c2 (URL + "/c2"): one echo, then asks the SERVER to close with 4001 "server says bye";
  c3 (URL + "/c3", only with --c3): sends "cmd:return" (our echo server's handler returns):
     the connection must be closed with 1000.
Prints key=value lines (c1.text=ok, c1.protocol=..., c2.close_code=...), then done=1. Exit 1 on
any failure (the error is printed as error=...).
--deflate JSON: ClientPerMessageDeflateFactory keyword arguments.
"""
import argparse
import asyncio
import base64
import json
import random
import sys
import traceback

import websockets
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

MiB = 1024 * 1024


def clean(value):
    text = "" if value is None else str(value)
    return text.replace("\t", " ").replace("\n", " ").replace("\r", " ")


def out(key, value):
    print(f"{key}={clean(value)}", flush=True)


def describe(extensions):
    return ";".join(
        "%s(remote_no_context_takeover=%s,local_no_context_takeover=%s,"
        "remote_max_window_bits=%s,local_max_window_bits=%s)" % (
            e.name, e.remote_no_context_takeover, e.local_no_context_takeover,
            e.remote_max_window_bits, e.local_max_window_bits) for e in extensions)


def pattern(n):
    parts, size, i = [], 0, 0
    while size < n:
        block = "%08x|abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUV" % i
        parts.append(block)
        size += len(block)
        i += 1
    return "".join(parts)[:n]


async def echo(ws, prefix, name, msg):
    await ws.send(msg)
    got = await asyncio.wait_for(ws.recv(), 10)
    if type(got) is not type(msg) or got != msg:
        raise AssertionError(f"{name}: echo differs ({type(got).__name__} of {len(got)}, "
                             f"sent {type(msg).__name__} of {len(msg)})")
    out(f"{prefix}.{name}", "ok")


async def connect(url, args):
    kwargs = {"max_size": 32 * MiB, "ping_interval": None, "open_timeout": 5, "close_timeout": 5}
    if args.protocols:
        kwargs["subprotocols"] = args.protocols.split(",")
    if args.deflate == "off":
        kwargs["compression"] = None
    elif args.deflate != "default":
        kwargs["compression"] = None
        kwargs["extensions"] = [ClientPerMessageDeflateFactory(compress_settings={"memLevel": 5},
                                                               **json.loads(args.deflate))]
    return await websockets.connect(url, **kwargs)


def report_open(ws, prefix):
    out(f"{prefix}.protocol", ws.subprotocol)
    out(f"{prefix}.offer", ws.request_headers.get("Sec-WebSocket-Extensions"))
    out(f"{prefix}.extensions", ws.response_headers.get("Sec-WebSocket-Extensions"))
    out(f"{prefix}.negotiated", describe(ws.extensions))


async def c1(url, args):
    ws = await connect(url + "/c1", args)
    report_open(ws, "c1")
    await echo(ws, "c1", "text", "héllo wörld ✓ 🌙")
    await echo(ws, "c1", "binary", bytes(range(256)) * 4)
    await echo(ws, "c1", "empty", "")
    await echo(ws, "c1", "big_text", pattern(MiB))
    await echo(ws, "c1", "big_binary", random.randbytes(MiB))
    # the same compressible message again and again: with context takeover the copies refer
    # back into the previous message; without it they must not
    repeated = pattern(64 * 1024)
    for i in range(1, 4):
        await echo(ws, "c1", f"repeat{i}", repeated)
    # repeats 3000+ bytes apart: a compressor using a larger window than negotiated shows
    block = base64.b64encode(random.randbytes(2400)).decode()
    await echo(ws, "c1", "window", block * 6)
    # our ping: the server's receiving side answers
    waiter = await ws.ping(b"py-ping")
    await asyncio.wait_for(waiter, 5)
    out("c1.ping", "ok")
    # the server's ping: websockets answers it while we wait for the next message
    await ws.send("cmd:ping srv-ping")
    got = await asyncio.wait_for(ws.recv(), 10)
    out("c1.server_ping", "ok" if got == "pong:srv-ping" else "got " + repr(got))
    await ws.close(4000, "python says bye")
    out("c1.close_code", ws.close_code)
    out("c1.close_reason", ws.close_reason)


async def c2(url, args):
    ws = await connect(url + "/c2", args)
    report_open(ws, "c2")
    await echo(ws, "c2", "text", "before close")
    await ws.send("cmd:close 4001 server says bye")
    try:
        got = await asyncio.wait_for(ws.recv(), 10)
        out("c2.unexpected", repr(got))
    except websockets.ConnectionClosed as exc:
        out("c2.closed_by", type(exc).__name__)
    out("c2.close_code", ws.close_code)
    out("c2.close_reason", ws.close_reason)


async def c3(url, args):
    ws = await connect(url + "/c3", args)
    await ws.send("cmd:return")
    try:
        got = await asyncio.wait_for(ws.recv(), 10)
        out("c3.unexpected", repr(got))
    except websockets.ConnectionClosed:
        pass
    out("c3.close_code", ws.close_code)


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--c3", action="store_true")
    ap.add_argument("--protocols", default="")
    ap.add_argument("--deflate", default="default")
    args = ap.parse_args()
    await c1(args.url, args)
    await c2(args.url, args)
    if args.c3:
        await c3(args.url, args)
    out("done", 1)


try:
    asyncio.run(asyncio.wait_for(main(), 30))
except Exception as exc:
    out("error", repr(exc))
    traceback.print_exc()
    sys.exit(1)
