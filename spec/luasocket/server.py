#!/usr/bin/python3
"""Scripted TCP peer for spec/luasocket_spec.lua: the same byte sequences for the real
LuaSocket and for moonwire.socket. Prints "PORT DEADPORT" (a listening port and a port nobody
listens on), then serves until a connection sends "quit" (or 120 s pass). With CERT KEY
arguments it also prints a third port where the same scenarios run over TLS. Each connection names its scenario in its first
line; the steps are below. No timing: waits are on the client's own bytes or its EOF."""
import socket
import ssl
import sys
import struct
import threading


def read_line(c, buf):
    while b"\n" not in buf[0]:
        d = c.recv(4096)
        if not d:
            return None
        buf[0] += d
    line, _, rest = buf[0].partition(b"\n")
    buf[0] = rest
    return line


def read_eof(c, buf):
    data = buf[0]
    buf[0] = b""
    while True:
        d = c.recv(65536)
        if not d:
            return data
        data += d


SCENARIOS = {
    "lines": [("send", b"one\r\ntwo\nth\rree\r\n\nlast"), ("close",)],
    "lines_crlf_end": [("send", b"a\r\nb\r\n"), ("close",)],
    "all": [("send", b"hello\r\nworld\n"), ("close",)],
    "empty": [("close",)],
    "counts": [("send", b"abcdefghijklmnopqrstuvwxyz"), ("close",)],
    "timeout_line": [("send", b"ready\npar"), ("line",), ("send", b"tial\nrest"), ("close",)],
    "timeout_count": [("send", b"ready\n12345"), ("line",), ("send", b"67890"), ("close",)],
    "timeout_all": [("send", b"ready\nxyz"), ("line",), ("send", b"w"), ("close",)],
    "silent": [("eof",)],
    "echo": [("echo",)],
    "reset": [("line",), ("reset",)],
    "big": [("send", b"x" * 300000 + b"\nend"), ("close",)],
    "greet": [("send", b"220 hi\r\n"), ("echo",)],
}


def serve(c, quit):
    buf = [b""]
    try:
        name = read_line(c, buf)
        if name is None:
            return
        if name == b"quit":
            quit.set()
            return
        for step in SCENARIOS[name.decode()]:
            op = step[0]
            if op == "send":
                c.sendall(step[1])
            elif op == "line":
                if read_line(c, buf) is None:
                    break
            elif op == "eof":
                read_eof(c, buf)
            elif op == "echo":
                data = read_eof(c, buf)
                c.sendall(b"got %d:" % len(data) + data)
            elif op == "reset":
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif op == "close":
                pass
    except OSError:
        pass
    finally:
        if isinstance(c, ssl.SSLSocket):
            try:
                c.unwrap()   # close_notify, so the end is "closed" and not an unclean EOF
            except (OSError, ValueError):
                pass
        c.close()


def serve_tls(ctx, c, quit):
    try:
        c.settimeout(10)
        c = ctx.wrap_socket(c, server_side=True)
    except (OSError, ssl.SSLError):
        c.close()
        return
    serve(c, quit)


def main():
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()
    tls_srv = ctx = None
    if len(sys.argv) == 3:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(sys.argv[1], sys.argv[2])
        tls_srv = socket.socket()
        tls_srv.bind(("127.0.0.1", 0))
        tls_srv.listen(64)
        print(srv.getsockname()[1], dead_port, tls_srv.getsockname()[1], flush=True)
    else:
        print(srv.getsockname()[1], dead_port, flush=True)

    quit = threading.Event()

    def accept_loop(lsock, tls):
        while True:
            try:
                c, _ = lsock.accept()
            except OSError:
                return
            if tls:
                threading.Thread(target=serve_tls, args=(tls, c, quit), daemon=True).start()
            else:
                threading.Thread(target=serve, args=(c, quit), daemon=True).start()

    threading.Thread(target=accept_loop, args=(srv, None), daemon=True).start()
    if tls_srv:
        threading.Thread(target=accept_loop, args=(tls_srv, ctx), daemon=True).start()
    quit.wait(120)


if __name__ == "__main__":
    main()
