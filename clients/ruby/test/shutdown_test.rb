require_relative "test_helper"
require "open3"

# SIGTERM to a worker process mid-step: it stops claiming, lets the step that can finish within
# the grace period finish, releases the one that cannot, and exits 0; another worker then
# completes the task.
class ShutdownTest < Minitest::Test
  include WorkerHelpers

  SCRIPT = File.expand_path("support/worker_process.rb", __dir__)

  def spawn_worker(grace)
    Open3.popen2e({ "SLOW_FACTOR" => "1" }, RbConfig.ruby, SCRIPT, TestDB.name, namespace, grace.to_s)
  end

  def wait_for(timeout = 15)
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
    sleep 0.05 until yield || Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline
    assert yield, "timed out"
  end

  def in_progress(task_id)
    steps_of(task_id).values.select { |s| states(s["workflow_step_id"]).last == "pending>in_progress" }
  end

  def test_sigterm_finishes_what_it_can_and_releases_the_rest
    name = template("two_speeds", [
      ["quick", "Sleeper", [], { "handler_config" => { "seconds" => 1.5 } }],
      ["long", "Sleeper", [], { "handler_config" => { "seconds" => 60 } }],
      ["after", "PlainHandler", %w[quick long]],
    ])
    task_id = TaskerCore.create_task(namespace, name, {})
    stdin, output, process = spawn_worker(4)
    stdin.close
    wait_for { in_progress(task_id).size == 2 }
    signalled = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    Process.kill("TERM", process.pid)
    status = process.value
    took = Process.clock_gettime(Process::CLOCK_MONOTONIC) - signalled
    log = output.read

    assert_equal 0, status.exitstatus, log
    assert_match(/exited cleanly/, log)
    assert_operator took, :<, 4 + 3, "did not respect the grace period"
    steps = steps_of(task_id)
    assert_equal "quick", steps["quick"]["results"]["slept"], "the quick step finished in the grace period"
    assert_equal process.pid, steps["quick"]["results"]["pid"]
    long = step_transitions(steps["long"]["workflow_step_id"])
    assert_equal %w[pending>in_progress in_progress>error], long.map { |t| "#{t["from_state"]}>#{t["to_state"]}" }
    assert_equal "released", long.last["metadata"]["reason"]
    assert_equal 0, steps["long"]["attempts"], "a released attempt does not count"
    assert_match(/released step #{steps["long"]["workflow_step_id"]}/, log)

    # another worker (here: handlers that do not sleep) finishes the task
    ENV["SLOW_FACTOR"] = "0"
    run_until(worker) { finished?(task_id) }
    assert_equal "complete", TaskerCore.task_status(task_id)
    assert_equal 1, steps_of(task_id)["long"]["attempts"]
  ensure
    ENV.delete("SLOW_FACTOR")
  end

  def test_sigterm_with_a_long_enough_grace_period_lets_the_step_finish
    name = template("one", [["only", "Sleeper", [], { "handler_config" => { "seconds" => 1 } }]])
    task_id = TaskerCore.create_task(namespace, name, {})
    stdin, output, process = spawn_worker(20)
    stdin.close
    wait_for { in_progress(task_id).size == 1 }
    Process.kill("TERM", process.pid)
    status = process.value

    assert_equal 0, status.exitstatus, output.read
    assert_equal "complete", TaskerCore.task_status(task_id)
    assert_equal process.pid, steps_of(task_id)["only"]["results"]["pid"]
  end
end
