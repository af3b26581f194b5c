// RFC 8441 client for spec/http2_spec.lua: Node's http2 module opens an extended CONNECT
// (:protocol websocket), sends one masked text frame, answers the echo with a close frame, and
// prints what it saw. Usage: node h2_websocket_client.js PORT
const http2 = require('http2');
const frame = require('./ws_frame');
const port = +process.argv[2];
const client = http2.connect(`http://127.0.0.1:${port}`);
client.on('error', e => { console.log('error', e.message); process.exit(1); });
client.on('remoteSettings', (s) => {
  if (!s.enableConnectProtocol) { console.log('no connect protocol'); process.exit(1); }
  const req = client.request({ ':method': 'CONNECT', ':protocol': 'websocket', ':path': '/ws',
    ':scheme': 'http', ':authority': `127.0.0.1:${port}`, 'sec-websocket-version': '13',
    'sec-websocket-protocol': 'chat' });
  req.on('response', (h) => { console.log('status', h[':status'], h['sec-websocket-protocol']);
    req.write(frame(1, 'hello over h2')); });
  let got = Buffer.alloc(0);
  req.on('data', (d) => {
    got = Buffer.concat([got, d]);
    if (got.length >= 2 && got.length >= 2 + (got[1] & 127)) {
      const op = got[0] & 15, len = got[1] & 127;
      console.log('frame', op, got.slice(2, 2 + len).toString());
      got = got.slice(2 + len);
      if (op === 1) req.write(frame(8, Buffer.from([0x03, 0xe8])));
    }
  });
  req.on('end', () => { console.log('end'); client.close(); });
  req.on('close', () => { console.log('closed'); });
});
