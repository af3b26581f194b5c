#!/usr/bin/python3
"""A scripted HTTP/2 server (cleartext, prior knowledge) for moonwire's HTTP/2 client spec,
on Debian's python3-h2.

    /usr/bin/python3 spec/peers/h2_fake_server.py MODE [--lifetime SECONDS]

Listens on 127.0.0.1 (port chosen by the kernel) and prints `event=listening port=N`, then
`event=request conn=C stream=S path=P` for every request it sees. Answers 200 with the body
"conn=C stream=S". MODE:
    goaway   on the first connection: answers stream 1, then, once three more requests
             arrived, sends GOAWAY with last_stream_id 1 (they were not processed) and closes;
             every later connection is answered normally
    goaway_each
             the same on every connection (as nginx's after http2_max_requests)
    refuse   resets the first request of the first connection with REFUSED_STREAM
    drop     the first connection allows one stream at a time (MAX_CONCURRENT_STREAMS 1)
             and closes, without GOAWAY or answer, once its first request arrived; every
             later connection is answered normally
    goaway_queued
             the first connection allows one stream at a time; it answers stream 1 with
             its head and one byte "a", sends GOAWAY with last_stream_id 1 (the client's
             requests queued behind stream 1 will never go on it), and sends the rest of the
             body ("b") a second later; every later connection is answered normally
    window0  INITIAL_WINDOW_SIZE 0: a request body can never be sent; a request without
             one is answered normally, one with a body never
    goaway_at_once
             every connection sends GOAWAY (last_stream_id 0, NO_ERROR) right after its
             SETTINGS (`event=goaway conn=C`) and answers nothing
    push     sends a PUSH_PROMISE on every request's stream (though the client's
             ENABLE_PUSH is 0, a connection error), then answers it
    hang_first
             every connection allows one stream at a time (MAX_CONCURRENT_STREAMS 1); the
             first request of the first connection is never answered (`event=reset
             stream=S` when the client resets it), every other one is
    silent   answers nothing
    status600
             answers a request for /600 with :status 600 (outside RFC 9110's 100..599), the
             others normally
    mcs0     MAX_CONCURRENT_STREAMS 0 on every connection: no request can start
    badlen   answers /more with content-length 3 and 6 bytes of DATA, /less with
             content-length 10 and 3 bytes, the others normally
    hints    answers a request for /hN with N 103 (Early Hints) heads before its 200, and
             /datafree with a 200 head and then empty DATA frames without end (until the
             client goes), the others normally
    normal   answers everything
It prints `event=closed conn=C` when a connection's client closes it.
"""
import argparse
import socket
import struct
import threading
import time

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings


def emit(**kv):
    print("\t".join("%s=%s" % (k, v) for k, v in kv.items()), flush=True)


def frame(ftype, flags, sid, payload):
    """a raw HTTP/2 frame (what python-h2 refuses to send)"""
    return struct.pack(">I", len(payload))[1:] + bytes([ftype, flags]) + struct.pack(">I", sid) + payload


def serve(sock, conn_no, mode):
    conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=False))
    if mode == "hang_first" or (mode in ("drop", "goaway_queued") and conn_no == 1):
        conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1})
    if mode == "window0":
        conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    if mode == "mcs0":
        conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 0})
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    if mode == "goaway_at_once":
        conn.close_connection(error_code=h2.errors.ErrorCodes.NO_ERROR, last_stream_id=0)
        sock.sendall(conn.data_to_send())
        emit(event="goaway", conn=conn_no)
        try:
            while sock.recv(65536):
                pass
        except OSError:
            pass
        emit(event="closed", conn=conn_no)
        sock.close()
        return
    pending = []
    refused = False
    while True:
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            emit(event="closed", conn=conn_no)
            break
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                hdrs = dict((k.decode() if isinstance(k, bytes) else k, v.decode() if isinstance(v, bytes) else v)
                            for k, v in ev.headers)
                sid = ev.stream_id
                emit(event="request", conn=conn_no, stream=sid, path=hdrs.get(":path"))
                if mode == "silent" or (mode == "hang_first" and conn_no == 1 and sid == 1):
                    continue
                if mode == "drop" and conn_no == 1:
                    time.sleep(0.2)        # the client's other requests wait for the slot
                    sock.close()
                    return
                if mode == "refuse" and conn_no == 1 and not refused:
                    refused = True
                    conn.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
                    continue
                if (mode == "goaway" and conn_no == 1 or mode == "goaway_each") and sid > 1:
                    pending.append(sid)
                    if len(pending) >= 3:
                        conn.close_connection(error_code=h2.errors.ErrorCodes.NO_ERROR, last_stream_id=1)
                        sock.sendall(conn.data_to_send())
                        time.sleep(0.2)
                        sock.close()
                        return
                    continue
                if mode == "goaway_queued" and conn_no == 1:
                    conn.send_headers(sid, [(":status", "200")])
                    conn.send_data(sid, b"a")
                    sock.sendall(conn.data_to_send())
                    time.sleep(0.05)
                    sock.sendall(frame(7, 0, 0, struct.pack(">II", sid, 0)))   # GOAWAY(last=sid)
                    time.sleep(1)
                    conn.send_data(sid, b"b", end_stream=True)
                    sock.sendall(conn.data_to_send())
                    continue
                if mode == "window0" and not ev.stream_ended:
                    continue
                if mode == "push":
                    sock.sendall(conn.data_to_send())
                    block = conn.encoder.encode([(":method", "GET"), (":scheme", "http"),
                                                 (":authority", "x"), (":path", "/pushed")])
                    sock.sendall(frame(5, 4, sid, struct.pack(">I", 2) + block))  # PUSH_PROMISE
                hpath = hdrs.get(":path") or ""
                if mode == "hints" and hpath.startswith("/h"):
                    sock.sendall(conn.data_to_send())
                    hint = frame(1, 4, sid, conn.encoder.encode([(":status", "103"), ("link", "</a>")]))
                    sock.sendall(hint * int(hpath[2:]))        # HEADERS, END_HEADERS
                if mode == "hints" and hpath == "/datafree":
                    sock.sendall(conn.data_to_send())
                    sock.sendall(frame(1, 4, sid, conn.encoder.encode([(":status", "200")])))
                    try:
                        while True:
                            sock.sendall(frame(0, 0, sid, b"") * 256)   # empty DATA, no END_STREAM
                    except OSError:
                        break
                if mode == "badlen" and hpath in ("/more", "/less"):
                    sock.sendall(conn.data_to_send())
                    clen = "3" if hpath == "/more" else "10"
                    sock.sendall(frame(1, 4, sid, conn.encoder.encode([(":status", "200"), ("content-length", clen)])))
                    sock.sendall(frame(0, 1, sid, b"abcdef" if hpath == "/more" else b"abc"))   # END_STREAM
                    continue
                if mode == "status600" and hdrs.get(":path") == "/600":
                    sock.sendall(conn.data_to_send())
                    block = conn.encoder.encode([(":status", "600"), ("content-length", "0")])
                    sock.sendall(frame(1, 5, sid, block))       # HEADERS, END_STREAM|END_HEADERS
                    continue
                body = ("conn=%d stream=%d" % (conn_no, sid)).encode()
                conn.send_headers(sid, [(":status", "200"), ("content-length", str(len(body)))])
                conn.send_data(sid, body, end_stream=True)
            elif isinstance(ev, h2.events.StreamReset):
                emit(event="reset", conn=conn_no, stream=ev.stream_id)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                emit(event="closed", conn=conn_no)
                sock.close()
                return
        out = conn.data_to_send()
        if out:
            sock.sendall(out)
    sock.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode")
    ap.add_argument("--lifetime", type=float, default=30)
    args = ap.parse_args()
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 0))
    ls.listen(16)
    emit(event="listening", port=ls.getsockname()[1])
    ls.settimeout(args.lifetime)
    n = 0
    while True:
        try:
            s, _ = ls.accept()
        except socket.timeout:
            return
        n += 1
        threading.Thread(target=serve, args=(s, n, args.mode), daemon=True).start()


if __name__ == "__main__":
    main()
