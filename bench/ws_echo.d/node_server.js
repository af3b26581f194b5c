// Node.js WebSocket echo server for bench/ws_echo, with npm's `ws` (installed
// into spec/peers/node_modules by scripts/install-peers; the script sets
// NODE_PATH to it). Default options (no permessage-deflate, as ws 8 defaults);
// echoes every message with its type.
//   NODE_PATH=spec/peers/node_modules node bench/ws_echo.d/node_server.js [host] [port]
// (default 127.0.0.1 0). Prints "listening on ws://HOST:PORT/"; SIGINT/SIGTERM
// stop it.
'use strict';
const { WebSocketServer } = require('ws');

const host = process.argv[2] || '127.0.0.1';
const port = Number(process.argv[3] || 0);

const wss = new WebSocketServer({ host, port });
wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
  ws.on('error', () => {});
});
wss.on('error', (err) => {
  console.error(`node_server: ${err.message}`);
  process.exit(1);
});
wss.on('listening', () => {
  const a = wss.address();
  process.stdout.write(`listening on ws://${a.address}:${a.port}/\n`);
});
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => process.exit(0));
}
