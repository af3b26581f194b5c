// Node.js `http` hello server, a peer bench/http_hello compares moonwire with.
//   node bench/http_hello.d/node_hello.js [host] [port] [idle_timeout]
// (default 127.0.0.1 0 5). Same body and content-type as moonwire's hello;
// keep-alive as Node does by default; idle_timeout (seconds) sets
// server.keepAliveTimeout (Node's default is 5 s; the idle-connection
// measurement raises it). Prints "listening on http://HOST:PORT/";
// SIGINT/SIGTERM stop it.
'use strict';
const http = require('http');

const host = process.argv[2] || '127.0.0.1';
const port = Number(process.argv[3] || 0);
const idle = Number(process.argv[4] || 5);

const body = 'hello, world\n';
const server = http.createServer((req, res) => {
  res.setHeader('content-type', 'text/plain');
  res.end(body);
});
server.keepAliveTimeout = idle * 1000;
server.on('error', (err) => {
  console.error(`node_hello: ${err.message}`);
  process.exit(1);
});
server.listen(port, host, () => {
  const a = server.address();
  process.stdout.write(`listening on http://${a.address}:${a.port}/\n`);
});
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => {
    server.close();
    process.exit(0);
  });
}
