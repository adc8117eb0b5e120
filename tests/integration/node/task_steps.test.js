// node-postgres reads a workflow through tasker_core.
const { test } = require('node:test');
const assert = require('node:assert');
const fs = require('node:fs');
const path = require('node:path');
const { Client } = require('pg');

const root = process.env.TASKER_ROOT;

async function withDatabase(fn) {
  const name = `js_${Math.random().toString(16).slice(2, 14)}`;
  const admin = new Client({ database: 'postgres' });
  await admin.connect();
  await admin.query(`CREATE DATABASE "${name}"`);
  const client = new Client({ database: name });
  await client.connect();
  try {
    await client.query('CREATE EXTENSION tasker_core');
    await client.query('SELECT tasker_core.install_schema()');
    await fn(client);
  } finally {
    await client.end();
    await admin.query(`DROP DATABASE IF EXISTS "${name}" WITH (FORCE)`);
    await admin.end();
  }
}

test('task_steps returns the sample workflow in dependency order', async () => {
  await withDatabase(async (client) => {
    await client.query(fs.readFileSync(path.join(root, 'demo', 'sample_workflow.sql'), 'utf8'));
    const { rows: [{ id }] } = await client.query('SELECT max(task_id) AS id FROM tasker_tasks');
    const { rows } = await client.query('SELECT * FROM tasker_core.task_steps($1)', [id]);
    assert.deepStrictEqual(rows.map((r) => r.name), [
      'validate_order', 'reserve_inventory', 'charge_payment', 'pack_items', 'ship_order', 'notify_customer',
    ]);
    assert.deepStrictEqual(rows.map((r) => r.dependency_level), [0, 1, 1, 1, 2, 3]);
    await assert.rejects(client.query('SELECT * FROM tasker_core.task_steps($1)', [-1]), (err) => err.code === 'TK004');
  });
});
