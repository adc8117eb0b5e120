# ActiveRecord reads a workflow through tasker_core with a bound parameter, as Rails does.
require_relative "harness"

root = ENV.fetch("TASKER_ROOT")
Harness.with_tasker_database do |conn|
  conn.execute(File.read(File.join(root, "demo", "sample_workflow.sql")))
  task_id = conn.select_value("SELECT max(task_id) FROM tasker_tasks")
  rows = conn.select_all("SELECT * FROM tasker_core.task_steps($1::BIGINT)", "task steps", [task_id]).to_a
  Harness.check("six steps come back", rows.length == 6)
  Harness.check("roots first", rows.first["name"] == "validate_order" && rows.first["dependency_level"] == 0)
  ship = rows.find { |r| r["name"] == "ship_order" }
  Harness.check("fan-in has three parents", ship["parent_step_ids"].to_s.delete("{}").split(",").length == 3)
  begin
    conn.select_all("SELECT * FROM tasker_core.task_steps($1::BIGINT)", "missing", [-5])
    Harness.check("unknown task raises", false)
  rescue ActiveRecord::StatementInvalid => e
    Harness.check("unknown task raises TK004", e.cause.result.error_field(PG::PG_DIAG_SQLSTATE) == "TK004")
  end
end
puts "1 passed, 0 failed"
