// A node `ws` client that breaks one of the server's limits, for spec/ws_interop_spec.lua:
// it sends one message and prints the close code and reason it gets ("close CODE REASON"),
// or "error MESSAGE". Usage: node ws_violation_client.js URL big|badtext BYTES
const WebSocket = require('ws');
const [url, kind, n] = [process.argv[2], process.argv[3], +process.argv[4]];
setTimeout(() => { console.log('timeout'); process.exit(2); }, 8000).unref();
const ws = new WebSocket(url, { perMessageDeflate: false });
ws.on('open', () => {
  const buf = Buffer.alloc(n, 0x61);
  if (kind === 'badtext') {
    buf[5] = 0xff;               // not UTF-8: the server must answer 1007
    ws.send(buf, { binary: false });
  } else {
    ws.send(buf, { binary: true });
  }
});
ws.on('close', (code, reason) => console.log('close', code, reason.toString()));
ws.on('error', (e) => console.log('error', e.message));
