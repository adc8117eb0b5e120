module TaskerCore
  # The SQL calls, each one statement with bound parameters on the calling thread's
  # ActiveRecord connection (autocommit: each call is its own transaction, unless the caller
  # wraps it in one).
  module SQL
    ARRAY = PG::TextEncoder::Array.new
    LEASE_LOST = "TK030"

    module_function

    def connection
      TaskerCore.record_class.connection
    end

    # Rows as hashes, values cast by their column types (Integer, Time, Hash for jsonb, ...).
    def rows(sql, binds = [], name = "TaskerCore")
      result = connection.select_all(sql, name, binds, preparable: true)
      types = result.column_types
      result.rows.map do |values|
        result.columns.each_with_index.to_h do |column, i|
          type = types[column]
          [column, type ? type.deserialize(values[i]) : values[i]]
        end
      end
    end

    def value(sql, binds = [])
      rows(sql, binds).first&.values&.first
    end

    # A PostgreSQL array literal for a bound parameter (nil stays NULL).
    def array(values)
      values && ARRAY.encode(Array(values))
    end

    # The SQLSTATE of a PG error, or of the PG error behind an ActiveRecord one.
    def sqlstate(error)
      pg = error.is_a?(PG::Error) ? error : error.cause
      pg.result&.error_field(PG::Result::PG_DIAG_SQLSTATE) if pg.is_a?(PG::Error)
    end

    # Runs the block, turning TK030 into TaskerCore::LeaseLost.
    def lease_checked
      yield
    rescue ActiveRecord::StatementInvalid, PG::Error => e
      raise unless sqlstate(e) == LEASE_LOST
      pg = e.is_a?(PG::Error) ? e : e.cause
      raise LeaseLost, pg.result.error_field(PG::Result::PG_DIAG_MESSAGE_PRIMARY)
    end

    # `traceparent`: the worker's W3C trace context; claimed tasks without a trace of their own
    # join it (tasker_core 0.3.0; without one the call also works on 0.2.0).
    def claim_steps(worker_id, namespaces: nil, max_steps: 1, lease_seconds: 60, traceparent: nil)
      args = [worker_id, array(namespaces), max_steps, lease_seconds]
      params = "$1, $2::text[], $3, $4"
      if traceparent
        args << traceparent
        params += ", $5"
      end
      rows("SELECT c.*, tasker_core.task_traceparent(c.task_id) AS traceparent " \
           "FROM tasker_core.claim_steps(#{params}) c", args).map { |r| Step.from_row(r) }
    end

    def complete_step(step_id, worker_id, results)
      lease_checked do
        value("SELECT tasker_core.complete_step($1, $2, $3::jsonb)", [step_id, worker_id, JSON.generate(results)])
      end
    end

    # Returns the backoff in seconds, or nil when the step will not be retried.
    def fail_step(step_id, worker_id, error, retryable: true, retry_after: nil)
      lease_checked do
        value("SELECT tasker_core.fail_step($1, $2, $3::jsonb, $4, $5::integer)",
              [step_id, worker_id, JSON.generate(error), retryable, retry_after&.ceil])
      end
    end

    # Many outcomes in one transaction (tasker_core 0.5.0): `outcomes` are hashes
    # {"step_id", "results"} or {"step_id", "error", "retryable", "retry_after_seconds"}. One row
    # per step: workflow_step_id, outcome (completed, failed, lease_lost), backoff_seconds.
    def report_steps(worker_id, outcomes)
      rows("SELECT workflow_step_id, outcome, backoff_seconds FROM tasker_core.report_steps($1, $2::jsonb)",
           [worker_id, JSON.generate(outcomes)])
    end

    # Whether the server has report_steps.
    def report_steps?
      value("SELECT to_regprocedure('tasker_core.report_steps(text, jsonb)') IS NOT NULL")
    end

    # report_steps, then claim_steps in the same transaction (tasker_core 0.6.0): returns the
    # report's rows (as report_steps) and the claimed Steps. The claim never waits for a lock:
    # when it would, the outcomes are recorded and no step is claimed.
    def report_and_claim(worker_id, outcomes, namespaces: nil, max_steps: 1, lease_seconds: 60, traceparent: nil)
      all = rows("SELECT r.*, CASE WHEN r.outcome = 'claimed' THEN tasker_core.task_traceparent(r.task_id) END " \
                 "AS traceparent FROM tasker_core.report_and_claim($1, $2::jsonb, $3::text[], $4, $5, $6) r",
                 [worker_id, JSON.generate(outcomes), array(namespaces), max_steps, lease_seconds, traceparent])
      claimed, reported = all.partition { |r| r["outcome"] == "claimed" }
      [reported, claimed.map { |r| Step.from_row(r) }]
    end

    # Whether the server has report_and_claim.
    def report_and_claim?
      value("SELECT to_regprocedure('tasker_core.report_and_claim(text, jsonb, text[], integer, integer, text)') " \
            "IS NOT NULL")
    end

    # Returns the new lease deadline.
    def heartbeat(step_id, worker_id)
      lease_checked { value("SELECT tasker_core.heartbeat($1, $2)", [step_id, worker_id]) }
    end

    def release_step(step_id, worker_id)
      lease_checked { value("SELECT tasker_core.release_step($1, $2)", [step_id, worker_id]) }
    end
  end
end
