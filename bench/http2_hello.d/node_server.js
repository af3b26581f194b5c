// Node.js `http2` peer for bench/http2_hello: one process, servers with the same answer
// (200, content-type text/plain, "hello world"): http2.createServer (cleartext, HTTP/2 by
// prior knowledge) and http2.createSecureServer (h2 by ALPN), with the core (stream) API,
// Node's fastest; and, for the idle-memory comparison, an `http` (HTTP/1.1) server in the
// same process. (allowHTTP1 would need a 'request' listener, which turns on the
// compatibility layer for every HTTP/2 stream too.) All on port 0.
//   node bench/http2_hello.d/node_server.js CERT KEY [host] [idle_timeout]
// Prints "listening on http://HOST:PORT/", "listening on https://HOST:PORT/" and
// "http1 on http://HOST:PORT/". idle_timeout (seconds; default 0 = none, Node's http2
// default) sets the HTTP/2 session timeout and the HTTP/1.1 keep-alive timeout (5 s by
// default). SIGINT/SIGTERM stop it.
'use strict';
const http = require('http');
const http2 = require('http2');
const fs = require('fs');

const [cert, key] = [process.argv[2], process.argv[3]];
const host = process.argv[4] || '127.0.0.1';
const idle = Number(process.argv[5] || 0);
if (!cert || !key) {
  console.error('usage: node_server.js CERT KEY [host] [idle_timeout]');
  process.exit(2);
}

const body = 'hello world';
const head = { ':status': 200, 'content-type': 'text/plain' };
function onStream(stream) {
  stream.respond(head);
  stream.end(body);
}

const plain = http2.createServer();
const tls = http2.createSecureServer({ cert: fs.readFileSync(cert), key: fs.readFileSync(key) });
for (const s of [plain, tls]) {
  s.on('stream', onStream);
  s.setTimeout(idle * 1000);
}
const h1 = http.createServer((req, res) => {
  res.setHeader('content-type', 'text/plain');
  res.end(body);
});
if (idle > 0) h1.keepAliveTimeout = idle * 1000;
const all = [plain, tls, h1];
for (const s of all) {
  s.on('error', (err) => { console.error(`node_server: ${err.message}`); process.exit(1); });
}
let up = 0;
for (const s of all) {
  s.listen(0, host, () => {
    if (++up < all.length) return;
    process.stdout.write(`listening on http://${host}:${plain.address().port}/\n` +
      `listening on https://${host}:${tls.address().port}/\n` +
      `http1 on http://${host}:${h1.address().port}/\n`);
  });
}
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => { for (const s of all) s.close(); process.exit(0); });
}
