module TaskerCore
  # The Rails engine's SQL functions, answered by tasker_core (schema tasker_core, so this
  # works with or without `tasker_core.switch_over()`). Each returns an Array of Hashes with
  # string keys and values cast by column type, except `task_execution_context` and
  # `system_health_counts`, which return one Hash (nil when there is no row).
  module Functions
    module_function

    def step_readiness_status(task_id, step_ids = nil)
      query("get_step_readiness_status($1::bigint, $2::bigint[])", task_id, SQL.array(step_ids))
    end

    def step_readiness_status_batch(task_ids)
      query("get_step_readiness_status_batch($1::bigint[])", SQL.array(task_ids))
    end

    def task_execution_context(task_id)
      query("get_task_execution_context($1::bigint)", task_id).first
    end

    def task_execution_contexts(task_ids)
      query("get_task_execution_contexts_batch($1::bigint[])", SQL.array(task_ids))
    end

    def dependency_levels(task_id)
      query("calculate_dependency_levels($1::bigint)", task_id)
    end

    def step_dag_relationships(task_id)
      query("step_dag_relationships($1::bigint)", task_id)
    end

    def system_health_counts
      query("get_system_health_counts_v01()").first
    end

    def analytics_metrics(since = nil)
      query("get_analytics_metrics_v01($1::timestamptz)", since)
    end

    def slowest_steps(since: nil, limit: 10, namespace: nil, task_name: nil, version: nil)
      query("get_slowest_steps_v01($1::timestamptz, $2::integer, $3::text, $4::text, $5::text)",
           since, limit, namespace, task_name, version)
    end

    def slowest_tasks(since: nil, limit: 10, namespace: nil, task_name: nil, version: nil)
      query("get_slowest_tasks_v01($1::timestamptz, $2::integer, $3::text, $4::text, $5::text)",
           since, limit, namespace, task_name, version)
    end

    def query(function, *binds)
      SQL.rows("SELECT * FROM tasker_core.#{function}", binds, "TaskerCore::Functions")
    end
    private_class_method :query
  end
end
