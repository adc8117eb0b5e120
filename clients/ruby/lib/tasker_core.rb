# A worker for tasker_core, the PostgreSQL extension that runs Tasker workflows in SQL.
#
# The database does the orchestration (readiness, retries, backoff, leases, finalization);
# this library claims steps, runs handler classes, and reports back, over ActiveRecord.
#
#   TaskerCore.register_template(template_hash)
#   task_id = TaskerCore.create_task("mail", "welcome", { "user_id" => 42 })
#   TaskerCore::Worker.new(namespaces: %w[mail]).run
require "active_record"
require "pg"
require "json"
require "time"
require "logger"

require_relative "tasker_core/errors"
require_relative "tasker_core/sql"
require_relative "tasker_core/step"
require_relative "tasker_core/functions"
require_relative "tasker_core/worker"

module TaskerCore
  VERSION = "0.1.0"

  class << self
    # The ActiveRecord class whose connection reaches the Tasker database: ActiveRecord::Base,
    # or an abstract class of a multi-database app (`connects_to database: { writing: :tasker }`).
    attr_writer :record_class

    def record_class
      @record_class || ActiveRecord::Base
    end

    # Registers (or replaces) a task template: the Rails YAML template as a Hash.
    # Returns the named task id.
    def register_template(template)
      SQL.value("SELECT tasker_core.register_task_template($1::jsonb)", [JSON.generate(template)])
    end

    # Creates a task of a registered template; returns its id. Options: initiator,
    # source_system, reason, tags, bypass_steps, idempotency_key, traceparent, priority
    # (-1000..1000, higher is claimed first), and a later start: run_at (a Time or a timestamptz
    # string) or delay_seconds.
    def create_task(namespace, name, context, version: nil, **options)
      options[:run_at] = options[:run_at].utc.iso8601(6) if options[:run_at].respond_to?(:iso8601)
      SQL.value("SELECT tasker_core.create_task($1, $2, $3, $4::jsonb, $5::jsonb)",
                [namespace, name, version, JSON.generate(context), JSON.generate(options)])
    end

    # The task's current state: pending, in_progress, complete, error, cancelled,
    # resolved_manually (nil for an unknown task).
    def task_status(task_id)
      Functions.task_execution_context(task_id)&.fetch("status")
    end

    # { step name => results } of a task's steps (reads the Tasker tables on the search_path).
    def step_results(task_id)
      SQL.rows(<<~SQL, [task_id]).to_h { |r| [r["name"], r["results"]] }
        SELECT ns.name::text AS name, ws.results
        FROM tasker_workflow_steps ws JOIN tasker_named_steps ns USING (named_step_id)
        WHERE ws.task_id = $1 ORDER BY ws.workflow_step_id
      SQL
    end

    # True once the task reached a state no worker will move it out of by itself.
    def task_finished?(task_id)
      %w[complete error cancelled resolved_manually].include?(task_status(task_id))
    end
  end
end
