// bench/pg.d/node_client.js LIB URL TASKS SECONDS QUERY
// LIB: "pg" (node-postgres, a Pool of TASKS connections: it has no pipelining) or
// "postgres" (postgres.js, max: 1: its pipelining on one connection, as moonwire.pg).
// Prints "queries=N seconds=S cpu=C" (C: process.cpuUsage over the run, after connecting).
const [lib, url, ntasks, secs, which] = [process.argv[2], process.argv[3], +process.argv[4] || 50,
  +process.argv[5] || 5, process.argv[6] || "int"];
const SQL = {
  int: "SELECT $1::int AS v",
  rows20: "SELECT i, 'row number ' || i AS s FROM generate_series($1::int, $1::int + 19) i",
};

async function main() {
  let run, close;
  if (lib === "pg") {
    const { Pool } = require("pg");
    const pool = new Pool({ connectionString: url, max: ntasks });
    const clients = await Promise.all(Array.from({ length: ntasks }, () => pool.connect()));
    clients.forEach((c) => c.release());
    run = (k) => pool.query({ name: "q", text: SQL[which], values: [k] });
    close = () => pool.end();
  } else {
    const postgres = require("postgres");
    const sql = postgres(url, { max: 1, prepare: true });
    await sql.unsafe(SQL[which], [1], { prepare: true });
    run = (k) => sql.unsafe(SQL[which], [k], { prepare: true });
    close = () => sql.end();
  }
  let stop = false, n = 0;
  const t0 = process.hrtime.bigint(), c0 = process.cpuUsage();
  const loops = Array.from({ length: ntasks }, async (_, i) => {
    let k = i + 1;
    while (!stop) { await run(k++); n++; }
  });
  setTimeout(() => { stop = true; }, secs * 1000);
  await Promise.all(loops);
  const dt = Number(process.hrtime.bigint() - t0) / 1e9, c = process.cpuUsage(c0);
  console.log(`queries=${n} seconds=${dt.toFixed(3)} cpu=${((c.user + c.system) / 1e6).toFixed(3)}`);
  await close();
}
main().catch((e) => { console.error(e); process.exit(1); });
