#!/usr/bin/node
// WebSocket echo server for moonwire's interop specs (npm's `ws`, installed into
// spec/peers/node_modules by scripts/install-peers).
//
//   node spec/peers/node_server.js [CONFIG-JSON]
//   CONFIG: { "protocols": ["chat", ...], "deflate": false | true | { perMessageDeflate options },
//             "lifetime": seconds }
//
// Listens on 127.0.0.1, port chosen by the kernel, and reports on stdout one event a line as
// tab-separated key=value pairs: `event=listening port=N`, then `event=open ...` and
// `event=closed code=N reason=...` per connection. Echoes every message with its type, except
// the text commands
//   cmd:close CODE REASON   close with that code and reason
//   cmd:ping DATA           ping with DATA, wait for the pong, then send "pong:DATA"
//   cmd:info                answer with this connection's wire byte counts so far:
//                           "bytes_read=N bytes_written=N" (raw socket bytes, frames included)
// A deflate object gets `threshold: 0` unless it sets one (ws compresses nothing below 1 KiB
// by default). Exits by itself after `lifetime` seconds (the spec also ends it once done).
'use strict';
const { WebSocketServer } = require('ws');

const config = JSON.parse(process.argv[2] || '{}');
const clean = (v) => (v === undefined || v === null ? '' : String(v)).replace(/[\t\r\n]/g, ' ');
const emit = (kv) => process.stdout.write(
  Object.entries(kv).map(([k, v]) => `${k}=${clean(v)}`).join('\t') + '\n');

let deflate = config.deflate === undefined ? true : config.deflate;
if (deflate && typeof deflate === 'object') deflate = { threshold: 0, ...deflate };
else if (deflate === true) deflate = { threshold: 0 };

const protocols = config.protocols || [];
const wss = new WebSocketServer({
  host: '127.0.0.1',
  port: 0,
  perMessageDeflate: deflate,
  maxPayload: 32 * 1024 * 1024,
  handleProtocols: (offered) => protocols.find((p) => offered.has(p)) || false,
});

const responseExtensions = new WeakMap(); // request -> Sec-WebSocket-Extensions we answered
wss.on('headers', (headers, req) => {
  const line = headers.find((h) => /^sec-websocket-extensions:/i.test(h));
  responseExtensions.set(req, line ? line.replace(/^[^:]*:\s*/, '') : '');
});

wss.on('listening', () => emit({ event: 'listening', port: wss.address().port }));

wss.on('connection', (ws, req) => {
  const sock = req.socket;
  const pd = ws._extensions['permessage-deflate'];
  emit({
    event: 'open',
    path: req.url,
    subprotocol: ws.protocol,
    offer: req.headers['sec-websocket-extensions'],
    extensions: responseExtensions.get(req),
    negotiated: pd ? JSON.stringify(pd.params) : '',
  });
  let error = '';
  ws.on('error', (e) => { error = String(e && e.message); });
  ws.on('message', (data, isBinary) => {
    const text = isBinary ? null : data.toString();
    if (text !== null && text.startsWith('cmd:')) {
      const [cmd, ...rest] = text.slice(4).split(' ');
      const arg = rest.join(' ');
      if (cmd === 'close') {
        const [code, ...reason] = arg.split(' ');
        ws.close(Number(code), reason.join(' '));
      } else if (cmd === 'ping') {
        const onPong = (d) => {
          if (d.toString() !== arg) return;
          ws.off('pong', onPong);
          ws.send('pong:' + arg);
        };
        ws.on('pong', onPong);
        ws.ping(arg);
      } else if (cmd === 'info') {
        ws.send(`bytes_read=${sock.bytesRead} bytes_written=${sock.bytesWritten}`);
      } else {
        ws.send('unknown command: ' + cmd);
      }
      return;
    }
    ws.send(data, { binary: isBinary });
  });
  ws.on('close', (code, reason) => {
    emit({ event: 'closed', path: req.url, code, reason: reason.toString(), error });
  });
});

setTimeout(() => process.exit(0), (config.lifetime || 60) * 1000).unref();
setInterval(() => {}, 1 << 30); // stay up until the lifetime ends or the spec ends us
