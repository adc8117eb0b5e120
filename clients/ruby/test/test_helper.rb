# Each test file gets its own database on the server named by PGHOST/PGPORT/PGUSER (the
# project's throwaway cluster: `eval "$(scripts/cluster.sh env)"`), with tasker_core, the
# Tasker schema and tracking; it is dropped when the file's tests end.
ENV["TZ"] = "UTC"
require "minitest/autorun"
require "securerandom"
require "stringio"
require_relative "../lib/tasker_core"
require_relative "support/handlers"

module TestDB
  module_function

  def config(database)
    { adapter: "postgresql", host: ENV.fetch("PGHOST", "127.0.0.1"), port: Integer(ENV.fetch("PGPORT", "5432")),
      username: ENV.fetch("PGUSER", "postgres"), password: ENV["PGPASSWORD"], database: database, pool: 16 }.compact
  end

  def name
    @name ||= "rb_client_#{SecureRandom.hex(5)}"
  end

  def create
    ActiveRecord::Base.establish_connection(config("postgres"))
    ActiveRecord::Base.connection.execute(%(CREATE DATABASE "#{name}"))
    ActiveRecord::Base.establish_connection(config(name))
    conn = ActiveRecord::Base.connection
    conn.execute("CREATE EXTENSION tasker_core")
    conn.execute("SELECT tasker_core.install_schema()")
    conn.execute("SELECT tasker_core.enable_tracking()")
  end

  def drop
    ActiveRecord::Base.establish_connection(config("postgres"))
    ActiveRecord::Base.connection.execute(%(DROP DATABASE IF EXISTS "#{name}" WITH (FORCE)))
    ActiveRecord::Base.remove_connection
  end
end

TestDB.create
Minitest.after_run { TestDB.drop }

module WorkerHelpers
  def conn
    ActiveRecord::Base.connection
  end

  # A namespace of this test's own: workers claim only its steps.
  def namespace
    @namespace ||= "ns_#{name.gsub(/\W/, "")[0, 40]}_#{SecureRandom.hex(2)}"
  end

  # A template in this test's namespace: steps are [name, handler_class, parents, extra fields].
  def template(name, steps)
    TaskerCore.register_template(
      "name" => name, "namespace_name" => namespace, "version" => "1.0.0",
      "step_templates" => steps.map do |sname, handler, parents, extra|
        { "name" => sname, "handler_class" => handler, "depends_on_steps" => parents || [] }.merge(extra || {})
      end
    )
    name
  end

  def log_io
    @log_io ||= StringIO.new
  end

  def worker(**options)
    TaskerCore::Worker.new(namespaces: [namespace], logger: Logger.new(log_io), **options)
  end

  # Runs the worker in a thread until the block is true (or `timeout` seconds); returns the
  # seconds it took. Fails the test on timeout.
  def run_until(worker, timeout: 20, &done)
    started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    thread = Thread.new { worker.run }
    deadline = started + timeout
    sleep 0.05 until done.call || Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline
    elapsed = Process.clock_gettime(Process::CLOCK_MONOTONIC) - started
    assert done.call, "not done after #{timeout}s; worker log:\n#{log_io.string}"
    elapsed
  ensure
    worker.stop
    thread&.join
  end

  def finished?(task_id)
    TaskerCore.task_finished?(task_id)
  end

  def steps_of(task_id)
    TaskerCore::SQL.rows(<<~SQL, [task_id]).to_h { |r| [r["name"], r] }
      SELECT ns.name::text AS name, ws.workflow_step_id, ws.results, ws.attempts, ws.retryable, ws.processed
      FROM tasker_workflow_steps ws JOIN tasker_named_steps ns USING (named_step_id)
      WHERE ws.task_id = $1
    SQL
  end

  def step_transitions(step_id)
    TaskerCore::SQL.rows(<<~SQL, [step_id])
      SELECT from_state, to_state, metadata, created_at FROM tasker_workflow_step_transitions
      WHERE workflow_step_id = $1 ORDER BY sort_key
    SQL
  end

  def states(step_id)
    step_transitions(step_id).map { |t| "#{t["from_state"]}>#{t["to_state"]}" }
  end
end
