// Socket.IO 4 fan-out server for bench/fanout: one process, @socket.io/redis-adapter with
// npm's `redis` v4 clients (one publishing, one subscribing) on the Redis given; websocket
// transport only, no per-message deflate (Socket.IO's default).
//   a socket connected with query t=TOPIC joins the room TOPIC (a subscriber);
//   a socket emitting "pub" with a message has it sent to the room named by its first
//   word: io.to(topic).emit("m", msg) (this process's members, and through Redis the others').
//   NODE_PATH=$BENCH_NODE_DIR/node_modules node bench/fanout.d/node_server.js HOST PORT REDIS_URL
// Prints "listening on ws://HOST:PORT/". SIGTERM stops it.
"use strict";
const http = require("http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

const host = process.argv[2] || "127.0.0.1";
const port = Number(process.argv[3] || 0);
const redisUrl = process.argv[4];
if (!redisUrl) { console.error("usage: node_server.js HOST PORT REDIS_URL"); process.exit(2); }

async function main() {
  const pubClient = createClient({ url: redisUrl });
  const subClient = pubClient.duplicate();
  for (const c of [pubClient, subClient]) c.on("error", (e) => console.error("redis:", e.message));
  await Promise.all([pubClient.connect(), subClient.connect()]);
  const server = http.createServer();
  const io = new Server(server, { transports: ["websocket"], serveClient: false });
  io.adapter(createAdapter(pubClient, subClient));
  io.on("connection", (socket) => {
    const t = socket.handshake.query.t;
    if (typeof t === "string" && t !== "") socket.join(t);
    socket.on("pub", (msg) => {
      if (typeof msg !== "string") return;
      const sp = msg.indexOf(" ");
      if (sp > 0) io.to(msg.slice(0, sp)).emit("m", msg);
    });
  });
  server.listen(port, host, () => {
    const a = server.address();
    console.log(`listening on ws://${a.address}:${a.port}/`);
  });
  process.on("SIGTERM", () => {
    io.close();
    Promise.allSettled([pubClient.quit(), subClient.quit()]).then(() => process.exit(0));
    setTimeout(() => process.exit(0), 2000).unref();
  });
}
main().catch((e) => { console.error(e); process.exit(1); });
