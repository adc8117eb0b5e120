// The Node worker of the end-to-end test (clients/node); handlers as in worker.py.
const path = require('path');
const { Worker, RetryableError, PermanentError } = require(path.join(__dirname, '../../../clients/node/index.js'));

const NAME = 'node';
const worker = new Worker({ workerId: NAME, namespaces: ['e2e'], batchSize: 4, leaseSeconds: 3, pollIntervalMs: 500 });
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const work = async (step) => {
  await sleep(10 + Math.random() * 30);
  return { by: NAME, step: step.name, n: step.inputs.n, tp: step.traceparent };
};

worker.register('E2E::Work', work);
worker.register('E2E::Flaky', async (step) => {
  if (step.attempt === 1) throw new RetryableError('flaky on its first attempt', { retryAfter: 1 });
  return work(step);
});
worker.register('E2E::Fatal', async (step) => {
  if (step.inputs.doomed) throw new PermanentError('this task is doomed');
  return work(step);
});
worker.register('E2E::Join', async (step) => ({ ...(await work(step)), parents: Object.keys(step.parentResults).sort() }));

worker.start().catch((err) => { console.error(err); process.exit(1); });
