"""asyncio echo server: a stand-in peer to check bench/tcp_echo itself.

    python3 bench/py_echo.py [host] [port]      (default 127.0.0.1 0)

Prints "listening on HOST:PORT"; SIGINT/SIGTERM stop it.
"""
import asyncio
import signal
import sys


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


async def main(host, port):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, host, port)
    h, p = server.sockets[0].getsockname()[:2]
    print(f"listening on {'[' + h + ']' if ':' in h else h}:{p}", flush=True)
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set_result, None)
    await stop
    server.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1",
                     int(sys.argv[2]) if len(sys.argv) > 2 else 0))
