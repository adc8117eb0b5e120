// A node-postgres listener: LISTEN tasker_events, a second client drives the sample workflow
// (one transition per transaction), one wake-up per transaction arrives with the right event
// names, and the same events come back, in order, from tasker_core.events_after.
const { test } = require('node:test');
const assert = require('node:assert');
const fs = require('node:fs');
const path = require('node:path');
const { Client } = require('pg');

const root = process.env.TASKER_ROOT;
const CHANNEL = 'tasker_events';
// The event horizon can be held back by other sessions on a shared cluster; wait this long.
const SETTLE_MS = 120000;

async function withDatabase(fn) {
  const name = `js_${Math.random().toString(16).slice(2, 14)}`;
  const admin = new Client({ database: 'postgres' });
  await admin.connect();
  await admin.query(`CREATE DATABASE "${name}"`);
  const clients = [];
  const connect = async () => {
    const c = new Client({ database: name });
    await c.connect();
    clients.push(c);
    return c;
  };
  try {
    const setup = await connect();
    await setup.query('CREATE EXTENSION tasker_core');
    await setup.query('SELECT tasker_core.install_schema()');
    await setup.query(fs.readFileSync(path.join(root, 'demo', 'sample_workflow.sql'), 'utf8'));
    await fn(connect);
  } finally {
    for (const c of clients) await c.end().catch(() => {});
    await admin.query(`DROP DATABASE IF EXISTS "${name}" WITH (FORCE)`);
    await admin.end();
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function waitFor(list, n, ms) {
  const deadline = Date.now() + ms;
  while (list.length < n && Date.now() < deadline) await sleep(20);
}

// task 1 to in_progress, each of steps 1..6 to in_progress then complete, task 1 to complete
const WORKFLOW = [['task', 1, 'in_progress']];
for (let s = 1; s <= 6; s += 1) WORKFLOW.push(['step', s, 'in_progress'], ['step', s, 'complete']);
WORKFLOW.push(['task', 1, 'complete']);
const EVENTS = ['task.start_requested'];
for (let s = 1; s <= 6; s += 1) EVENTS.push('step.execution_requested', 'step.completed');
EVENTS.push('task.completed');

async function settle(client, position) {
  const xid = BigInt(position.split('/')[0]);
  const deadline = Date.now() + SETTLE_MS;
  for (;;) {
    const { rows: [{ h }] } = await client.query('SELECT pg_snapshot_xmin(pg_current_snapshot())::text AS h');
    if (BigInt(h) > xid) return;
    if (Date.now() > deadline) throw new Error(`event horizon ${h} did not pass xid ${xid}`);
    await sleep(50);
  }
}

test('a pg listener gets one wake-up per transaction and reads the same events from the log', async () => {
  await withDatabase(async (connect) => {
    const listener = await connect();
    const worker = await connect();
    const reader = await connect();
    const got = [];
    listener.on('notification', (msg) => got.push(msg));
    await listener.query(`LISTEN ${CHANNEL}`);

    // the worker: each call is its own committed transaction; the listener's client receives
    // the notifications meanwhile, on the same event loop
    for (const [kind, id, to] of WORKFLOW) {
      const { rows: [{ ok }] } = await worker.query(
        `SELECT tasker_core.transition_${kind}($1, $2) AS ok`, [id, to]);
      assert.strictEqual(ok, true, `${kind} ${id} -> ${to}`);
    }
    await waitFor(got, WORKFLOW.length, 30000);
    await sleep(500); // and nothing more arrives
    assert.strictEqual(got.length, WORKFLOW.length, `expected ${WORKFLOW.length} notifications, got ${got.length}`);

    const payloads = got.map((m) => {
      assert.strictEqual(m.channel, CHANNEL);
      assert.ok(Buffer.byteLength(m.payload) < 8000);
      const p = JSON.parse(m.payload);
      assert.deepStrictEqual(Object.keys(p).sort(), ['event', 'position', 'step_id', 'task_id']);
      return p;
    });
    assert.deepStrictEqual(payloads.map((p) => p.event), EVENTS);
    assert.deepStrictEqual(
      payloads.map((p) => [p.task_id, p.step_id]),
      WORKFLOW.map(([kind, id]) => [1, kind === 'task' ? null : id]),
    );

    // the log: everything after the beginning, once the last transaction has settled
    await settle(reader, payloads[payloads.length - 1].position);
    const log = [];
    let cursor = null;
    for (;;) {
      const { rows } = await reader.query(
        'SELECT cursor, name, task_id, step_id, from_state, to_state FROM tasker_core.events_after($1, $2)',
        [cursor, 5]);
      if (rows.length === 0) break;
      log.push(...rows);
      cursor = rows[rows.length - 1].cursor;
    }
    assert.deepStrictEqual(log.map((e) => e.name), EVENTS);
    assert.deepStrictEqual(log.map((e) => e.cursor), payloads.map((p) => p.position));
    // bigint columns arrive as strings in node-postgres
    assert.deepStrictEqual(
      log.map((e) => [Number(e.task_id), e.step_id === null ? null : Number(e.step_id)]),
      payloads.map((p) => [p.task_id, p.step_id]),
    );
    assert.deepStrictEqual(log.map((e) => e.to_state), WORKFLOW.map(([, , to]) => to));
  });
});

test('several transitions in one transaction wake a pg listener once', async () => {
  await withDatabase(async (connect) => {
    const listener = await connect();
    const worker = await connect();
    const got = [];
    listener.on('notification', (msg) => got.push(msg));
    await listener.query(`LISTEN ${CHANNEL}`);
    await worker.query('BEGIN');
    for (const [kind, id, to] of WORKFLOW.slice(0, 5)) {
      await worker.query(`SELECT tasker_core.transition_${kind}($1, $2)`, [id, to]);
    }
    await worker.query('COMMIT');
    const { rows } = await worker.query(
      "SELECT xid::text || '/' || id AS position, name FROM tasker_core.events ORDER BY xid, id");
    await waitFor(got, 1, 10000);
    await sleep(500);
    assert.strictEqual(rows.length, 5);
    assert.strictEqual(got.length, 1);
    const p = JSON.parse(got[0].payload);
    assert.strictEqual(p.position, rows[0].position);
    assert.strictEqual(p.event, rows[0].name);
  });
});
