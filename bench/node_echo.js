// Node.js `net` echo server, the peer bench/tcp_echo compares moonwire with.
//   node bench/node_echo.js [host] [port]      (default 127.0.0.1 0)
// Prints "listening on HOST:PORT"; SIGINT/SIGTERM stop it.
'use strict';
const net = require('net');

const host = process.argv[2] || '127.0.0.1';
const port = Number(process.argv[3] || 0);

const server = net.createServer({ noDelay: true }, (sock) => {
  sock.on('data', (chunk) => sock.write(chunk));
  sock.on('error', () => sock.destroy());
});
server.on('error', (err) => {
  console.error(`node_echo: ${err.message}`);
  process.exit(1);
});
server.listen(port, host, () => {
  const a = server.address();
  const h = a.family === 'IPv6' || a.family === 6 ? `[${a.address}]` : a.address;
  process.stdout.write(`listening on ${h}:${a.port}\n`);
});
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => {
    server.close();
    process.exit(0);
  });
}
