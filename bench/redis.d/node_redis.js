// bench/redis client: Node's `redis` v4, one client (it pipelines the commands of a tick),
// TASKS async loops doing SET then GET of a 32-byte value. Prints "ops seconds".
const { createClient } = require('redis');
const [port, tasks, ops, size] = process.argv.slice(2).map(Number);
const value = 'v'.repeat(size);
(async () => {
  const c = createClient({ socket: { host: '127.0.0.1', port } });
  await c.connect();
  const per = Math.floor(ops / (2 * tasks));
  const t0 = process.hrtime.bigint();
  await Promise.all(Array.from({ length: tasks }, async (_, i) => {
    const key = 'bench:' + (i + 1);
    for (let j = 0; j < per; j++) {
      if ((await c.set(key, value)) !== 'OK') throw new Error('set');
      if ((await c.get(key)) !== value) throw new Error('get');
    }
  }));
  console.log(per * 2 * tasks, Number(process.hrtime.bigint() - t0) / 1e9);
  await c.quit();
})();
