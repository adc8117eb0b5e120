# ActiveRecord reads a workflow through tasker_core with a bound parameter, as Rails does.
require_relative "harness"

class TaskStepsTest < Minitest::Test
  include Harness

  def test_a_workflow_read_with_a_bound_parameter
    root = ENV.fetch("TASKER_ROOT")
    with_tasker_database do |conn|
      conn.execute(File.read(File.join(root, "demo", "sample_workflow.sql")))
      task_id = conn.select_value("SELECT max(task_id) FROM tasker_tasks")
      rows = conn.select_all("SELECT * FROM tasker_core.task_steps($1::BIGINT)", "task steps", [task_id]).to_a
      assert_equal 6, rows.length, "six steps come back"
      assert_equal ["validate_order", 0], [rows.first["name"], rows.first["dependency_level"]], "roots first"
      ship = rows.find { |r| r["name"] == "ship_order" }
      assert_equal 3, ship["parent_step_ids"].to_s.delete("{}").split(",").length, "fan-in has three parents"
      error = assert_raises(ActiveRecord::StatementInvalid) do
        conn.select_all("SELECT * FROM tasker_core.task_steps($1::BIGINT)", "missing", [-5])
      end
      assert_equal "TK004", sqlstate(error), "an unknown task raises TK004"
    end
  end
end
