// Subscribers for bench/fanout: opens N connections (round-robin over the server ports; the
// connection with global index i subscribes to topic i % TOPICS), records for every message
// its publish-to-receive latency (the publisher's timestamp is process.hrtime(): the
// machine's CLOCK_MONOTONIC, shared by every process), and writes a report file every 250 ms
// when something changed (written aside, then renamed: never read half-written).
//   NODE_PATH=... node sub.js MODE PORTS N FIRST TOPICS REPORT
//     MODE: ws (plain WebSocket, npm's ws, path /sub?t=TOPIC) | sio (socket.io-client,
//           websocket transport only, query t=TOPIC, event "m")
//     PORTS: comma-separated ports on 127.0.0.1; FIRST: global index of the first connection
// Prints "connected n=N secs=S" once every connection is open; exits 1 if one fails to open.
// A message is "TOPIC ROUND SEQ T_US padding": ROUND 0 is warm-up (it only marks the
// connection warmed); other rounds count deliveries, sequence gaps and duplicates per
// connection, and a latency histogram (µs, 1/512 precision above 1 ms).
// Report: "conns N connected C warmed W closed X", then per round
// "round R recv K gaps G dups D last_us L" and its "hist R VALUE_US COUNT" lines.
"use strict";
const fs = require("fs");

const [mode, portsArg, nArg, firstArg, topicsArg, report] = process.argv.slice(2);
const ports = portsArg.split(",").map(Number);
const n = Number(nArg), first = Number(firstArg), topics = Number(topicsArg);
if (!(mode === "ws" || mode === "sio") || !report || !(n > 0) || !(topics > 0)) {
  console.error("usage: sub.js ws|sio PORTS N FIRST TOPICS REPORT");
  process.exit(2);
}

let connected = 0, warmed = 0, closed = 0, changed = true;
const isWarm = new Uint8Array(n), connRound = new Int32Array(n), connLast = new Float64Array(n);
const rounds = new Map();   // round -> { recv, gaps, dups, last, hist: Map }

function nowUs() { const t = process.hrtime(); return t[0] * 1e6 + t[1] / 1e3; }

function bucket(us) {
  let v = Math.round(us);
  if (v < 1024) return v < 0 ? 0 : v;
  const e = Math.floor(Math.log2(v)) - 9;
  return Math.floor(v / 2 ** e) * 2 ** e;
}

function onMessage(i, msg) {
  const t = nowUs();
  const a = msg.indexOf(" "), b = msg.indexOf(" ", a + 1), c = msg.indexOf(" ", b + 1);
  let d = msg.indexOf(" ", c + 1);
  if (d < 0) d = msg.length;
  const round = +msg.slice(a + 1, b);
  if (round === 0) {
    if (!isWarm[i]) { isWarm[i] = 1; warmed++; changed = true; }
    return;
  }
  const seq = +msg.slice(b + 1, c), sent = +msg.slice(c + 1, d);
  let r = rounds.get(round);
  if (!r) { r = { recv: 0, gaps: 0, dups: 0, last: 0, hist: new Map() }; rounds.set(round, r); }
  if (connRound[i] !== round) { connRound[i] = round; connLast[i] = 0; }
  const last = connLast[i];
  if (seq <= last) { r.dups++; changed = true; return; }
  if (seq > last + 1) r.gaps += seq - last - 1;
  connLast[i] = seq;
  r.recv++;
  r.last = t;
  const k = bucket(t - sent);
  r.hist.set(k, (r.hist.get(k) || 0) + 1);
  changed = true;
}

function writeReport() {
  if (!changed) return;
  changed = false;
  const out = [`conns ${n} connected ${connected} warmed ${warmed} closed ${closed}`];
  for (const [round, r] of rounds) {
    out.push(`round ${round} recv ${r.recv} gaps ${r.gaps} dups ${r.dups} last_us ${r.last.toFixed(0)}`);
    for (const [v, c] of r.hist) out.push(`hist ${round} ${v} ${c}`);
  }
  fs.writeFileSync(report + ".tmp", out.join("\n") + "\n");
  fs.renameSync(report + ".tmp", report);
}
setInterval(writeReport, 250);

function fail(i, what) {
  console.error(`sub: connection ${first + i}: ${what}`);
  process.exit(1);
}

let open1;
if (mode === "ws") {
  const WebSocket = require("ws");
  open1 = (i, topic, port, done) => {
    const ws = new WebSocket(`ws://127.0.0.1:${port}/sub?t=${topic}`, { perMessageDeflate: false });
    let up = false;
    ws.on("open", () => { up = true; done(); });
    ws.on("message", (data) => onMessage(i, data.toString("latin1")));
    ws.on("error", (e) => { if (!up) fail(i, e.message); });
    ws.on("close", () => { if (up) { closed++; changed = true; } else fail(i, "closed before open"); });
  };
} else {
  const { io } = require("socket.io-client");
  open1 = (i, topic, port, done) => {
    const s = io(`http://127.0.0.1:${port}`, { transports: ["websocket"], forceNew: true,
      reconnection: false, query: { t: String(topic) } });
    let up = false;
    s.on("connect", () => { if (!up) { up = true; done(); } });
    s.on("m", (msg) => onMessage(i, msg));
    s.on("connect_error", (e) => fail(i, e.message));
    s.on("disconnect", () => { if (up) { closed++; changed = true; } });
  };
}

// Opens the connections BATCH at a time.
const BATCH = 200, t0 = Date.now();
let next = 0, pending = 0;
function more() {
  while (next < n && pending < BATCH) {
    const i = next++, g = first + i;
    pending++;
    open1(i, g % topics, ports[g % ports.length], () => {
      pending--; connected++; changed = true;
      if (connected === n) {
        console.log(`connected n=${n} secs=${((Date.now() - t0) / 1000).toFixed(2)}`);
      } else {
        more();
      }
    });
  }
}
more();
process.on("SIGTERM", () => { writeReport(); process.exit(0); });
