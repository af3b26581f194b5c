// HTTP/2 client for spec/http2_spec.lua: Node's http2 module sends a GET and a streamed POST
// (three pieces written with pauses) over one connection, and prints status, version and
// body of each. Usage: node h2_node_client.js PORT
const http2 = require('http2');
const port = +process.argv[2];
const client = http2.connect(`http://127.0.0.1:${port}`);
client.on('error', (e) => { console.log('error', e.message); process.exit(1); });
function request(headers, pieces) {
  return new Promise((resolve) => {
    const req = client.request(headers);
    let body = '', status;
    req.on('response', (h) => { status = h[':status']; });
    req.setEncoding('utf8');
    req.on('data', (d) => { body += d; });
    req.on('end', () => resolve(`${status} ${body}`));
    if (!pieces) return;
    let i = 0;
    const next = () => {
      if (i === pieces.length) { req.end(); return; }
      req.write(pieces[i++]);
      setTimeout(next, 50);
    };
    next();
  });
}
(async () => {
  console.log(await request({ ':path': '/get' }));
  console.log(await request({ ':method': 'POST', ':path': '/stream' }, ['one ', 'two ', 'three']));
  client.close();
})();
