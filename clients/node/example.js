const { Worker, RetryableError } = require('tasker-worker');

const worker = new Worker({ connectionString: process.env.DATABASE_URL, namespaces: ['shop'] });
worker.register('Fetch', async (step) => ({ items: step.inputs.items }));
worker.register('Charge', async (step) => {
  if (step.attempt === 1) throw new RetryableError('gateway busy', { retryAfter: 1 }); // retried 1 s later
  return { total: 5 * step.parentResults.fetch.items.length };
});
worker.register('Pack', async ({ parentResults }) => ({ boxes: parentResults.fetch.items.length }));
worker.register('Receipt', async ({ taskId, parentResults: { charge, pack } }) => {
  console.log(`task ${taskId}: receipt for ${pack.boxes} boxes, charged ${charge.total}`);
});

const steps = [['fetch', 'Fetch', []], ['charge', 'Charge', ['fetch']], ['pack', 'Pack', ['fetch']], ['receipt', 'Receipt', ['charge', 'pack']]];
(async () => {
  await worker.registerTemplate({ name: 'checkout', namespace_name: 'shop', version: '1.0.0',
    step_templates: steps.map(([name, handler_class, depends_on_steps]) => ({ name, handler_class, depends_on_steps })) });
  await worker.createTask('shop', 'checkout', { items: ['book', 'pen'] });
  await worker.start(); // runs until SIGINT/SIGTERM, then finishes or releases its steps and exits 0
})().catch((err) => { console.error(err); process.exit(1); });
