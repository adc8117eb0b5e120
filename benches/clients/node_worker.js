'use strict';
// A benchmark worker: node node_worker.js WORKER_ID (connection from the PG* environment).
// Handlers as in py_worker.py.
const { Worker } = require('../../clients/node');

const w = new Worker({ workerId: process.argv[2], batchSize: 4, pollIntervalMs: 1000, logger: false });
w.register('Noop', async () => ({}));
w.register('Stamp', async () => ({ t: Date.now() / 1000 }));
w.register('Measure', async (step) => ({ latency_ms: (Date.now() / 1000 - step.parentResults.first.t) * 1000 }));
w.start().then(() => console.log('ready'));
