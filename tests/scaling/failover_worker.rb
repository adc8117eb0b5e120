# The Ruby worker of the failover test: the unchanged client (clients/ruby, ActiveRecord) over the
# formation's hosts with target_session_attrs=read-write. Each handler run appends
# "step_id attempt" to FO_RUNS, as the Python worker does.
require "logger"
require_relative "../../clients/ruby/lib/tasker_core"

ActiveRecord::Base.establish_connection(
  adapter: "postgresql", host: ENV.fetch("FO_HOSTS"), port: ENV.fetch("FO_PORTS"), username: "postgres",
  database: ENV.fetch("FO_DB", "app"), target_session_attrs: "read-write", connect_timeout: 2, pool: 8
)

module FO
  RUNS = ENV.fetch("FO_RUNS")

  class Work < TaskerCore::StepHandler
    def call(step)
      sleep(0.02)
      File.open(RUNS, "a") { |f| f.write("#{step.step_id} #{step.attempt}\n") }
      { "by" => "ruby" }
    end
  end
end

logger = Logger.new($stderr, level: :info)
logger.formatter = proc { |sev, time, _, msg| "#{time.strftime('%H:%M:%S.%L')} ruby #{sev} #{msg}\n" }
TaskerCore::Worker.new(namespaces: ["failover"], concurrency: 4, lease_seconds: Integer(ENV.fetch("FO_LEASE", "20")),
                       poll_interval: 0.5, worker_id: "ruby", logger: logger).run
