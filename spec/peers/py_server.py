#!/usr/bin/python3
"""WebSocket echo server for moonwire's interop specs (Debian's python3-websockets, asyncio).

    /usr/bin/python3 spec/peers/py_server.py [--protocols chat,other] [--deflate default|off|JSON]
                                             [--lifetime SECONDS]

Listens on 127.0.0.1, port chosen by the kernel, and reports on stdout, one event a line as
tab-separated key=value pairs: `event=listening port=N` first, then `event=open ...` and
`event=closed code=N reason=...` for every connection. Echoes every message with its type,
except text commands:
    cmd:close CODE REASON   closes with that code and reason
    cmd:ping DATA           pings with DATA, waits for the pong, then sends "pong:DATA"
--deflate JSON: ServerPerMessageDeflateFactory keyword arguments, e.g.
    {"server_no_context_takeover": true, "server_max_window_bits": 10}
Exits by itself after --lifetime seconds (the spec also ends it once done).
"""
import argparse
import asyncio
import json

import websockets
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory


def clean(value):
    text = "" if value is None else str(value)
    return text.replace("\t", " ").replace("\n", " ").replace("\r", " ")


def emit(**kv):
    print("\t".join(f"{k}={clean(v)}" for k, v in kv.items()), flush=True)


def describe(extensions):
    """The negotiated extensions as python sees them (its own objects)."""
    out = []
    for ext in extensions:
        out.append("%s(remote_no_context_takeover=%s,local_no_context_takeover=%s,"
                   "remote_max_window_bits=%s,local_max_window_bits=%s)" % (
                       ext.name, ext.remote_no_context_takeover, ext.local_no_context_takeover,
                       ext.remote_max_window_bits, ext.local_max_window_bits))
    return ";".join(out)


async def handler(ws):
    emit(event="open", path=ws.path, subprotocol=ws.subprotocol,
         offer=ws.request_headers.get("Sec-WebSocket-Extensions"),
         extensions=ws.response_headers.get("Sec-WebSocket-Extensions"),
         negotiated=describe(ws.extensions))
    error = None
    try:
        async for msg in ws:
            if isinstance(msg, str) and msg.startswith("cmd:"):
                cmd, _, arg = msg[4:].partition(" ")
                if cmd == "close":
                    code, _, reason = arg.partition(" ")
                    await ws.close(int(code), reason)
                elif cmd == "ping":
                    waiter = await ws.ping(arg.encode())
                    await asyncio.wait_for(waiter, 5)
                    await ws.send("pong:" + arg)
                else:
                    await ws.send("unknown command: " + cmd)
            else:
                await ws.send(msg)
    except websockets.ConnectionClosed:
        pass
    except Exception as exc:  # reported, so the spec shows it
        error = repr(exc)
    emit(event="closed", path=ws.path, code=ws.close_code, reason=ws.close_reason, error=error)


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--protocols", default="")
    ap.add_argument("--deflate", default="default")
    ap.add_argument("--lifetime", type=float, default=60)
    args = ap.parse_args()
    kwargs = {"max_size": 32 * 1024 * 1024, "ping_interval": None}
    if args.protocols:
        kwargs["subprotocols"] = args.protocols.split(",")
    if args.deflate == "off":
        kwargs["compression"] = None
    elif args.deflate != "default":
        params = json.loads(args.deflate)
        kwargs["compression"] = None
        kwargs["extensions"] = [ServerPerMessageDeflateFactory(compress_settings={"memLevel": 5}, **params)]
    async with websockets.serve(handler, "127.0.0.1", 0, **kwargs) as server:
        emit(event="listening", port=server.sockets[0].getsockname()[1])
        await asyncio.sleep(args.lifetime)


asyncio.run(main())
