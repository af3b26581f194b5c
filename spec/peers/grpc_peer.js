// gRPC peer for spec/grpc_interop_spec.lua: Node's @grpc/grpc-js (the gRPC implementation
// of Node, pure JS) as a server for moonwire's HTTP/2 client and as a client of moonwire's
// HTTP/2 server, cleartext (prior knowledge), 127.0.0.1 only. Messages are raw bytes (no
// protobuf: the methods serialize Buffers as they are), so the Lua side writes the gRPC
// framing (1-byte flag, 4-byte length) by hand, as a Lua gRPC library on moonwire would.
//
// The service mw.Echo:
//   Say (unary)            -> "echo:" + the request; trailing metadata x-served-by: grpc-js
//   Fail (unary)           -> status NOT_FOUND (5), details "no such thing"
//   Count (server stream)  -> the request is a decimal N: messages "n:1" .. "n:N"
//   Collect (client stream)-> the requests joined with "+"
//
//   node grpc_peer.js server          prints "port=N", serves until SIGTERM
//   node grpc_peer.js client PORT     calls each method on 127.0.0.1:PORT and prints a line per
//                                     call, tab-separated: method=, code= (the gRPC status),
//                                     details=, replies= (joined with "|"), trailer= (the
//                                     x-served-by trailing metadata); then 50 Say calls at once
//                                     (method=Burst good=<replies that matched>); exit 0 at the end
const grpc = require('@grpc/grpc-js');

const raw = (b) => b;
function method(name, requestStream, responseStream) {
  return {
    path: `/mw.Echo/${name}`, requestStream, responseStream,
    requestSerialize: raw, requestDeserialize: raw, responseSerialize: raw, responseDeserialize: raw,
  };
}
const service = {
  say: method('Say', false, false),
  fail: method('Fail', false, false),
  count: method('Count', false, true),
  collect: method('Collect', true, false),
};

function serve() {
  const server = new grpc.Server();
  server.addService(service, {
    say(call, cb) {
      const trailer = new grpc.Metadata();
      trailer.set('x-served-by', 'grpc-js');
      cb(null, Buffer.concat([Buffer.from('echo:'), call.request]), trailer);
    },
    fail(call, cb) { cb({ code: grpc.status.NOT_FOUND, details: 'no such thing' }); },
    count(call) {
      const n = parseInt(call.request.toString(), 10);
      for (let i = 1; i <= n; i++) call.write(Buffer.from(`n:${i}`));
      call.end();
    },
    collect(call, cb) {
      const got = [];
      call.on('data', (m) => got.push(m.toString()));
      call.on('end', () => cb(null, Buffer.from(got.join('+'))));
    },
  });
  server.bindAsync('127.0.0.1:0', grpc.ServerCredentials.createInsecure(), (err, port) => {
    if (err) { console.error(err.message); process.exit(1); }
    console.log(`port=${port}`);
  });
  process.on('SIGTERM', () => { server.forceShutdown(); process.exit(0); });
}

function call(client, name, kind, arg) {
  return new Promise((resolve) => {
    const out = { method: name, replies: [] };
    const md = new grpc.Metadata();
    const deadline = new Date(Date.now() + 10000);
    const done = (err) => {
      out.code = err ? err.code : 0;
      out.details = err ? err.details : '';
      resolve(out);
    };
    const onStatus = (s) => { out.trailer = s.metadata.get('x-served-by')[0] || null; };
    if (kind === 'unary') {
      const c = client.makeUnaryRequest(`/mw.Echo/${name}`, raw, raw, Buffer.from(arg), md, { deadline },
        (err, reply) => { if (reply) out.replies.push(reply.toString()); done(err); });
      c.on('status', onStatus);
    } else if (kind === 'server') {
      const c = client.makeServerStreamRequest(`/mw.Echo/${name}`, raw, raw, Buffer.from(arg), md, { deadline });
      c.on('data', (m) => out.replies.push(m.toString()));
      c.on('error', (err) => done(err));
      c.on('status', (s) => { onStatus(s); if (s.code === 0) done(null); });
    } else {
      const c = client.makeClientStreamRequest(`/mw.Echo/${name}`, raw, raw, md, { deadline },
        (err, reply) => { if (reply) out.replies.push(reply.toString()); done(err); });
      c.on('status', onStatus);
      for (const m of arg) c.write(Buffer.from(m));
      c.end();
    }
  });
}

async function client(port) {
  const c = new grpc.Client(`127.0.0.1:${port}`, grpc.credentials.createInsecure());
  const calls = [
    ['Say', 'unary', 'ping'],
    ['Fail', 'unary', 'x'],
    ['Count', 'server', '3'],
    ['Collect', 'client', ['a', 'bb', 'ccc']],
    ['Missing', 'unary', 'x'],
  ];
  for (const [name, kind, arg] of calls) {
    const r = await call(c, name, kind, arg);
    console.log([`method=${r.method}`, `code=${r.code}`, `details=${r.details}`,
      `replies=${r.replies.join('|')}`, `trailer=${r.trailer || ''}`].join('\t'));
  }
  // 50 unary calls at once (multiplexed on the channel's connection): how many came back
  // with their own reply
  const burst = await Promise.all(Array.from({ length: 50 }, (_, i) => call(c, 'Say', 'unary', `b${i}`)));
  const good = burst.filter((r, i) => r.code === 0 && r.replies[0] === `echo:b${i}`).length;
  console.log(`method=Burst\tcode=0\tgood=${good}`);
  c.close();
}

if (process.argv[2] === 'server') serve();
else if (process.argv[2] === 'client') client(+process.argv[3]);
else { console.error('usage: grpc_peer.js server | client PORT'); process.exit(2); }
