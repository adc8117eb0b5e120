# Helpers for Ruby integration tests (minitest): a scratch database on the harness cluster,
# reached through ActiveRecord exactly as a Rails app would reach it. A test class includes
# Harness; `ruby file_test.rb` runs it and exits non-zero when an assertion fails.
require "active_record"
require "minitest/autorun"
require "securerandom"

module Harness
  def admin_config(database = "postgres")
    {
      adapter: "postgresql",
      host: ENV.fetch("PGHOST"),
      port: Integer(ENV.fetch("PGPORT")),
      username: ENV.fetch("PGUSER", "postgres"),
      database: database,
    }
  end

  # Creates a database with tasker_core and the Tasker schema, connects ActiveRecord to it,
  # yields, and drops it afterwards.
  def with_tasker_database
    name = "rb_#{SecureRandom.hex(6)}"
    ActiveRecord::Base.establish_connection(admin_config)
    ActiveRecord::Base.connection.execute(%(CREATE DATABASE "#{name}"))
    ActiveRecord::Base.establish_connection(admin_config(name))
    conn = ActiveRecord::Base.connection
    conn.execute("CREATE EXTENSION tasker_core")
    conn.execute("SELECT tasker_core.install_schema()")
    yield conn
  ensure
    ActiveRecord::Base.establish_connection(admin_config)
    ActiveRecord::Base.connection.execute(%(DROP DATABASE IF EXISTS "#{name}" WITH (FORCE))) if name
  end

  # The SQLSTATE of the PG error behind an ActiveRecord error.
  def sqlstate(error)
    error.cause.result.error_field(PG::PG_DIAG_SQLSTATE)
  end
end
