require_relative "test_helper"

# TaskerCore::Functions returns what the SQL functions return: each wrapper is compared with the
# function called over a separate raw PG connection (pg's own type decoders, not ActiveRecord's).
class FunctionsTest < Minitest::Test
  include WorkerHelpers

  def setup
    name = template("order", [
      ["validate", "Shop::Validate"],
      ["price_a", "Shop::Price", ["validate"]],
      ["price_b", "Shop::Price", ["validate"]],
      ["price_c", "Shop::Price", ["validate"]],
      ["total", "Shop::Total", %w[price_a price_b price_c]],
    ])
    @tasks = 3.times.map { |i| TaskerCore.create_task(namespace, name, { "order_id" => i + 1 }) }
    # some progress: task 1 has a complete root, a complete, a failed (in backoff) and a running step
    claim = ->(n) { TaskerCore::SQL.claim_steps("w", namespaces: [namespace], max_steps: n) }
    TaskerCore::SQL.complete_step(claim.(1).first.step_id, "w", { "ok" => true })
    a, b = claim.(2)
    TaskerCore::SQL.complete_step(a.step_id, "w", { "amount" => 1 })
    TaskerCore::SQL.fail_step(b.step_id, "w", { "message" => "boom" }, retry_after: 60)
    claim.(1)
    @raw = PG.connect(**TestDB.config(TestDB.name).slice(:host, :port).merge(user: ENV.fetch("PGUSER", "postgres"), dbname: TestDB.name))
    @raw.type_map_for_results = PG::BasicTypeMapForResults.new(@raw)
    @raw.exec("SET client_min_messages = warning")
  end

  def teardown
    @raw&.close
  end

  def sql_rows(sql, *params)
    @raw.exec_params(sql, params.map { |p| p.is_a?(Array) ? PG::TextEncoder::Array.new.encode(p) : p }).to_a
  end

  def assert_same_rows(expected, actual)
    key = ->(r) { [r["task_id"].to_i, r["workflow_step_id"].to_i] }
    refute_empty expected
    assert_equal expected.sort_by(&key), actual.sort_by(&key)
  end

  def test_step_readiness_status
    t = @tasks.first
    assert_same_rows sql_rows("SELECT * FROM tasker_core.get_step_readiness_status($1, NULL)", t),
                     TaskerCore::Functions.step_readiness_status(t)
    ids = steps_of(t).values.map { |s| s["workflow_step_id"] }.first(3) + [999_999]
    subset = TaskerCore::Functions.step_readiness_status(t, ids)
    assert_equal 3, subset.size
    assert_same_rows sql_rows("SELECT * FROM tasker_core.get_step_readiness_status($1, $2::bigint[])", t, ids), subset
    assert_kind_of Time, subset.map { |r| r["last_attempted_at"] }.compact.first
  end

  def test_step_readiness_status_batch
    assert_same_rows sql_rows("SELECT * FROM tasker_core.get_step_readiness_status_batch($1::bigint[])", @tasks),
                     TaskerCore::Functions.step_readiness_status_batch(@tasks)
  end

  def test_task_execution_context
    @tasks.each do |t|
      assert_equal sql_rows("SELECT * FROM tasker_core.get_task_execution_context($1)", t).first,
                   TaskerCore::Functions.task_execution_context(t)
    end
    assert_equal "in_progress", TaskerCore::Functions.task_execution_context(@tasks.first)["status"]
    assert_same_rows sql_rows("SELECT * FROM tasker_core.get_task_execution_contexts_batch($1::bigint[])", @tasks),
                     TaskerCore::Functions.task_execution_contexts(@tasks)
  end

  def test_dependency_levels_and_dag
    t = @tasks.last
    levels = TaskerCore::Functions.dependency_levels(t)
    assert_same_rows sql_rows("SELECT * FROM tasker_core.calculate_dependency_levels($1)", t), levels
    assert_equal [0, 1, 1, 1, 2], levels.map { |r| r["dependency_level"] }.sort
    dag = TaskerCore::Functions.step_dag_relationships(t)
    assert_same_rows sql_rows("SELECT * FROM tasker_core.step_dag_relationships($1)", t), dag
    assert_kind_of Array, dag.first["child_step_ids"]
  end

  def test_health_analytics_and_slowest
    skip_live = ->(h) { h.reject { |k, _| %w[active_connections analysis_period_start calculated_at].include?(k) } }
    assert_equal skip_live.(sql_rows("SELECT * FROM tasker_core.get_system_health_counts_v01()").first),
                 skip_live.(TaskerCore::Functions.system_health_counts)
    assert_equal sql_rows("SELECT * FROM tasker_core.get_analytics_metrics_v01(NULL)").map(&skip_live),
                 TaskerCore::Functions.analytics_metrics.map(&skip_live)
    assert_same_rows sql_rows("SELECT * FROM tasker_core.get_slowest_steps_v01(NULL, 10, $1)", namespace),
                     TaskerCore::Functions.slowest_steps(namespace: namespace)
    assert_equal sql_rows("SELECT * FROM tasker_core.get_slowest_tasks_v01(NULL, 2)").map { |r| r["task_id"] },
                 TaskerCore::Functions.slowest_tasks(limit: 2).map { |r| r["task_id"] }
  end
end
