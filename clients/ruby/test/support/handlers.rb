# Step handler classes used by the tests, as a Rails app would define them (under app/).
module Shop
  class Validate < TaskerCore::StepHandler
    def call(step)
      { "order_id" => step.inputs.fetch("order_id"), "items" => step.inputs.fetch("items") }
    end
  end

  # fan-out: each of three parallel steps prices the order with its handler_config's factor
  class Price < TaskerCore::StepHandler
    def call(step)
      items = step.parent_results.fetch("validate").fetch("items")
      { "amount" => items.sum * config.fetch("factor"), "by" => step.name }
    end
  end

  # fan-in
  class Total < TaskerCore::StepHandler
    def call(step)
      { "total" => step.parent_results.values.sum { |r| r["amount"] }, "parents" => step.parent_results.keys.sort }
    end
  end
end

# Fails on its first attempt with a Retry-After, then succeeds.
class FlakyGateway < TaskerCore::StepHandler
  def call(step)
    raise TaskerCore::RetryableError.new("gateway busy", retry_after: config.fetch("retry_after")) if step.attempt == 1

    { "charged" => true, "attempt" => step.attempt }
  end
end

class CardDeclined < TaskerCore::StepHandler
  def call(_step)
    raise TaskerCore::PermanentError, "card declined"
  end
end

# Sleeps config["seconds"] on the first attempt, then returns at once.
class SlowFirstTime < TaskerCore::StepHandler
  def call(step)
    sleep config.fetch("seconds") if step.attempt == 1
    { "attempt" => step.attempt }
  end
end

# Sleeps config["seconds"] * SLOW_FACTOR (an environment variable, default 1).
class Sleeper < TaskerCore::StepHandler
  def call(step)
    sleep config.fetch("seconds") * Float(ENV.fetch("SLOW_FACTOR", "1"))
    { "slept" => step.name, "pid" => Process.pid }
  end
end

# Not a StepHandler subclass: any class with call(step) will do (no-argument initialize too).
class PlainHandler
  def call(step)
    { "plain" => step.name }
  end
end

# An operator resolves the step while the handler runs: the worker's completion gets TK030.
class ResolvedUnderneath < TaskerCore::StepHandler
  def call(step)
    ActiveRecord::Base.connection.select_value(
      "SELECT tasker_core.resolve_step_manually(#{Integer(step.step_id)}, '{\"by\": \"operator\"}')"
    )
    { "late" => true }
  end
end

# Records the traceparent each step's handler was given.
class TraceRecorder < TaskerCore::StepHandler
  SEEN = Queue.new

  def call(step)
    SEEN << [step.task_id, step.name, step.traceparent]
    {}
  end
end

# A map step over a dependency's results, and the fan-in that gets the array of its results.
module MapShop
  class Fetch < TaskerCore::StepHandler
    def call(_step)
      { "skus" => %w[a bb ccc] }
    end
  end

  class Price < TaskerCore::StepHandler
    def call(step)
      { "sku" => step.element, "index" => step.index, "price" => step.element.length }
    end
  end

  class Total < TaskerCore::StepHandler
    def call(step)
      raise "not a map instance" if step.map_instance?

      { "prices" => step.parent_results.fetch("price").map { |r| r["price"] }, "gift" => step.parent_results["gift"] }
    end
  end
end
