# The Ruby worker of the end-to-end test (clients/ruby, ActiveRecord); handlers as in worker.py.
require_relative "../../../clients/ruby/lib/tasker_core"

ActiveRecord::Base.establish_connection(
  adapter: "postgresql", host: ENV.fetch("PGHOST", "127.0.0.1"), port: Integer(ENV.fetch("PGPORT", "5432")),
  username: ENV.fetch("PGUSER", "postgres"), database: ENV.fetch("PGDATABASE"), pool: 8
)

module E2E
  NAME = "ruby"

  class Work < TaskerCore::StepHandler
    def call(step)
      sleep(0.01 + rand * 0.03)
      { "by" => NAME, "step" => step.name, "n" => step.inputs["n"], "tp" => step.traceparent }
    end
  end

  class Flaky < Work
    def call(step)
      raise TaskerCore::RetryableError.new("flaky on its first attempt", retry_after: 1) if step.attempt == 1
      super
    end
  end

  class Fatal < Work
    def call(step)
      raise TaskerCore::PermanentError, "this task is doomed" if step.inputs["doomed"]
      super
    end
  end

  class Join < Work
    def call(step)
      super.merge("parents" => step.parent_results.keys.sort)
    end
  end
end

TaskerCore::Worker.new(namespaces: ["e2e"], concurrency: 4, lease_seconds: 3, poll_interval: 0.5,
                       worker_id: E2E::NAME, logger: Logger.new($stderr, level: :warn)).run
