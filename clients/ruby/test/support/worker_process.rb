# A worker as its own process, for the shutdown tests:
#   ruby worker_process.rb DATABASE NAMESPACE SHUTDOWN_TIMEOUT
# (PGHOST/PGPORT/PGUSER from the environment). It logs to stdout.
require_relative "../../lib/tasker_core"
require_relative "handlers"

database, namespace, grace = ARGV
$stdout.sync = true
ActiveRecord::Base.establish_connection(
  adapter: "postgresql", host: ENV.fetch("PGHOST", "127.0.0.1"), port: Integer(ENV.fetch("PGPORT", "5432")),
  username: ENV.fetch("PGUSER", "postgres"), database: database, pool: 4
)
TaskerCore::Worker.new(namespaces: [namespace], concurrency: 2, shutdown_timeout: Float(grace),
                       worker_id: "subprocess-#{Process.pid}", logger: Logger.new($stdout)).run
puts "exited cleanly"
