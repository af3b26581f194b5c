#!/usr/bin/node
// Several `ws` clients, each with its own permessage-deflate offer, that send back every
// message they receive (same type), for broadcast interop: the server checks what comes back.
//
//   node spec/peers/node_echoers.js URL CONFIGS-JSON COUNT
//   CONFIGS: a list of perMessageDeflate values (false, true or an options object), one per client
//
// Client i connects to URL + "?i=<i>", echoes COUNT messages, then closes with 1000 "echoed".
// Prints key=value lines: c<i>.extensions (the server's answer), then done=1; exits 1 on any
// failure (error=...).
'use strict';
const WebSocket = require('ws');

const [url, configsJson, countArg] = process.argv.slice(2);
const configs = JSON.parse(configsJson);
const COUNT = Number(countArg);
const clean = (v) => (v === undefined || v === null ? '' : String(v)).replace(/[\t\r\n]/g, ' ');
const out = (k, v) => process.stdout.write(`${k}=${clean(v)}\n`);

function client(i, deflate) {
  if (deflate && typeof deflate === 'object') deflate = { threshold: 0, ...deflate };
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`${url}?i=${i}`, { perMessageDeflate: deflate, maxPayload: 32 * 1024 * 1024 });
    let n = 0;
    ws.on('upgrade', (res) => out(`c${i}.extensions`, res.headers['sec-websocket-extensions'] || ''));
    ws.on('message', (data, isBinary) => {
      ws.send(data, { binary: isBinary });
      if (++n === COUNT) ws.close(1000, 'echoed');
    });
    ws.on('error', (e) => reject(new Error(`client ${i}: ${e.message}`)));
    ws.on('close', (code) => (code === 1000 && n === COUNT ? resolve()
      : reject(new Error(`client ${i}: closed ${code} after ${n} messages`))));
  });
}

const watchdog = setTimeout(() => { out('error', 'timed out'); process.exit(1); }, 30000);
Promise.all(configs.map((c, i) => client(i + 1, c))).then(() => {
  clearTimeout(watchdog);
  out('done', 1);
  process.exit(0);
}, (e) => {
  out('error', e && e.stack ? e.stack : e);
  process.exit(1);
});
