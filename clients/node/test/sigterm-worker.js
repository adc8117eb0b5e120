// A worker child process for the SIGTERM tests: its handler announces itself, then takes
// SLOW_MS; the test sends SIGTERM while it runs. The Worker's own signal handling does the rest.
'use strict';
const { Worker } = require('..');

const worker = new Worker({
  workerId: 'sigterm-child',
  namespaces: ['term'],
  leaseSeconds: 10,
  shutdownGraceMs: Number(process.env.GRACE_MS),
});
worker.register('Slow', async () => {
  console.log('handler started');
  await new Promise((resolve) => setTimeout(resolve, Number(process.env.SLOW_MS)));
  return { slow: 'child' };
});
worker.start().catch((err) => { console.error(err); process.exit(1); });
