# A Rails app's view of the switch-over: ActiveRecord runs the example migration, then makes
# the calls the Tasker engine makes (select_all with bound parameters) and gets the rows the
# reference gives; rolling the migration back restores the previous functions.
require_relative "harness"

root = ENV.fetch("TASKER_ROOT")
require File.join(root, "examples", "rails", "db", "migrate", "20261126000000_switch_tasker_to_tasker_core.rb")

class SwitchoverTest < Minitest::Test
  include Harness

  def rows(conn, sql, binds = [])
    conn.select_all(sql, "Tasker Load", binds).to_a.map { |r| r.sort.to_h }
  end

  def same_rows?(a, b)
    a.sort_by(&:to_s) == b.sort_by(&:to_s)
  end

  def check(label, condition)
    assert condition, label
  end

  def test_the_migration_switches_over_and_back
    root = ENV.fetch("TASKER_ROOT")
    with_tasker_database do |conn|
      3.times { conn.execute(File.read(File.join(root, "demo", "sample_workflow.sql"))) }
      conn.execute(File.read(File.join(root, "sql", "reference", "tasker_reference.sql")))
      # some progress, written the way Statesman writes it
      conn.execute(<<~SQL)
        INSERT INTO tasker_workflow_step_transitions (to_state, metadata, sort_key, most_recent, workflow_step_id, created_at, updated_at)
        VALUES ('complete', '{}', 10, true, 1, now() - interval '5 minutes', now()),
               ('error', '{}', 10, true, 2, now() - interval '1 second', now()),
               ('complete', '{}', 10, true, 7, now() - interval '2 minutes', now());
        UPDATE tasker_workflow_steps SET attempts = 1, last_attempted_at = now() WHERE workflow_step_id = 2;
        UPDATE tasker_workflow_steps SET created_at = now() - interval '10 minutes' - workflow_step_id * interval '1 second';
        UPDATE tasker_tasks SET created_at = now() - interval '20 minutes';
      SQL

      ActiveRecord::Migration.verbose = false
      SwitchTaskerToTaskerCore.new.migrate(:up)
      check("public functions now call tasker_core",
            conn.select_value("SELECT count(*) FROM pg_proc WHERE pronamespace = 'public'::regnamespace AND prosrc LIKE '%tasker_core.%'") == 9)

      calls = [
        ["SELECT * FROM get_step_readiness_status($1::BIGINT, $2::BIGINT[])", [1, "{1,2,3,99}"], "get_step_readiness_status($1::BIGINT, $2::BIGINT[])"],
        ["SELECT * FROM get_step_readiness_status($1::BIGINT, $2::BIGINT[])", [2, nil], "get_step_readiness_status($1::BIGINT, $2::BIGINT[])"],
        ["SELECT * FROM get_step_readiness_status_batch($1::BIGINT[])", ["{1,2,3}"], "get_step_readiness_status_batch($1::BIGINT[])"],
        ["SELECT * FROM get_task_execution_context($1::BIGINT)", [1], "get_task_execution_context($1::BIGINT)"],
        ["SELECT * FROM get_task_execution_contexts_batch($1::BIGINT[])", ["{1,2,3,3}"], "get_task_execution_contexts_batch($1::BIGINT[])"],
        ["SELECT * FROM calculate_dependency_levels($1::BIGINT)", [1], "calculate_dependency_levels($1::BIGINT)"],
        ["SELECT * FROM get_slowest_steps_v01($1, $2)", [nil, 10], "get_slowest_steps_v01($1, $2)"],
        ["SELECT * FROM get_slowest_tasks_v01($1, $2)", [nil, 10], "get_slowest_tasks_v01($1, $2)"],
      ]
      calls.each do |sql, binds, ref|
        mine = rows(conn, sql, binds)
        theirs = rows(conn, "SELECT * FROM tasker_ref.#{ref}", binds)
        check("#{sql} matches the reference (#{mine.length} rows)", !mine.empty? && same_rows?(mine, theirs))
      end
      health = rows(conn, "SELECT * FROM get_system_health_counts_v01()").first
      ref_health = rows(conn, "SELECT * FROM tasker_ref.get_system_health_counts_v01()").first
      check("health counts match the reference",
            health.reject { |k, _| k == "active_connections" } == ref_health.reject { |k, _| k == "active_connections" })
      conn.transaction do # now() is the transaction timestamp: compare within one transaction
        analytics = rows(conn, "SELECT * FROM get_analytics_metrics_v01($1)", [nil])
        check("analytics match the reference",
                      same_rows?(analytics, rows(conn, "SELECT * FROM tasker_ref.get_analytics_metrics_v01($1)", [nil])))
      end
      dag = rows(conn, "SELECT * FROM tasker_step_dag_relationships WHERE task_id = $1", [1])
      check("the view answers from tasker_core", dag.length == 6 &&
                    same_rows?(dag, rows(conn, "SELECT * FROM tasker_ref.step_dag_relationships($1)", [1])))

      ready = rows(conn, "SELECT workflow_step_id FROM get_step_readiness_status($1::BIGINT, $2::BIGINT[]) WHERE ready_for_execution", [1, nil])
      check("children of the completed root are ready", ready.map { |r| r["workflow_step_id"] }.sort == [3, 4])

      SwitchTaskerToTaskerCore.new.migrate(:down)
      check("rollback removes the functions it added",
            conn.select_value("SELECT count(*) FROM pg_proc WHERE pronamespace = 'public'::regnamespace") == 0)
      check("rollback removes the triggers",
            conn.select_value("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'tasker_core_track%'") == 0)
    end
  end
end
