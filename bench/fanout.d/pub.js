// The publisher for bench/fanout: one connection to one server, RATE messages a second of
// SIZE bytes, "TOPIC ROUND SEQ T_US" padded with 'x' (T_US: process.hrtime() in µs, the
// machine's CLOCK_MONOTONIC), topics in turn (0 .. TOPICS-1), SEQ counted per topic from 1.
// Open loop: message k is due at start + k / RATE and sent then (late ones at once).
//   NODE_PATH=... node pub.js MODE PORT ROUND RATE SECS TOPICS SIZE SUBS
//     MODE ws: a WebSocket message on /pub; sio: socket.emit("pub", msg)
//     SECS 0: until SIGTERM; SUBS: subscribers in all (for the expected deliveries)
// Prints "sent=N expected=E first_us=F last_us=L late_max_ms=M" at the end.
"use strict";
const [mode, portArg, roundArg, rateArg, secsArg, topicsArg, sizeArg, subsArg] = process.argv.slice(2);
const port = Number(portArg), round = Number(roundArg), rate = Number(rateArg);
const secs = Number(secsArg), topics = Number(topicsArg), size = Number(sizeArg), subs = Number(subsArg);
if (!(mode === "ws" || mode === "sio") || !(rate > 0) || !(topics > 0) || !(size > 0)) {
  console.error("usage: pub.js ws|sio PORT ROUND RATE SECS TOPICS SIZE SUBS");
  process.exit(2);
}

function nowUs() { const t = process.hrtime(); return t[0] * 1e6 + t[1] / 1e3; }

let send, close;
const seq = new Array(topics).fill(0);
let sent = 0, firstUs = 0, lastUs = 0, lateMax = 0, timer = null, start = 0, stopped = false;

function message(topic) {
  const t = nowUs();
  let m = `${topic} ${round} ${++seq[topic]} ${t.toFixed(1)} `;
  if (m.length < size) m += "x".repeat(size - m.length);
  return [m, t];
}

function finish() {
  if (stopped) return;
  stopped = true;
  if (timer) clearTimeout(timer);
  let expected = 0;
  for (let t = 0; t < topics; t++) {
    const members = Math.floor(subs / topics) + (t < subs % topics ? 1 : 0);
    expected += seq[t] * members;
  }
  console.log(`sent=${sent} expected=${expected} first_us=${firstUs.toFixed(0)} last_us=${lastUs.toFixed(0)} ` +
    `late_max_ms=${(lateMax / 1000).toFixed(1)}`);
  setTimeout(() => { close(); process.exit(0); }, 100);
}

function tick() {
  timer = null;
  const endUs = secs > 0 ? start + secs * 1e6 : Infinity;
  while (!stopped) {
    const due = start + (sent * 1e6) / rate;
    if (due >= endUs) { finish(); return; }
    if (due > nowUs()) break;
    const [m, t] = message(sent % topics);
    if (t - due > lateMax) lateMax = t - due;
    send(m);
    if (sent === 0) firstUs = t;
    lastUs = t;
    sent++;
  }
  if (stopped) return;
  const wait = (start + (sent * 1e6) / rate - nowUs()) / 1000;
  timer = setTimeout(tick, Math.max(0, wait));
}

function go() { start = nowUs(); tick(); }

if (mode === "ws") {
  const WebSocket = require("ws");
  const ws = new WebSocket(`ws://127.0.0.1:${port}/pub`, { perMessageDeflate: false });
  send = (m) => ws.send(m);
  close = () => ws.close();
  ws.on("open", go);
  ws.on("error", (e) => { console.error("pub:", e.message); process.exit(1); });
} else {
  const { io } = require("socket.io-client");
  const s = io(`http://127.0.0.1:${port}`, { transports: ["websocket"], forceNew: true, reconnection: false });
  send = (m) => s.emit("pub", m);
  close = () => s.close();
  s.on("connect", () => { if (!start) go(); });
  s.on("connect_error", (e) => { console.error("pub:", e.message); process.exit(1); });
}
process.on("SIGTERM", finish);
process.on("SIGINT", finish);
