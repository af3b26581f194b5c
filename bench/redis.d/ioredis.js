// bench/redis client: ioredis v5 (enableAutoPipelining), TASKS async loops doing SET then
// GET of a 32-byte value. Prints "ops seconds".
const Redis = require('ioredis');
const [port, tasks, ops, size] = process.argv.slice(2).map(Number);
const value = 'v'.repeat(size);
(async () => {
  const c = new Redis({ host: '127.0.0.1', port, enableAutoPipelining: true });
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
  c.disconnect();
})();
