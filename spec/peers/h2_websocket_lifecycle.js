// RFC 8441 client for spec/http2_spec.lua's WebSocket-over-HTTP/2 lifecycle cases: Node's
// http2 module opens extended CONNECTs (:protocol websocket) and prints what it sees, one
// line per event. Usage: node h2_websocket_lifecycle.js PORT MODE [ARG]
//   wait PATH   one WebSocket; sends "hello"; prints each frame the server sends
//               ("frame OP TEXT" or "close CODE"), answers a close with the same code and
//               prints "end" or "reset CODE" when the stream is over
//   drop PATHS  a WebSocket on each path (comma-separated), one connection; once each has
//               echoed "hello", the TCP connection is cut (no close frame, no GOAWAY):
//               prints "dropped"
//   reset N     N WebSockets on /echo, one after the other on one connection; each echoes
//               "hello", then the client resets it (CANCEL): prints "ok K refused R"
const http2 = require('http2');
const net = require('net');
const frame = require('./ws_frame');
const port = +process.argv[2], mode = process.argv[3], arg = process.argv[4];
setTimeout(() => { console.log('timeout'); process.exit(2); }, 8000).unref();

// calls onFrame(op, payload) for each whole (short, unmasked) server frame on req
function frames(req, onFrame) {
  let got = Buffer.alloc(0);
  req.on('data', (d) => {
    got = Buffer.concat([got, d]);
    while (got.length >= 2 && got.length >= 2 + (got[1] & 127)) {
      const op = got[0] & 15, len = got[1] & 127;
      const payload = got.slice(2, 2 + len);
      got = got.slice(2 + len);
      onFrame(op, payload);
    }
  });
}

function open(client, path) {
  return client.request({ ':method': 'CONNECT', ':protocol': 'websocket', ':path': path,
    ':scheme': 'http', ':authority': `127.0.0.1:${port}`, 'sec-websocket-version': '13' });
}

let sock;   // the TCP connection, ours to cut (Node forbids it through client.socket)
const client = http2.connect(`http://127.0.0.1:${port}`, {
  createConnection: () => (sock = net.connect(port, '127.0.0.1')) });
client.on('error', (e) => { if (mode !== 'drop') { console.log('error', e.message); process.exit(1); } });
client.on('remoteSettings', (s) => {
  if (!s.enableConnectProtocol) { console.log('no connect protocol'); process.exit(1); }
  if (mode === 'wait') {
    const req = open(client, arg);
    req.on('response', () => req.write(frame(1, 'hello')));
    frames(req, (op, payload) => {
      if (op === 8) {
        const code = payload.length >= 2 ? payload.readUInt16BE(0) : 1005;
        console.log('close', code);
        req.end(frame(8, payload.slice(0, 2)));
      } else console.log('frame', op, payload.toString());
    });
    req.on('end', () => { console.log('end'); client.close(); });
    req.on('close', () => {
      if (req.rstCode) console.log('reset', req.rstCode);
      client.close();
    });
  } else if (mode === 'drop') {
    let echoed = 0;
    const paths = arg.split(','), n = paths.length;
    for (const path of paths) {
      const req = open(client, path);
      req.on('error', () => {});
      req.on('response', () => req.write(frame(1, 'hello')));
      frames(req, () => {
        if (++echoed === n) {
          sock.destroy();
          console.log('dropped');
          process.exit(0);
        }
      });
    }
  } else if (mode === 'reset') {
    let ok = 0, refused = 0;
    const n = +arg;
    const next = (i) => {
      if (i === n) { console.log('ok', ok, 'refused', refused); client.close(); return; }
      const req = open(client, '/echo');
      let done = false;
      const finish = (good) => {
        if (done) return;
        done = true;
        if (good) ok++; else refused++;
        req.close(http2.constants.NGHTTP2_CANCEL);
        next(i + 1);
      };
      req.on('error', () => finish(false));
      req.on('response', (h) => {
        if (h[':status'] !== 200) return finish(false);
        req.write(frame(1, 'hello'));
      });
      frames(req, () => finish(true));
      req.on('close', () => finish(false));
    };
    next(0);
  }
});
