'use strict';
// tasker-worker: runs Tasker step handlers against a PostgreSQL database with tasker_core.
// The database does the orchestration (readiness, retries, backoff, leases, finalization);
// this loop only claims steps, runs handlers, heartbeats, and reports the outcomes — in
// batches: the outcomes that finish while a batch is being recorded (or within flushIntervalMs)
// are recorded together in one transaction, which also claims steps for the slots they free
// (tasker_core.report_and_claim, 0.6.0: one commit per batch, and a step its parent made
// ready starts at once; report_steps with 0.5.0).

const { EventEmitter } = require('node:events');
const os = require('node:os');
const pg = require('pg');

const READY_CHANNEL = 'tasker_ready';
const LEASE_LOST = 'TK030';
// errors of a connection rather than of a statement: socket errors, connection exceptions
// (class 08), the server shutting down or not yet accepting (57P0x), a read-only server
const SOCKET_ERRORS = new Set(['ECONNREFUSED', 'ECONNRESET', 'EPIPE', 'ETIMEDOUT', 'EHOSTUNREACH', 'ENETUNREACH']);

/** One outcome as an element of report_steps' JSON array. */
function itemOf(o) {
  return o.error === undefined
    ? `{"step_id":${o.stepId},"results":${o.results}}`
    : `{"step_id":${o.stepId},"error":${o.error},"retryable":${o.retryable},"retry_after_seconds":${o.retryAfter ?? 'null'}}`;
}

/** True when an error says the connection failed, not the statement: what it did is unknown. */
function connectionLost(err) {
  const code = err && err.code;
  if (typeof code === 'string') {
    return SOCKET_ERRORS.has(code) || code.startsWith('08') || ['57P01', '57P02', '57P03', '25006'].includes(code);
  }
  // node-postgres' own errors of a broken or unavailable connection carry no code
  return /Connection terminated|connection error|timeout exceeded when trying to connect|not queryable/i.test(err?.message ?? '');
}

/** A failure worth retrying; `retryAfter` (seconds) overrides the database's backoff. */
class RetryableError extends Error {
  constructor(message, { retryAfter, cause } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = 'RetryableError';
    this.retryAfter = retryAfter;
  }
}

/** A failure that retrying cannot fix: the step is not retried and its task ends in error. */
class PermanentError extends Error {
  constructor(message, options) {
    super(message, options);
    this.name = 'PermanentError';
  }
}

/** No handler is registered for a step's handler_class (a permanent failure). */
class UnknownHandlerError extends PermanentError {
  constructor(handlerClass) {
    super(`no handler registered for ${JSON.stringify(handlerClass)}`);
    this.name = 'UnknownHandlerError';
  }
}

/** A handler ran longer than stepTimeoutMs (a retryable failure). */
class TimeoutError extends Error {
  constructor(ms) {
    super(`step handler timed out after ${ms} ms`);
    this.name = 'TimeoutError';
  }
}

// Abort reasons that end a step without reporting a failure.
class LeaseLostError extends Error {
  constructor(message) {
    super(message);
    this.name = 'LeaseLostError';
  }
}
class ShutdownError extends Error {
  constructor() {
    super('worker shutting down: step released');
    this.name = 'ShutdownError';
  }
}

/** The JSON a failure is recorded with (results.error and the transition metadata). */
function errorJson(error) {
  const isError = error instanceof Error;
  const name = isError ? error.name : 'NonErrorThrown';
  const json = {
    message: isError ? error.message : String(error),
    name,
    errorClass: isError ? error.constructor.name : typeof error,
  };
  if (isError && typeof error.stack === 'string') {
    json.stack = error.stack.split('\n').slice(1, 6).map((line) => line.trim());
  }
  if (isError && error.code !== undefined) json.code = String(error.code);
  return json;
}

function classify(error) {
  if (error instanceof PermanentError) return { retryable: false, retryAfter: null };
  const after = error instanceof RetryableError ? Number(error.retryAfter) : NaN;
  return { retryable: true, retryAfter: Number.isFinite(after) ? Math.max(0, Math.ceil(after)) : null };
}

// A map step's instance has {element, index} as its inputs.
function isMapInstance(inputs) {
  if (inputs === null || typeof inputs !== 'object' || Array.isArray(inputs)) return false;
  const keys = Object.keys(inputs).sort();
  return keys.length === 2 && keys[0] === 'element' && keys[1] === 'index';
}

function toStep(row) {
  const inputs = row.inputs ?? {};
  const instance = isMapInstance(inputs);
  return {
    taskId: Number(row.task_id),
    stepId: Number(row.workflow_step_id),
    name: row.step_name,
    namespace: row.namespace,
    taskName: row.task_name,
    handlerClass: row.handler_class,
    config: row.handler_config ?? {},
    inputs,
    // a map step's instance: its element of the mapped array and its position (else undefined)
    element: instance ? inputs.element : undefined,
    index: instance ? inputs.index : undefined,
    parentResults: row.parent_results ?? {},
    attempt: row.attempt,
    leaseExpiresAt: row.lease_expires_at,
    traceparent: row.traceparent ?? null, // W3C trace context of the task, for the handler's span
  };
}

const quiet = { info() {}, warn() {}, error() {} };

class Worker extends EventEmitter {
  #pgConfig;
  #inFlight = new Map(); // stepId -> { step, controller, state: 'running' | 'finishing', done }
  #timers = new Set(); // wake-ups for backoffs running out
  #listener = null;
  #loop = null;
  #stopping = false;
  #stopPromise = null;
  #woken = false;
  #wakeup = null;
  #signalHandler = null;
  #outbox = []; // outcomes waiting to be recorded: { stepId, results | error, ..., resolve, reject }
  #flushTimer = null;
  #flushing = false;
  #batched = true; // the server has report_steps
  #combined = true; // the server has report_and_claim
  #reserved = 0; // slots of claims under way
  #graceUntil = null; // when stop()'s grace period ends: resends give up after it

  /**
   * @param {object} options pg settings (connectionString, host, database, ...) plus
   *   workerId, namespaces, batchSize, leaseSeconds, pollIntervalMs, stepTimeoutMs,
   *   shutdownGraceMs (default leaseSeconds/2), handleSignals (default true), logger,
   *   traceparent (a function returning the worker's W3C trace context, asked at each claim),
   *   flushIntervalMs (how long an outcome waits for others to be recorded with it; default 0:
   *   outcomes that finish while a batch is being recorded go in the next one),
   *   poolSize (connections for claims, outcomes and heartbeats; default batchSize + 2).
   */
  constructor(options = {}) {
    super();
    const {
      workerId = `${os.hostname()}-${process.pid}`,
      namespaces = null,
      batchSize = 4,
      leaseSeconds = 30,
      pollIntervalMs = 1000,
      stepTimeoutMs = 5 * 60 * 1000,
      shutdownGraceMs = (leaseSeconds * 1000) / 2,
      handleSignals = true,
      logger = console,
      traceparent = null,
      flushIntervalMs = 0,
      poolSize = batchSize + 2,
      ...pgConfig
    } = options;
    if (!Number.isFinite(flushIntervalMs) || flushIntervalMs < 0) throw new RangeError('flushIntervalMs must be a number >= 0');
    if (!Number.isInteger(poolSize) || poolSize < 1) throw new RangeError('poolSize must be a positive integer');
    if (!Number.isInteger(batchSize) || batchSize < 1 || batchSize > 1000) throw new RangeError('batchSize must be an integer in 1..1000');
    if (!Number.isInteger(leaseSeconds) || leaseSeconds < 1 || leaseSeconds > 86400) throw new RangeError('leaseSeconds must be an integer in 1..86400');
    if (traceparent != null && typeof traceparent !== 'function') throw new TypeError('traceparent must be a function returning a W3C traceparent or null');
    Object.assign(this, { workerId, batchSize, leaseSeconds, pollIntervalMs, stepTimeoutMs, shutdownGraceMs, handleSignals, traceparent, flushIntervalMs });
    this.namespaces = namespaces == null ? null : [].concat(namespaces);
    const log = logger || quiet;
    const prefix = `[tasker-worker ${workerId}]`;
    this.log = {
      info: (msg) => log.info(`${prefix} ${msg}`),
      warn: (msg) => log.warn(`${prefix} ${msg}`),
      error: (msg) => log.error(`${prefix} ${msg}`),
    };
    this.#pgConfig = pgConfig;
    this.pool = new pg.Pool({ ...pgConfig, max: poolSize });
    this.pool.on('error', (err) => this.log.warn(`idle connection error: ${err.message}`));
    this.handlers = new Map();
  }

  /** Registers `fn(step) -> results` for steps whose template says `handler_class: name`. */
  register(handlerClass, fn) {
    if (typeof fn !== 'function') throw new TypeError('a handler must be a function');
    this.handlers.set(handlerClass, fn);
    return this;
  }

  /** tasker_core.register_task_template: stores a template (the Rails YAML as an object). */
  async registerTemplate(template) {
    const { rows } = await this.pool.query('SELECT tasker_core.register_task_template($1::jsonb) AS id', [JSON.stringify(template)]);
    return rows[0].id;
  }

  /**
   * tasker_core.create_task: starts a task; options as in the SQL function plus `version`, with
   * `priority` (-1000..1000, higher first) and a later start: `runAt` (a Date or a timestamptz
   * string) or `delaySeconds` (the SQL names run_at and delay_seconds work too).
   */
  async createTask(namespace, name, context = {}, { version = null, runAt, delaySeconds, ...options } = {}) {
    if (runAt !== undefined) options.run_at = runAt instanceof Date ? runAt.toISOString() : runAt;
    if (delaySeconds !== undefined) options.delay_seconds = delaySeconds;
    const { rows } = await this.pool.query(
      'SELECT tasker_core.create_task($1, $2, $3, $4::jsonb, $5::jsonb) AS id',
      [namespace, name, version, JSON.stringify(context), JSON.stringify(options)],
    );
    return Number(rows[0].id);
  }

  /** Connects, LISTENs and starts the claim loop; resolves once it is running. */
  async start() {
    if (this.#loop || this.#stopping) throw new Error('a Worker is started once');
    const { rows } = await this.pool.query(
      "SELECT to_regprocedure('tasker_core.report_steps(text, jsonb)') IS NOT NULL AS batched, " +
        "to_regprocedure('tasker_core.report_and_claim(text, jsonb, text[], integer, integer, text)') IS NOT NULL AS combined",
    );
    this.#batched = rows[0].batched;
    this.#combined = rows[0].combined;
    await this.#listen();
    if (this.handleSignals) {
      this.#signalHandler = (signal) => this.#onSignal(signal);
      process.on('SIGTERM', this.#signalHandler);
      process.on('SIGINT', this.#signalHandler);
    }
    this.log.info(`started (namespaces ${this.namespaces ? this.namespaces.join(', ') : 'all'}, batch ${this.batchSize}, lease ${this.leaseSeconds} s)`);
    this.#loop = this.#run();
    return this;
  }

  /**
   * Stops claiming, lets in-flight handlers finish for `graceMs`, releases the steps still
   * running (release_step: the attempt is not counted) and closes the connections.
   */
  stop({ graceMs = this.shutdownGraceMs } = {}) {
    this.#stopPromise ??= (async () => {
      this.#stopping = true;
      this.#graceUntil = Date.now() + graceMs;
      this.#wake();
      await this.#loop;
      for (const t of this.#timers) clearTimeout(t);
      if (this.#inFlight.size > 0) {
        this.log.info(`stopping: waiting up to ${graceMs} ms for ${this.#inFlight.size} step(s)`);
        let timer;
        const grace = new Promise((resolve) => { timer = setTimeout(resolve, graceMs); });
        await Promise.race([grace, this.#settled()]);
        clearTimeout(timer);
        this.#releaseRunning();
        await this.#settled();
      }
      if (this.#signalHandler) {
        process.off('SIGTERM', this.#signalHandler);
        process.off('SIGINT', this.#signalHandler);
      }
      const listener = this.#listener;
      this.#listener = null;
      await Promise.allSettled([listener?.end(), this.pool.end()]);
      this.log.info('stopped');
    })();
    return this.#stopPromise;
  }

  #onSignal(signal) {
    if (this.#stopping) {
      this.log.warn(`${signal} again: releasing the running steps now`);
      this.#releaseRunning();
      return;
    }
    this.log.info(`${signal}: shutting down`);
    this.stop().then(() => process.exit(0), (err) => {
      this.log.error(`shutdown failed: ${err.stack}`);
      process.exit(1);
    });
  }

  #releaseRunning() {
    for (const entry of this.#inFlight.values()) {
      if (entry.state === 'running') entry.controller.abort(new ShutdownError());
    }
  }

  #settled() {
    return Promise.allSettled([...this.#inFlight.values()].map((e) => e.done));
  }

  // --- wake-ups: NOTIFY on tasker_ready, a finished handler, a backoff running out, the poll

  async #listen() {
    const client = new pg.Client(this.#pgConfig);
    const drop = (err) => {
      if (this.#listener !== client) return;
      this.#listener = null;
      if (!this.#stopping) this.log.warn(`listener lost${err ? `: ${err.message}` : ''}; polling until it reconnects`);
      client.end().catch(() => {});
      this.#wake();
    };
    client.on('error', drop);
    client.on('end', () => drop());
    // Every wake-up triggers a claim, whatever namespace its payload names: the server sends
    // one wake-up per transaction, naming its first task, and the same transaction may have
    // made steps ready in other namespaces too (and tick() names none). A claim that finds
    // nothing costs one round trip.
    client.on('notification', () => this.#wake());
    try {
      await client.connect();
      await client.query(`LISTEN ${READY_CHANNEL}`);
    } catch (err) {
      client.end().catch(() => {});
      throw err;
    }
    this.#listener = client;
  }

  #wake() {
    this.#woken = true;
    if (this.#wakeup) this.#wakeup();
  }

  #wakeIn(ms) {
    const t = setTimeout(() => { this.#timers.delete(t); this.#wake(); }, ms);
    t.unref();
    this.#timers.add(t);
  }

  #sleep(ms) {
    if (this.#woken || this.#stopping) return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.#wakeup = null;
        resolve();
      };
      const timer = setTimeout(done, ms);
      this.#wakeup = done;
    });
  }

  // --- the loop: claim what the free slots allow, start the handlers, sleep until woken

  async #run() {
    while (!this.#stopping) {
      if (!this.#listener) {
        await this.#listen().catch((err) => this.log.warn(`cannot LISTEN: ${err.message}`));
      }
      const free = Math.max(0, this.batchSize - this.#inFlight.size - this.#reserved);
      let claimed = [];
      this.#woken = false;
      if (free > 0) {
        this.#reserved += free;
        try {
          const args = [this.workerId, this.namespaces, free, this.leaseSeconds];
          // with the worker's own trace (tasker_core 0.3.0), untraced tasks join it
          const trace = this.traceparent ? (this.traceparent() ?? null) : null;
          if (trace !== null) args.push(trace);
          const { rows } = await this.pool.query(
            'SELECT c.*, tasker_core.task_traceparent(c.task_id) AS traceparent ' +
              `FROM tasker_core.claim_steps($1, $2::text[], $3, $4${trace === null ? '' : ', $5'}) c`,
            args,
          );
          claimed = rows.map(toStep);
        } catch (err) {
          this.log.error(`claim failed: ${err.message}`);
          this.#woken = false; // wait a poll interval before trying again
        } finally {
          this.#reserved -= free;
        }
      }
      // steps claimed while stop() began are released at once by #launch
      for (const step of claimed) this.#launch(step);
      if (claimed.length < free || free === 0) await this.#sleep(this.pollIntervalMs);
    }
  }

  #launch(step) {
    const controller = new AbortController();
    step.signal = controller.signal; // aborted on timeout, lost lease or shutdown
    const entry = { step, controller, state: 'running' };
    this.#inFlight.set(step.stepId, entry);
    if (this.#stopping) controller.abort(new ShutdownError());
    entry.done = this.#execute(entry)
      .catch((err) => this.log.error(`step ${step.stepId}: ${err.stack}`))
      .finally(() => {
        this.#inFlight.delete(step.stepId);
        this.#wake();
      });
  }

  async #execute(entry) {
    const { step, controller } = entry;
    const aborted = new Promise((resolve) => {
      if (controller.signal.aborted) resolve({ kind: 'aborted', reason: controller.signal.reason });
      controller.signal.addEventListener('abort', () => resolve({ kind: 'aborted', reason: controller.signal.reason }), { once: true });
    });
    const timer = setTimeout(() => controller.abort(new TimeoutError(this.stepTimeoutMs)), this.stepTimeoutMs);
    const beat = setInterval(() => this.#heartbeat(entry), (this.leaseSeconds * 1000) / 3);
    let outcome;
    try {
      outcome = await Promise.race([
        aborted,
        (async () => {
          if (controller.signal.aborted) return new Promise(() => {});
          const handler = this.handlers.get(step.handlerClass);
          if (!handler) throw new UnknownHandlerError(step.handlerClass);
          return handler(step);
        })().then((value) => ({ kind: 'ok', value }), (error) => ({ kind: 'error', error })),
      ]);
    } finally {
      clearTimeout(timer);
      clearInterval(beat);
      entry.state = 'finishing';
    }
    const what = `step ${step.stepId} (${step.taskName}/${step.name}, task ${step.taskId}, attempt ${step.attempt})`;
    try {
      if (outcome.kind === 'ok') {
        await this.#complete(step, outcome.value, what);
      } else if (outcome.kind === 'error') {
        await this.#fail(step, outcome.error, what);
      } else if (outcome.reason instanceof TimeoutError) {
        await this.#fail(step, outcome.reason, what);
      } else if (outcome.reason instanceof ShutdownError) {
        await this.pool.query('SELECT tasker_core.release_step($1, $2)', [step.stepId, this.workerId]);
        this.log.info(`${what} released`);
        this.emit('released', step);
      } // LeaseLostError: logged by heartbeat, nothing to report
    } catch (err) {
      if (err.code === LEASE_LOST) {
        this.log.warn(`${what}: lease lost, outcome skipped (${err.message})`);
        this.emit('leaseLost', step, err);
      } else {
        this.log.error(`${what}: reporting the outcome failed: ${err.message}; the lease will expire and the step will be retried`);
      }
    }
  }

  async #complete(step, value, what) {
    let results;
    try {
      results = JSON.stringify(value === undefined ? {} : value);
    } catch (err) {
      return this.#fail(step, err, what); // e.g. a BigInt or a cycle in the results
    }
    const { unknown } = await this.#record({ stepId: step.stepId, results });
    if (unknown) return; // sent again after a lost connection and not applied: logged there
    this.log.info(`${what} complete`);
    this.emit('completed', step, value);
  }

  async #fail(step, error, what) {
    const { retryable, retryAfter } = classify(error);
    const json = errorJson(error);
    const { backoff, unknown } = await this.#record({ stepId: step.stepId, error: JSON.stringify(json), retryable, retryAfter });
    if (unknown) return; // its first send was cut off: logged there
    // nobody else may NOTIFY when the backoff runs out (unless tick() runs): wake ourselves
    if (backoff != null) this.#wakeIn(backoff * 1000 + 20);
    this.log.warn(`${what} failed (${json.name}: ${json.message}); ${backoff != null ? `retry in ${backoff} s` : 'not retried'}`);
    this.emit('failed', step, json, { retryable, backoff });
  }

  // --- outcomes: recorded in batches, each with the guarantees of complete_step / fail_step

  /** Resolves with { backoff } once the outcome is recorded; a lost lease rejects with TK030. */
  #record(outcome) {
    return new Promise((resolve, reject) => {
      this.#outbox.push({ ...outcome, resolve, reject });
      this.#scheduleFlush();
    });
  }

  // One flush at a time: outcomes that finish while one is being recorded go in the next, so
  // batches grow with the load and an idle worker records at once (plus flushIntervalMs).
  #scheduleFlush() {
    if (this.#flushTimer || this.#flushing || this.#outbox.length === 0) return;
    const run = async () => {
      this.#flushTimer = null;
      this.#flushing = true;
      try {
        await this.#flush();
      } finally {
        this.#flushing = false;
        this.#scheduleFlush();
      }
    };
    // setTimeout(0) waits at least a millisecond; setImmediate runs after pending I/O only
    this.#flushTimer = this.flushIntervalMs > 0 ? setTimeout(run, this.flushIntervalMs) : setImmediate(run);
  }

  async #flush() {
    const batch = this.#outbox;
    this.#outbox = [];
    if (batch.length === 0) return;
    if (this.#batched) {
      // the batch's steps are still in flight: their slots are the ones a claim may fill
      const free = this.#combined && !this.#stopping
        ? Math.max(0, this.batchSize - this.#inFlight.size + batch.length - this.#reserved) : 0;
      this.#reserved += free;
      try {
        let rows;
        let sent = batch;
        const resent = await this.#resending(`recording ${batch.length} outcomes`, async (again) => {
          sent = again ? batch.filter((o) => this.#sendable(o)) : batch;
          if (sent.length === 0) { rows = []; return; }
          const items = sent.map(itemOf);
          if (this.#combined) {
            const trace = free > 0 && this.traceparent ? (this.traceparent() ?? null) : null;
            ({ rows } = await this.pool.query(
              "SELECT r.*, CASE WHEN r.outcome = 'claimed' THEN tasker_core.task_traceparent(r.task_id) END AS traceparent " +
                'FROM tasker_core.report_and_claim($1, $2::jsonb, $3::text[], $4, $5, $6) r',
              [this.workerId, `[${items.join(',')}]`, this.namespaces, free, this.leaseSeconds, trace],
            ));
            for (const r of rows) if (r.outcome === 'claimed') this.#launch(toStep(r));
          } else {
            ({ rows } = await this.pool.query(
              'SELECT workflow_step_id, outcome, backoff_seconds FROM tasker_core.report_steps($1, $2::jsonb)',
              [this.workerId, `[${items.join(',')}]`],
            ));
          }
        });
        const byId = new Map(rows.filter((r) => r.outcome !== 'claimed').map((r) => [Number(r.workflow_step_id), r]));
        for (const o of batch) {
          const r = byId.get(o.stepId);
          if (!sent.includes(o)) o.resolve({ backoff: null, unknown: true }); // not sent again (#sendable)
          else if (r.outcome === 'lease_lost' && resent) this.#noLongerHeld(o);
          else if (r.outcome === 'lease_lost') o.reject(Object.assign(new Error(`step ${o.stepId} is no longer held by ${this.workerId}`), { code: LEASE_LOST }));
          else o.resolve({ backoff: r.backoff_seconds });
        }
        return;
      } catch (err) {
        if (connectionLost(err)) {
          this.log.error(`recording ${batch.length} outcomes gave up (${err.message}): their steps run again when the leases expire`);
          for (const o of batch) o.reject(err);
          return;
        }
        // the whole batch was refused: one by one, so that one bad outcome does not hold back the rest
        this.log.warn(`recording ${batch.length} outcomes failed (${err.message}); recording them one by one`);
      } finally {
        this.#reserved -= free;
      }
    }
    await Promise.all(batch.map((o) => this.#recordOne(o)));
  }

  async #recordOne(o) {
    try {
      await this.#resending(`step ${o.stepId}: recording the outcome`, async (again) => {
        if (again && !this.#sendable(o)) {
          o.resolve({ backoff: null, unknown: true });
          return;
        }
        try {
          if (o.error === undefined) {
            await this.pool.query('SELECT tasker_core.complete_step($1, $2, $3::jsonb)', [o.stepId, this.workerId, o.results]);
            o.resolve({ backoff: null });
          } else {
            const { rows } = await this.pool.query(
              'SELECT tasker_core.fail_step($1, $2, $3::jsonb, $4, $5) AS backoff',
              [o.stepId, this.workerId, o.error, o.retryable, o.retryAfter],
            );
            o.resolve({ backoff: rows[0].backoff });
          }
        } catch (err) {
          if (err.code !== LEASE_LOST) throw err;
          if (again) this.#noLongerHeld(o);
          else o.reject(err);
        }
      });
    } catch (err) {
      o.reject(err);
    }
  }

  /**
   * Runs `send` until it settles. A lost connection (a failover, a restart) leaves the outcome
   * of the call unknown: it is sent again on a new connection after a short pause, for up to
   * twice the lease (a minute at least); any other error is thrown. Sending an
   * outcome again is safe: the server applies it only while this worker holds the step's lease
   * and recording it ends the lease, so a second send of a recorded outcome finds the step no
   * longer held and changes nothing. Resolves with true when it had to send again.
   */
  async #resending(what, send) {
    const giveUp = Date.now() + Math.max(60_000, 2_000 * this.leaseSeconds);
    let resent = false;
    for (;;) {
      try {
        await send(resent);
        return resent;
      } catch (err) {
        const pastGrace = this.#graceUntil !== null && Date.now() > this.#graceUntil;
        if (!connectionLost(err) || Date.now() >= giveUp || pastGrace) throw err;
        this.log.warn(`${what}: connection lost (${err.message}); sending again`);
        resent = true;
        await new Promise((r) => setTimeout(r, Math.min(1000, this.pollIntervalMs)));
      }
    }
  }

  /** A resent outcome found its step no longer held: recorded by the first send, or the lease passed on. */
  #noLongerHeld(o) {
    this.log.info(`step ${o.stepId}: outcome sent again after a lost connection; the step is no longer held `
      + '(recorded by the first send, or its lease passed on)');
    o.resolve({ backoff: null, unknown: true });
  }

  /**
   * Whether an outcome whose first send was cut off may be sent again. A completion or a
   * permanent failure may: if the first send was recorded, the step is finished and no claim
   * can take it again, so the server refuses the resend (the lease is gone) and nothing
   * changes. A retryable failure may not: if its first send was recorded, the step may already
   * be claimed again by this worker (the claim half of that very call takes it when the backoff
   * is 0), and the resend would count as the new attempt's failure. Unsent, it is as if the
   * worker had died: the lease expires, the attempt counts, the step is retried.
   */
  #sendable(o) {
    if (o.error === undefined || !o.retryable) return true;
    this.log.info(`step ${o.stepId}: a retryable failure is not sent again after a lost connection `
      + '(its lease will expire and the step be retried)');
    return false;
  }

  async #heartbeat(entry) {
    if (entry.state !== 'running' || entry.beating) return;
    entry.beating = true;
    try {
      await this.pool.query('SELECT tasker_core.heartbeat($1, $2)', [entry.step.stepId, this.workerId]);
    } catch (err) {
      if (err.code === LEASE_LOST && entry.state === 'running') {
        this.log.warn(`step ${entry.step.stepId}: lease lost while running (${err.message}); abandoning it`);
        this.emit('leaseLost', entry.step, err);
        entry.controller.abort(new LeaseLostError(err.message));
      } else if (err.code !== LEASE_LOST) {
        this.log.warn(`step ${entry.step.stepId}: heartbeat failed: ${err.message}`);
      }
    } finally {
      entry.beating = false;
    }
  }
}

module.exports = { Worker, RetryableError, PermanentError, UnknownHandlerError, TimeoutError, errorJson };
