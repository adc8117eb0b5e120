module TaskerCore
  # A claimed step, as a handler sees it. `inputs` is the task context (a map step's instance:
  # its element and index, see #element); `parent_results` the
  # results of the step's parents by step name; `attempt` counts from 1; `traceparent` the
  # task's W3C trace context (nil when it has none), for the handler's span.
  Step = Struct.new(:task_id, :step_id, :name, :namespace, :task_name, :handler_class, :config,
                    :inputs, :parent_results, :attempt, :lease_expires_at, :traceparent, keyword_init: true) do
    def self.from_row(row)
      new(task_id: row["task_id"], step_id: row["workflow_step_id"], name: row["step_name"],
          namespace: row["namespace"], task_name: row["task_name"],
          handler_class: row["handler_class"], config: row["handler_config"] || {},
          inputs: row["inputs"] || {}, parent_results: row["parent_results"] || {},
          attempt: row["attempt"], lease_expires_at: row["lease_expires_at"], traceparent: row["traceparent"])
    end

    alias_method :context, :inputs

    # Whether the step is an instance of a map step: its inputs are {"element" => e, "index" => i}.
    def map_instance?
      inputs.is_a?(Hash) && inputs.keys.sort == %w[element index]
    end

    # A map step's instance: its element of the mapped array (nil for other steps).
    def element
      inputs["element"] if map_instance?
    end

    # A map step's instance: the position of its element (nil for other steps).
    def index
      inputs["index"] if map_instance?
    end
  end

  # Base class for step handlers (any class whose instances respond to `call(step)` will do).
  # The worker instantiates the class named by the step's handler_class with the step
  # template's handler_config and calls it; the return value becomes the step's results.
  # `handler_config["timeout_seconds"]` overrides the worker's step timeout.
  class StepHandler
    attr_reader :config

    def initialize(config = {})
      @config = config || {}
    end

    def call(step)
      raise NotImplementedError, "#{self.class.name}#call(step) is not implemented"
    end
  end
end
