// tasker-worker against a real PostgreSQL with tasker_core: each test creates its own database
// (CREATE EXTENSION, install_schema, enable_tracking) and drops it afterwards. Connection
// settings come from the PG* environment (scripts/cluster.sh env).
'use strict';
const { test } = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');
const { spawn } = require('node:child_process');
const { once } = require('node:events');
const { Client } = require('pg');
const { Worker, RetryableError, PermanentError } = require('..');

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function withDatabase(fn) {
  const name = `tasker_node_${process.pid}_${Math.random().toString(16).slice(2, 10)}`;
  const admin = new Client({ database: 'postgres' });
  await admin.connect();
  await admin.query(`CREATE DATABASE "${name}"`);
  const db = new Client({ database: name });
  const workers = [];
  try {
    await db.connect();
    await db.query('CREATE EXTENSION tasker_core');
    await db.query('SELECT tasker_core.install_schema()');
    await db.query('SELECT tasker_core.enable_tracking()');
    const ctx = {
      name,
      db,
      query: async (sql, params) => (await db.query(sql, params)).rows,
      worker(options = {}) {
        const logs = [];
        const logger = { info: (m) => logs.push(m), warn: (m) => logs.push(m), error: (m) => logs.push(m) };
        const w = new Worker({ database: name, handleSignals: false, logger, workerId: `w${workers.length + 1}`, ...options });
        w.logs = logs;
        workers.push(w);
        return w;
      },
      template: (tmpl) => db.query('SELECT tasker_core.register_task_template($1::jsonb)', [JSON.stringify(tmpl)]),
      async task(namespace, name, context = {}) {
        const { rows } = await db.query('SELECT tasker_core.create_task($1, $2, NULL, $3::jsonb) AS id', [namespace, name, JSON.stringify(context)]);
        return Number(rows[0].id);
      },
      async taskState(taskId) {
        const { rows } = await db.query('SELECT to_state FROM tasker_task_transitions WHERE task_id = $1 AND most_recent', [taskId]);
        return rows[0]?.to_state ?? 'pending';
      },
      async waitForTask(taskId, states = ['complete', 'error'], ms = 20000) {
        const deadline = Date.now() + ms;
        for (;;) {
          const state = await ctx.taskState(taskId);
          if (states.includes(state)) return state;
          if (Date.now() > deadline) throw new Error(`task ${taskId} is still ${state} after ${ms} ms`);
          await sleep(25);
        }
      },
      // a step of a task by name, with its state, attempts and results
      async step(taskId, stepName) {
        const { rows } = await db.query(
          `SELECT ts.workflow_step_id::int AS id, ts.current_state AS state, ws.attempts, ws.results, ws.retryable
           FROM tasker_core.task_steps($1) ts JOIN tasker_workflow_steps ws USING (workflow_step_id)
           WHERE ts.name = $2`, [taskId, stepName]);
        return rows[0];
      },
      async transitions(stepId) {
        const { rows } = await db.query(
          `SELECT from_state, to_state, metadata, created_at FROM tasker_workflow_step_transitions
           WHERE workflow_step_id = $1 ORDER BY sort_key`, [stepId]);
        return rows;
      },
    };
    await fn(ctx);
  } finally {
    await Promise.allSettled(workers.map((w) => w.stop({ graceMs: 0 })));
    await db.end().catch(() => {});
    await admin.query(`DROP DATABASE IF EXISTS "${name}" WITH (FORCE)`);
    await admin.end();
  }
}

const single = (namespace, handler, extra = {}) => ({
  name: 'single', namespace_name: namespace, version: '1.0.0',
  step_templates: [{ name: 'only', handler_class: handler, default_retry_limit: 3, ...extra }],
});

const edges = (rows) => rows.map((t) => `${t.from_state}->${t.to_state}`);

test('a fan-out/fan-in template runs to completion, parent results reach the children, the batch runs concurrently', async () => {
  await withDatabase(async (t) => {
    await t.template({
      name: 'diamond', namespace_name: 'fan', version: '1.0.0',
      step_templates: [
        { name: 'start', handler_class: 'Start' },
        { name: 'left', handler_class: 'Mul', depends_on_step: 'start', handler_config: { factor: 2 } },
        { name: 'middle', handler_class: 'Mul', depends_on_step: 'start', handler_config: { factor: 3 } },
        { name: 'right', handler_class: 'Mul', depends_on_step: 'start', handler_config: { factor: 5 } },
        { name: 'join', handler_class: 'Sum', depends_on_steps: ['left', 'middle', 'right'] },
      ],
    });
    const w = t.worker({ namespaces: ['fan'], batchSize: 4 });
    let running = 0;
    let maxRunning = 0;
    const seen = [];
    w.register('Start', async (step) => {
      seen.push(step);
      return { n: step.inputs.n };
    });
    w.register('Mul', async (step) => {
      running += 1;
      maxRunning = Math.max(maxRunning, running);
      await sleep(150);
      running -= 1;
      return { value: step.parentResults.start.n * step.config.factor };
    });
    w.register('Sum', async (step) => ({
      parents: Object.keys(step.parentResults).sort(),
      total: Object.values(step.parentResults).reduce((s, r) => s + r.value, 0),
    }));
    const tasks = [await t.task('fan', 'diamond', { n: 1 }), await t.task('fan', 'diamond', { n: 10 })];
    await w.start();
    for (const id of tasks) assert.equal(await t.waitForTask(id), 'complete');
    assert.deepEqual((await t.step(tasks[0], 'join')).results, { parents: ['left', 'middle', 'right'], total: 10 });
    assert.deepEqual((await t.step(tasks[1], 'join')).results, { parents: ['left', 'middle', 'right'], total: 100 });
    assert.ok(maxRunning > 1, `the fan-out ran concurrently (at most ${maxRunning} at once)`);
    const s = seen.find((x) => x.taskId === tasks[0]);
    assert.equal(s.name, 'start');
    assert.equal(s.namespace, 'fan');
    assert.equal(s.taskName, 'diamond');
    assert.equal(s.handlerClass, 'Start');
    assert.equal(s.attempt, 1);
    assert.deepEqual(s.parentResults, {});
    assert.equal(typeof s.stepId, 'number');
  });
});

test('RetryableError with retryAfter is retried after the delay (error -> pending -> in_progress)', async () => {
  await withDatabase(async (t) => {
    await t.template(single('retry', 'Flaky'));
    // a long poll: only the worker's own backoff timer can bring the retry on time
    const w = t.worker({ namespaces: ['retry'], pollIntervalMs: 30000 });
    const calls = [];
    w.register('Flaky', async (step) => {
      calls.push({ at: Date.now(), attempt: step.attempt });
      if (step.attempt === 1) throw new RetryableError('rate limited', { retryAfter: 2 });
      return { ok: true };
    });
    const id = await t.task('retry', 'single');
    await w.start();
    assert.equal(await t.waitForTask(id), 'complete');
    assert.deepEqual(calls.map((c) => c.attempt), [1, 2]);
    const gap = calls[1].at - calls[0].at;
    assert.ok(gap >= 2000 && gap < 4000, `retried ${gap} ms later`);
    const step = await t.step(id, 'only');
    assert.equal(step.attempts, 2);
    const tr = await t.transitions(step.id);
    assert.deepEqual(edges(tr), ['pending->in_progress', 'in_progress->error', 'error->pending', 'pending->in_progress', 'in_progress->complete']);
    const { error, retryable, backoff_seconds: backoff } = tr[1].metadata;
    assert.equal(retryable, true);
    assert.equal(backoff, 2);
    assert.equal(error.message, 'rate limited');
    assert.equal(error.name, 'RetryableError');
    assert.equal(error.errorClass, 'RetryableError');
    assert.ok(Array.isArray(error.stack) && error.stack.length > 0 && error.stack.length <= 5);
  });
});

test('PermanentError ends the task in error without a retry', async () => {
  await withDatabase(async (t) => {
    await t.template(single('perm', 'Broken'));
    const w = t.worker({ namespaces: ['perm'] });
    let calls = 0;
    w.register('Broken', async () => {
      calls += 1;
      throw new PermanentError('card declined');
    });
    const id = await t.task('perm', 'single');
    await w.start();
    assert.equal(await t.waitForTask(id), 'error');
    await sleep(300);
    assert.equal(calls, 1);
    const step = await t.step(id, 'only');
    assert.equal(step.state, 'error');
    assert.equal(step.retryable, false);
    assert.equal(step.results.error.name, 'PermanentError');
    assert.equal(step.results.error.message, 'card declined');
    const tr = await t.transitions(step.id);
    assert.equal(tr.at(-1).metadata.retryable, false);
  });
});

test('a step without a registered handler fails permanently', async () => {
  await withDatabase(async (t) => {
    await t.template(single('unknown', 'NobodyHandlesThis'));
    const w = t.worker({ namespaces: ['unknown'] });
    w.register('Other', async () => ({}));
    const id = await t.task('unknown', 'single');
    await w.start();
    assert.equal(await t.waitForTask(id), 'error');
    const step = await t.step(id, 'only');
    assert.equal(step.attempts, 1);
    assert.equal(step.retryable, false);
    assert.equal(step.results.error.name, 'UnknownHandlerError');
    assert.match(step.results.error.message, /NobodyHandlesThis/);
  });
});

test('a handler over stepTimeoutMs fails retryably, and the retry completes', async () => {
  await withDatabase(async (t) => {
    await t.template(single('slow', 'Sleepy'));
    const w = t.worker({ namespaces: ['slow'], stepTimeoutMs: 300 });
    let abortedFirst = false;
    w.register('Sleepy', async (step) => {
      if (step.attempt === 1) {
        await sleep(1500);
        abortedFirst = step.signal.aborted;
        return { late: true };
      }
      return { attempt: step.attempt };
    });
    const id = await t.task('slow', 'single');
    await w.start();
    assert.equal(await t.waitForTask(id), 'complete');
    const step = await t.step(id, 'only');
    assert.deepEqual(step.results, { attempt: 2 });
    const tr = await t.transitions(step.id);
    assert.deepEqual(edges(tr), ['pending->in_progress', 'in_progress->error', 'error->pending', 'pending->in_progress', 'in_progress->complete']);
    assert.equal(tr[1].metadata.retryable, true);
    assert.equal(tr[1].metadata.error.name, 'TimeoutError');
    await sleep(1300);
    assert.ok(abortedFirst, 'the timed-out handler saw step.signal aborted');
    assert.equal((await t.step(id, 'only')).state, 'complete', 'the late result of attempt 1 changed nothing');
  });
});

test('a handler longer than the lease keeps it by heartbeats and completes', async () => {
  await withDatabase(async (t) => {
    await t.template(single('long', 'Long'));
    const w = t.worker({ namespaces: ['long'], leaseSeconds: 1 }); // heartbeat every 333 ms
    let calls = 0;
    w.register('Long', async () => {
      calls += 1;
      await sleep(3500);
      return { done: true };
    });
    // a second worker keeps claiming (each claim expires overdue leases first) and tick() runs
    const rival = t.worker({ namespaces: ['long'], pollIntervalMs: 100 });
    rival.register('Long', async () => ({ stolen: true }));
    const id = await t.task('long', 'single');
    await w.start();
    await sleep(200);
    await rival.start();
    const ticking = setInterval(() => t.db.query('SELECT tasker_core.tick()').catch(() => {}), 200);
    try {
      assert.equal(await t.waitForTask(id), 'complete');
    } finally {
      clearInterval(ticking);
    }
    const step = await t.step(id, 'only');
    assert.equal(calls, 1);
    assert.deepEqual(step.results, { done: true });
    assert.equal(step.attempts, 1);
    assert.deepEqual(edges(await t.transitions(step.id)), ['pending->in_progress', 'in_progress->complete']);
  });
});

test('a lost lease (TK030 on complete) is logged and skipped; the worker goes on', async () => {
  await withDatabase(async (t) => {
    await t.template(single('lost', 'Waits'));
    const w = t.worker({ namespaces: ['lost'] });
    let release;
    const gate = new Promise((resolve) => { release = resolve; });
    w.register('Waits', async (step) => {
      if (step.inputs.wait) await gate;
      return { by: 'worker' };
    });
    const lost = [];
    w.on('leaseLost', (step, err) => lost.push([step.stepId, err.code]));
    const first = await t.task('lost', 'single', { wait: true });
    await w.start();
    const step = await t.step(first, 'only');
    for (let i = 0; (await t.step(first, 'only')).state !== 'in_progress'; i += 1) {
      assert.ok(i < 400, 'the step was claimed');
      await sleep(25);
    }
    // an operator resolves the step while its handler runs: the worker's lease is gone
    await t.query("SELECT tasker_core.resolve_step_manually($1, '{\"by\": \"operator\"}')", [step.id]);
    release();
    assert.equal(await t.waitForTask(first), 'complete');
    const second = await t.task('lost', 'single', { wait: false });
    assert.equal(await t.waitForTask(second), 'complete');
    assert.deepEqual(lost, [[step.id, 'TK030']]);
    assert.ok(w.logs.some((m) => /lease lost/.test(m)), 'logged');
    assert.deepEqual((await t.step(first, 'only')).results, { by: 'operator' });
  });
});

for (const lost of ['before the commit', 'after the commit']) {
  test(`an outcome whose connection was lost ${lost} is sent again and applied once`, async () => {
    await withDatabase(async (t) => {
      await t.template(single('lossy', 'Once'));
      const w = t.worker({ namespaces: ['lossy'], pollIntervalMs: 200 });
      const runs = [];
      w.register('Once', async (step) => { runs.push(step.stepId); return { ok: true }; });
      // the pool's connection breaks once while the outcome is being recorded (a failover):
      // the worker cannot tell whether the commit happened
      const query = w.pool.query.bind(w.pool);
      let broken = false;
      w.pool.query = async (sql, params) => {
        if (!broken && /FROM tasker_core\.report_/.test(sql)) {
          broken = true;
          if (lost === 'after the commit') await query(sql, params);
          throw new Error('Connection terminated unexpectedly');
        }
        return query(sql, params);
      };
      const task = await t.task('lossy', 'single');
      await w.start();
      assert.equal(await t.waitForTask(task), 'complete');
      await w.stop(); // after the outcome's second send (the first may have completed the task)
      assert.ok(broken);
      assert.ok(w.logs.some((m) => /connection lost .*sending again/.test(m)), w.logs.join('\n'));
      assert.equal(w.logs.some((m) => /no longer held/.test(m)), lost === 'after the commit', w.logs.join('\n'));
      const step = await t.step(task, 'only');
      assert.deepEqual(runs, [step.id]);
      assert.equal(step.attempts, 1);
      assert.deepEqual(edges(await t.transitions(step.id)), ['pending->in_progress', 'in_progress->complete']);
    });
  });
}

test('a retryable failure whose connection was lost after the commit is not sent again', async () => {
  await withDatabase(async (t) => {
    await t.template(single('lossyfail', 'FailsOnce'));
    const w = t.worker({ namespaces: ['lossyfail'], pollIntervalMs: 200, leaseSeconds: 2 });
    let calls = 0;
    w.register('FailsOnce', async () => {
      calls += 1;
      if (calls === 1) throw new RetryableError('first try fails', { retryAfter: 0 });
      return { ok: true };
    });
    const query = w.pool.query.bind(w.pool);
    let broken = false;
    w.pool.query = async (sql, params) => {
      if (!broken && /FROM tasker_core\.report_/.test(sql)) {
        broken = true;
        await query(sql, params); // committed, the answer lost
        throw new Error('Connection terminated unexpectedly');
      }
      return query(sql, params);
    };
    const task = await t.task('lossyfail', 'single');
    await w.start();
    assert.equal(await t.waitForTask(task), 'complete');
    await w.stop();
    assert.ok(w.logs.some((m) => /a retryable failure is not sent again/.test(m)), w.logs.join('\n'));
    const step = await t.step(task, 'only');
    const failures = (await t.transitions(step.id)).filter((x) => x.to_state === 'error' && x.metadata.reason !== 'lease_expired');
    assert.equal(failures.length, 1); // recorded once, by the first send
  });
});

test('a lease lost while the handler runs is noticed by the heartbeat: step.signal aborts, nothing is reported', async () => {
  await withDatabase(async (t) => {
    await t.template(single('lost', 'Waits'));
    const w = t.worker({ namespaces: ['lost'], leaseSeconds: 3 }); // heartbeat every second
    let reason;
    w.register('Waits', (step) => new Promise((resolve) => {
      step.signal.addEventListener('abort', () => { reason = step.signal.reason; resolve({ by: 'worker' }); });
    }));
    const lost = [];
    w.on('leaseLost', (step, err) => lost.push(err.code));
    const id = await t.task('lost', 'single');
    await w.start();
    const step = await t.step(id, 'only');
    for (let i = 0; (await t.step(id, 'only')).state !== 'in_progress'; i += 1) {
      assert.ok(i < 400, 'the step was claimed');
      await sleep(25);
    }
    await t.query("SELECT tasker_core.resolve_step_manually($1, '{\"by\": \"operator\"}')", [step.id]);
    assert.equal(await t.waitForTask(id), 'complete');
    for (let i = 0; lost.length === 0; i += 1) {
      assert.ok(i < 200, 'the heartbeat noticed');
      await sleep(25);
    }
    assert.deepEqual(lost, ['TK030']);
    assert.equal(reason?.name, 'LeaseLostError');
    await sleep(100);
    assert.deepEqual((await t.step(id, 'only')).results, { by: 'operator' });
    assert.ok(!w.logs.some((m) => /reporting the outcome failed/.test(m)), w.logs.join('\n'));
  });
});

async function runChild(t, { slowMs, graceMs }) {
  const child = spawn(process.execPath, [path.join(__dirname, 'sigterm-worker.js')], {
    env: { ...process.env, PGDATABASE: t.name, SLOW_MS: String(slowMs), GRACE_MS: String(graceMs) },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  child.stdout.on('data', (d) => { out += d; });
  child.stderr.on('data', (d) => { out += d; });
  const exited = once(child, 'exit');
  const deadline = Date.now() + 15000;
  while (!out.includes('handler started')) {
    if (Date.now() > deadline || child.exitCode !== null) throw new Error(`child never started a step:\n${out}`);
    await sleep(20);
  }
  const signalled = Date.now();
  child.kill('SIGTERM');
  const [code, signal] = await exited;
  return { code, signal, out, ms: Date.now() - signalled };
}

test('SIGTERM mid-step: the child worker finishes the step within the grace period and exits 0', async () => {
  await withDatabase(async (t) => {
    await t.template(single('term', 'Slow'));
    const id = await t.task('term', 'single');
    const r = await runChild(t, { slowMs: 1000, graceMs: 10000 });
    assert.equal(r.code, 0, r.out);
    assert.equal(await t.waitForTask(id, ['complete', 'error'], 1000), 'complete');
    const step = await t.step(id, 'only');
    assert.deepEqual(step.results, { slow: 'child' });
    assert.equal(step.attempts, 1);
  });
});

test('SIGTERM mid-step: past the grace period the child releases the step, exits 0, and another worker completes it', async () => {
  await withDatabase(async (t) => {
    await t.template(single('term', 'Slow'));
    const id = await t.task('term', 'single');
    const r = await runChild(t, { slowMs: 60000, graceMs: 300 });
    assert.equal(r.code, 0, r.out);
    assert.ok(r.ms < 5000, `exited ${r.ms} ms after SIGTERM`);
    assert.match(r.out, /released/);
    const w = t.worker({ namespaces: ['term'] });
    w.register('Slow', async (step) => ({ slow: 'rescuer', attempt: step.attempt }));
    await w.start();
    assert.equal(await t.waitForTask(id), 'complete');
    const step = await t.step(id, 'only');
    assert.deepEqual(step.results, { slow: 'rescuer', attempt: 1 }, 'the released attempt was not counted');
    const tr = await t.transitions(step.id);
    assert.deepEqual(edges(tr), ['pending->in_progress', 'in_progress->error', 'error->pending', 'pending->in_progress', 'in_progress->complete']);
    assert.equal(tr[1].metadata.reason, 'released');
  });
});

test('a worker waiting in LISTEN picks up a new task well before its poll interval', async () => {
  await withDatabase(async (t) => {
    await t.template({
      name: 'pair', namespace_name: 'listen', version: '1.0.0',
      step_templates: [{ name: 'a', handler_class: 'Quick' }, { name: 'b', handler_class: 'Quick', depends_on_step: 'a' }],
    });
    const w = t.worker({ namespaces: ['listen'], pollIntervalMs: 30000 });
    w.register('Quick', async (step) => ({ step: step.name }));
    await w.start();
    await sleep(500); // its first claim found nothing: it now sleeps in LISTEN
    const started = Date.now();
    const id = await t.task('listen', 'pair');
    assert.equal(await t.waitForTask(id, ['complete', 'error'], 5000), 'complete');
    const ms = Date.now() - started;
    assert.ok(ms < 2000, `done in ${ms} ms with a 30 s poll interval`);
  });
});

test('a wake-up naming another namespace still wakes the worker: one transaction readies steps of two', async () => {
  await withDatabase(async (t) => {
    for (const ns of ['first', 'second']) {
      await t.template({ name: 'one', namespace_name: ns, version: '1.0.0', step_templates: [{ name: 'a', handler_class: 'Quick' }] });
    }
    const w = t.worker({ namespaces: ['second'], pollIntervalMs: 30000 });
    w.register('Quick', async () => ({}));
    await w.start();
    await sleep(500); // its first claim found nothing: it now sleeps in LISTEN
    // one transaction, one wake-up: it names the first task's namespace, not the worker's
    await t.db.query('BEGIN');
    await t.task('first', 'one');
    const id = await t.task('second', 'one');
    await t.db.query('COMMIT');
    assert.equal(await t.waitForTask(id, ['complete', 'error'], 5000), 'complete');
  });
});

test('a worker trace is joined by untraced tasks: every step gets it, and the task keeps it', async () => {
  await withDatabase(async (t) => {
    await t.template({
      name: 'traced', namespace_name: 'trace', version: '1.0.0',
      step_templates: [{ name: 'a', handler_class: 'Traced' }, { name: 'b', handler_class: 'Traced', depends_on_step: 'a' }],
    });
    const workerTrace = '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01';
    const seen = [];
    const w = t.worker({ pollIntervalMs: 100, traceparent: () => workerTrace });
    w.register('Traced', async (step) => { seen.push([step.name, step.traceparent]); return {}; });
    const id = await t.task('trace', 'traced');
    await w.start();
    assert.equal(await t.waitForTask(id), 'complete');
    assert.deepEqual(seen.sort(), [['a', workerTrace], ['b', workerTrace]]);
    const [{ tp }] = await t.query('SELECT tasker_core.task_traceparent($1) AS tp', [id]);
    assert.equal(tp, workerTrace);
    assert.throws(() => t.worker({ traceparent: 'not a function' }), TypeError);
  });
});

test('outcomes finishing together are recorded in one transaction (report_steps)', async () => {
  await withDatabase(async (t) => {
    await t.template({
      name: 'many', namespace_name: 'many', version: '1.0.0',
      step_templates: Array.from({ length: 12 }, (_, i) => ({ name: `s${i}`, handler_class: 'Quick' })),
    });
    const w = t.worker({ namespaces: ['many'], batchSize: 12, flushIntervalMs: 50, poolSize: 3 });
    w.register('Quick', async (step) => ({ name: step.name }));
    const task = await t.task('many', 'many', {});
    await w.start();
    assert.equal(await t.waitForTask(task), 'complete');
    const rows = await t.query(
      "SELECT xid::text, count(*)::int AS n FROM tasker_core.events WHERE task_id = $1 AND name = 'step.completed' GROUP BY xid",
      [task]);
    assert.equal(rows.reduce((a, r) => a + r.n, 0), 12);
    assert.ok(Math.max(...rows.map((r) => r.n)) >= 2, JSON.stringify(rows));
  });
});

test('a step is claimed in the transaction that records its parent (report_and_claim)', async () => {
  await withDatabase(async (t) => {
    await t.template({
      name: 'chain', namespace_name: 'chain', version: '1.0.0',
      step_templates: [
        { name: 'one', handler_class: 'Link' },
        { name: 'two', handler_class: 'Link', depends_on_step: 'one' },
        { name: 'three', handler_class: 'Link', depends_on_step: 'two' },
      ],
    });
    const w = t.worker({ namespaces: ['chain'], pollIntervalMs: 5000 });
    w.register('Link', async (step) => ({ parents: Object.keys(step.parentResults) }));
    const task = await t.task('chain', 'chain', {});
    await w.start();
    assert.equal(await t.waitForTask(task), 'complete');
    const rows = await t.query(
      'SELECT e.name, s.name AS step, e.xid::text AS xid FROM tasker_core.events e ' +
        'JOIN tasker_workflow_steps ws ON ws.workflow_step_id = e.step_id ' +
        'JOIN tasker_named_steps s ON s.named_step_id = ws.named_step_id ' +
        "WHERE e.task_id = $1 AND e.name IN ('step.completed', 'step.execution_requested') ORDER BY e.id",
      [task]);
    const xid = Object.fromEntries(rows.map((r) => [`${r.name}/${r.step}`, r.xid]));
    assert.equal(xid['step.completed/one'], xid['step.execution_requested/two'], JSON.stringify(rows));
    assert.equal(xid['step.completed/two'], xid['step.execution_requested/three'], JSON.stringify(rows));
  });
});

test('example.js runs as written', async () => {
  await withDatabase(async (t) => {
    const child = spawn(process.execPath, [path.join(__dirname, '..', 'example.js')], {
      cwd: path.join(__dirname, '..'),
      env: { ...process.env, PGDATABASE: t.name },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    child.stdout.on('data', (d) => { out += d; });
    child.stderr.on('data', (d) => { out += d; });
    const exited = once(child, 'exit');
    const deadline = Date.now() + 15000;
    while (!/receipt for 2 boxes, charged 10/.test(out)) {
      if (Date.now() > deadline || child.exitCode !== null) throw new Error(`example did not finish its task:\n${out}`);
      await sleep(20);
    }
    child.kill('SIGINT');
    const [code] = await exited;
    assert.equal(code, 0, out);
    assert.equal(await t.taskState(1), 'complete');
  });
});

test('createTask takes a priority and a later start (runAt as a Date, or delaySeconds)', async () => {
  await withDatabase(async (t) => {
    await t.template(single('node_sched', 'Sched::Only'));
    const w = t.worker();
    const later = new Date(Date.UTC(2099, 0, 1, 12, 0, 0));
    const scheduled = await w.createTask('node_sched', 'single', {}, { priority: 7, runAt: later });
    const delayed = await w.createTask('node_sched', 'single', {}, { delaySeconds: 3600 });
    const urgent = await w.createTask('node_sched', 'single', {}, { priority: 9, initiator: 'node' });
    const rows = await t.query('SELECT task_id::int AS id, priority, run_at FROM tasker_core.task_options ORDER BY 1');
    assert.deepEqual(rows.map((r) => [r.id, r.priority]), [[scheduled, 7], [delayed, 0], [urgent, 9]]);
    assert.equal((await t.query("SELECT to_char(run_at, 'YYYY-MM-DD HH24:MI') AS at FROM tasker_core.task_options WHERE task_id = $1", [scheduled]))[0].at, '2099-01-01 12:00');
    // only the urgent task can start now
    const claimed = await t.query("SELECT task_id::int AS id FROM tasker_core.claim_steps('probe', NULL, 10, 60)");
    assert.deepEqual(claimed.map((r) => r.id), [urgent]);
    await w.stop({ graceMs: 0 });
  });
});

test('a map instance gets its element and index, the fan-in the array of their results', async () => {
  await withDatabase(async (t) => {
    await t.template({
      name: 'map', namespace_name: 'node_map', version: '1.0.0',
      step_templates: [
        { name: 'fetch', handler_class: 'Fetch' },
        { name: 'price', handler_class: 'Price', depends_on_step: 'fetch', map: { over: '/parents/fetch/skus' } },
        { name: 'gift', handler_class: 'Gift', depends_on_step: 'fetch', condition: { path: '/context/gift', eq: true } },
        { name: 'total', handler_class: 'Total', depends_on_steps: ['price', 'gift'] },
      ],
    });
    const w = t.worker({ namespaces: ['node_map'] });
    const seen = [];
    w.register('Fetch', async () => ({ skus: ['a', 'bb', 'ccc'] }));
    w.register('Price', async (step) => {
      seen.push([step.index, step.element]);
      return { price: step.element.length };
    });
    w.register('Gift', async () => { throw new Error('the gift step is skipped'); });
    w.register('Total', async (step) => {
      assert.equal(step.element, undefined);
      return { prices: step.parentResults.price.map((r) => r.price), gift: step.parentResults.gift };
    });
    const task = await t.task('node_map', 'map', { gift: false });
    await w.start();
    assert.equal(await t.waitForTask(task), 'complete');
    assert.deepEqual(seen.sort(), [[0, 'a'], [1, 'bb'], [2, 'ccc']]);
    assert.deepEqual((await t.step(task, 'total')).results, { prices: [1, 2, 3], gift: null });
  });
});
