#!/usr/bin/node
// WebSocket client for moonwire's interop specs (npm's `ws`).
//
//   node spec/peers/node_client.js URL [CONFIG-JSON]
//   CONFIG: { "protocols": [...], "deflate": false | true | { perMessageDeflate options } }
//
// Runs the same exchange twice against a server that echoes and knows the text commands
// `cmd:ping DATA` (ping us, then send "pong:DATA") and `cmd:close CODE REASON`:
//   c1 (URL + "/c1"): text, binary, 1 MiB text (compressible; its wire bytes both ways are
//      reported as c1.big_text_wire_in/out) and 1 MiB binary, repeated compressible messages
//      (context takeover), a message with long-distance repeats (window bits), a ping of ours,
//      one of the server's, then WE close with 4000 "node says bye";
//   c2 (URL + "/c2"): one echo, then asks the SERVER to close with 4001 "server says bye";
//   c3 (URL + "/c3", when CONFIG.c3): sends "cmd:return" (our echo server's handler returns):
//      the connection must be closed with 1000.
// Prints key=value lines, then done=1; exits 1 on any failure (error=...).
'use strict';
const crypto = require('crypto');
const WebSocket = require('ws');

const MiB = 1024 * 1024;
const url = process.argv[2];
const config = JSON.parse(process.argv[3] || '{}');
const clean = (v) => (v === undefined || v === null ? '' : String(v)).replace(/[\t\r\n]/g, ' ');
const out = (k, v) => process.stdout.write(`${k}=${clean(v)}\n`);

let deflate = config.deflate === undefined ? true : config.deflate;
if (deflate && typeof deflate === 'object') deflate = { threshold: 0, ...deflate };
else if (deflate === true) deflate = { threshold: 0 };

function pattern(n) {
  const parts = [];
  let size = 0;
  for (let i = 0; size < n; i++) {
    const block = i.toString(16).padStart(8, '0') + '|abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUV';
    parts.push(block);
    size += block.length;
  }
  return parts.join('').slice(0, n);
}

// A connection with a message queue: next() resolves with the next message or the close.
function open(target) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(target, config.protocols || [], {
      perMessageDeflate: deflate, maxPayload: 32 * MiB, handshakeTimeout: 5000,
    });
    const queue = [];
    const waiters = [];
    const push = (item) => (waiters.length ? waiters.shift()(item) : queue.push(item));
    let responseExtensions = '';
    ws.on('upgrade', (res) => { responseExtensions = res.headers['sec-websocket-extensions'] || ''; });
    ws.on('message', (data, isBinary) => push({ data, isBinary }));
    ws.on('close', (code, reason) => push({ closed: true, code, reason: reason.toString() }));
    ws.on('error', (e) => { push({ error: e }); reject(e); });
    ws.on('open', () => resolve({
      ws,
      responseExtensions,
      next: (ms = 10000) => new Promise((res, rej) => {
        if (queue.length) return res(queue.shift());
        const timer = setTimeout(() => rej(new Error('no message within ' + ms + ' ms')), ms);
        waiters.push((item) => { clearTimeout(timer); res(item); });
      }),
    }));
  });
}

function reportOpen(c, prefix) {
  const pd = c.ws._extensions['permessage-deflate'];
  out(`${prefix}.protocol`, c.ws.protocol);
  out(`${prefix}.extensions`, c.responseExtensions);
  out(`${prefix}.negotiated`, pd ? JSON.stringify(pd.params) : '');
}

async function echo(c, prefix, name, msg) {
  const binary = Buffer.isBuffer(msg);
  c.ws.send(msg, { binary });
  const got = await c.next();
  if (got.error || got.closed) throw new Error(`${name}: ${got.error ? got.error.message : 'closed ' + got.code}`);
  const same = binary ? got.isBinary && Buffer.compare(got.data, msg) === 0
    : !got.isBinary && got.data.toString() === msg;
  if (!same) {
    throw new Error(`${name}: echo differs (${got.isBinary ? 'binary' : 'text'} of ${got.data.length})`);
  }
  out(`${prefix}.${name}`, 'ok');
}

async function c1() {
  const c = await open(url + '/c1');
  reportOpen(c, 'c1');
  await echo(c, 'c1', 'text', 'héllo wörld ✓ 🌙');
  await echo(c, 'c1', 'binary', Buffer.from(Array.from({ length: 1024 }, (_, i) => i % 256)));
  await echo(c, 'c1', 'empty', '');
  const sock = c.ws._socket;
  const r0 = sock.bytesRead;
  const w0 = sock.bytesWritten;
  await echo(c, 'c1', 'big_text', pattern(MiB));
  out('c1.big_text_wire_out', sock.bytesWritten - w0);
  out('c1.big_text_wire_in', sock.bytesRead - r0);
  await echo(c, 'c1', 'big_binary', crypto.randomBytes(MiB));
  const repeated = pattern(64 * 1024);
  for (let i = 1; i <= 3; i++) await echo(c, 'c1', 'repeat' + i, repeated);
  await echo(c, 'c1', 'window', crypto.randomBytes(2400).toString('base64').repeat(6));
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('no pong for our ping')), 5000);
    c.ws.once('pong', (d) => { clearTimeout(timer); out('c1.ping', d.toString() === 'node-ping' ? 'ok' : 'pong ' + d); resolve(); });
    c.ws.ping('node-ping');
  });
  let serverPinged = false;
  c.ws.once('ping', () => { serverPinged = true; }); // ws answers it with a pong by itself
  c.ws.send('cmd:ping srv-ping');
  const got = await c.next();
  out('c1.server_ping', serverPinged && !got.isBinary && String(got.data) === 'pong:srv-ping' ? 'ok' : 'got ' + String(got.data));
  c.ws.close(4000, 'node says bye');
  const closed = await c.next();
  out('c1.close_code', closed.code);
  out('c1.close_reason', closed.reason);
}

async function c2() {
  const c = await open(url + '/c2');
  reportOpen(c, 'c2');
  await echo(c, 'c2', 'text', 'before close');
  c.ws.send('cmd:close 4001 server says bye');
  const closed = await c.next();
  out('c2.close_code', closed.code);
  out('c2.close_reason', closed.reason);
}

async function c3() {
  const c = await open(url + '/c3');
  c.ws.send('cmd:return');
  const closed = await c.next();
  out('c3.close_code', closed.code);
}

const watchdog = setTimeout(() => { out('error', 'timed out'); process.exit(1); }, 30000);
(async () => {
  await c1();
  await c2();
  if (config.c3) await c3();
  out('done', 1);
  clearTimeout(watchdog);
})().catch((e) => {
  out('error', e && e.stack ? e.stack : e);
  process.exit(1);
});
