# A benchmark worker: ruby rb_worker.rb WORKER_ID (connection from the PG* environment).
# Handlers as in py_worker.py.
require_relative "../../clients/ruby/lib/tasker_core"

ActiveRecord::Base.establish_connection(
  adapter: "postgresql", host: ENV.fetch("PGHOST", "127.0.0.1"), port: Integer(ENV.fetch("PGPORT", "5432")),
  username: ENV.fetch("PGUSER", "postgres"), database: ENV.fetch("PGDATABASE"), pool: 8
)

class Noop
  def call(_step) = {}
end

class Stamp
  def call(_step) = { "t" => Time.now.to_f }
end

class Measure
  def call(step) = { "latency_ms" => (Time.now.to_f - step.parent_results["first"]["t"]) * 1000 }
end

worker = TaskerCore::Worker.new(worker_id: ARGV[0], concurrency: 4, poll_interval: 1,
                                logger: Logger.new($stderr, level: :warn))
$stdout.puts "ready"
$stdout.flush
worker.run
