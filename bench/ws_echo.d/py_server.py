#!/usr/bin/python3
"""WebSocket echo server for bench/ws_echo with Debian's python3-websockets (asyncio).

    /usr/bin/python3 bench/ws_echo.d/py_server.py [host] [port]

(default 127.0.0.1 0). Echoes every message with its type. Keepalive pings are off
(ping_interval=None) so that idle connections stay idle, and so is compression (the load
client does not offer it anyway). Prints "listening on ws://HOST:PORT/"; SIGINT/SIGTERM
stop it.
"""
import asyncio
import signal
import sys

import websockets


async def echo(ws, path=None):
    try:
        async for msg in ws:
            await ws.send(msg)
    except websockets.ConnectionClosed:
        pass


async def main():
    host = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1"
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    async with websockets.serve(echo, host, port, ping_interval=None, compression=None,
                                backlog=511) as server:
        a = server.sockets[0].getsockname()
        print(f"listening on ws://{a[0]}:{a[1]}/", flush=True)
        await stop


asyncio.run(main())
