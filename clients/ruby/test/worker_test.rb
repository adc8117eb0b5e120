require_relative "test_helper"

class WorkerTest < Minitest::Test
  include WorkerHelpers

  def order_template
    template("order", [
      ["validate", "Shop::Validate"],
      ["price_a", "Shop::Price", ["validate"], { "handler_config" => { "factor" => 1 } }],
      ["price_b", "Shop::Price", ["validate"], { "handler_config" => { "factor" => 10 } }],
      ["price_c", "Shop::Price", ["validate"], { "handler_config" => { "factor" => 100 } }],
      ["total", "Shop::Total", %w[price_a price_b price_c]],
      ["plain", "PlainHandler", ["total"]],
    ])
  end

  def test_fan_out_fan_in_runs_to_completion_with_parent_results
    name = order_template
    tasks = 3.times.map { |i| TaskerCore.create_task(namespace, name, { "order_id" => i + 1, "items" => [1, 2, i] }) }
    run_until(worker(concurrency: 4)) { tasks.all? { |t| finished?(t) } }

    tasks.each_with_index do |task_id, i|
      assert_equal "complete", TaskerCore.task_status(task_id)
      steps = steps_of(task_id)
      sum = 3 + i
      assert_equal({ "amount" => sum * 10, "by" => "price_b" }, steps["price_b"]["results"])
      assert_equal({ "total" => sum * 111, "parents" => %w[price_a price_b price_c] }, steps["total"]["results"])
      assert_equal({ "plain" => "plain" }, steps["plain"]["results"])
      steps.each_value do |s|
        assert_equal 1, s["attempts"]
        assert_equal %w[pending>in_progress in_progress>complete], states(s["workflow_step_id"])
      end
    end
  end

  def test_a_map_instance_gets_its_element_and_the_fan_in_the_array
    name = template("map", [
      ["fetch", "MapShop::Fetch"],
      ["price", "MapShop::Price", ["fetch"], { "map" => { "over" => "/parents/fetch/skus" } }],
      ["gift", "CardDeclined", ["fetch"], { "condition" => { "path" => "/context/gift", "eq" => true } }],
      ["total", "MapShop::Total", %w[price gift]],
    ])
    task_id = TaskerCore.create_task(namespace, name, { "gift" => false })
    run_until(worker(concurrency: 3)) { finished?(task_id) }

    assert_equal "complete", TaskerCore.task_status(task_id)
    assert_equal({ "prices" => [1, 2, 3], "gift" => nil }, steps_of(task_id)["total"]["results"])
    instances = TaskerCore::SQL.rows(<<~SQL, [task_id]).map { |r| r["results"] }
      SELECT ws.results FROM tasker_workflow_steps ws JOIN tasker_named_steps ns USING (named_step_id)
      WHERE ws.task_id = $1 AND ns.name = 'price' AND ws.inputs ? 'element' ORDER BY ws.workflow_step_id
    SQL
    assert_equal [%w[a 0], %w[bb 1], %w[ccc 2]], instances.map { |r| [r["sku"], r["index"].to_s] }
  end

  def test_outcomes_finishing_together_are_recorded_in_one_transaction
    name = template("many", 10.times.map { |i| ["s#{i}", "PlainHandler"] })
    task_id = TaskerCore.create_task(namespace, name, {})
    run_until(worker(concurrency: 10, flush_interval: 0.05)) { finished?(task_id) }

    assert_equal "complete", TaskerCore.task_status(task_id)
    per_xid = conn.select_rows("SELECT count(*) FROM tasker_core.events WHERE task_id = #{task_id} " \
                               "AND name = 'step.completed' GROUP BY xid").flatten.map(&:to_i)
    assert_equal 10, per_xid.sum
    assert_operator per_xid.max, :>=, 2, "completions share a report_steps transaction: #{per_xid}"
  end

  def test_a_step_is_claimed_in_the_transaction_that_records_its_parent
    name = template("chain", [["one", "PlainHandler"], ["two", "PlainHandler", ["one"]],
                              ["three", "PlainHandler", ["two"]]])
    task_id = TaskerCore.create_task(namespace, name, {})
    run_until(worker(concurrency: 1, poll_interval: 5)) { finished?(task_id) }

    assert_equal "complete", TaskerCore.task_status(task_id)
    xid = conn.select_rows("SELECT e.name || '/' || s.name, e.xid::text FROM tasker_core.events e " \
                           "JOIN tasker_workflow_steps ws ON ws.workflow_step_id = e.step_id " \
                           "JOIN tasker_named_steps s ON s.named_step_id = ws.named_step_id " \
                           "WHERE e.task_id = #{task_id} " \
                           "AND e.name IN ('step.completed', 'step.execution_requested')").to_h
    assert_equal xid["step.completed/one"], xid["step.execution_requested/two"], xid.inspect
    assert_equal xid["step.completed/two"], xid["step.execution_requested/three"], xid.inspect
  end

  def test_untraced_tasks_join_the_workers_trace
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    name = template("traced", [["first", "TraceRecorder"], ["second", "TraceRecorder", ["first"]]])
    tasks = 2.times.map { TaskerCore.create_task(namespace, name, {}) }
    TraceRecorder::SEEN.clear
    run_until(worker(traceparent: -> { trace })) { tasks.all? { |t| finished?(t) } }

    seen = []
    seen << TraceRecorder::SEEN.pop until TraceRecorder::SEEN.empty?
    assert_equal tasks.product(%w[first second]).map { |t, n| [t, n, trace] }.sort, seen.sort
    tasks.each do |t|
      assert_equal trace, TaskerCore.record_class.connection.select_value(
        "SELECT tasker_core.task_traceparent(#{Integer(t)})"
      )
    end
    assert_raises(ArgumentError) { worker(traceparent: "not callable") }
  end

  def test_retryable_error_with_retry_after_is_retried_after_the_delay
    name = template("flaky", [["charge", "FlakyGateway", [], { "handler_config" => { "retry_after" => 1 } }]])
    task_id = TaskerCore.create_task(namespace, name, {})
    # the poll interval is far away: the worker wakes itself when the backoff it was given ends
    elapsed = run_until(worker(poll_interval: 30)) { finished?(task_id) }

    assert_equal "complete", TaskerCore.task_status(task_id)
    step = steps_of(task_id)["charge"]
    assert_equal({ "charged" => true, "attempt" => 2 }, step["results"])
    transitions = step_transitions(step["workflow_step_id"])
    assert_equal %w[pending>in_progress in_progress>error error>pending pending>in_progress in_progress>complete],
                 states(step["workflow_step_id"])
    error = transitions[1]["metadata"]
    assert_equal 1, error["backoff_seconds"]
    assert_equal "gateway busy", error["error"]["message"]
    assert_equal "TaskerCore::RetryableError", error["error"]["error_class"]
    assert_kind_of Array, error["error"]["backtrace"]
    assert_match(/handlers\.rb/, error["error"]["backtrace"].first)
    waited = transitions[3]["created_at"] - transitions[1]["created_at"]
    assert_operator waited, :>=, 1.0, "claimed again before the retry_after"
    assert_operator elapsed, :<, 5, "retried long after its backoff"
  end

  def test_permanent_error_ends_the_task_in_error
    name = template("declined", [["charge", "CardDeclined"], ["ship", "PlainHandler", ["charge"]]])
    task_id = TaskerCore.create_task(namespace, name, {})
    run_until(worker) { finished?(task_id) }

    assert_equal "error", TaskerCore.task_status(task_id)
    step = steps_of(task_id)["charge"]
    assert_equal 1, step["attempts"]
    assert_equal false, step["retryable"]
    assert_equal "TaskerCore::PermanentError", step["results"]["error"]["error_class"]
    assert_equal "card declined", step["results"]["error"]["message"]
    assert_equal %w[pending>in_progress in_progress>error], states(step["workflow_step_id"])
    assert_equal [], states(steps_of(task_id)["ship"]["workflow_step_id"])
  end

  def test_unknown_handler_class_fails_permanently
    name = template("unknown", [["a", "No::Such::Handler"], ["b", "String"]])
    task_id = TaskerCore.create_task(namespace, name, {})
    run_until(worker) { finished?(task_id) }

    assert_equal "error", TaskerCore.task_status(task_id)
    steps = steps_of(task_id)
    assert_equal "TaskerCore::UnknownHandler", steps["a"]["results"]["error"]["error_class"]
    assert_match(/No::Such::Handler/, steps["a"]["results"]["error"]["message"])
    assert_equal "TaskerCore::UnknownHandler", steps["b"]["results"]["error"]["error_class"]
    assert_match(/String does not respond to call/, steps["b"]["results"]["error"]["message"])
    assert_equal [1, 1], [steps["a"]["attempts"], steps["b"]["attempts"]]
  end

  def test_timeout_fails_retryably
    name = template("slow", [["export", "SlowFirstTime", [], { "handler_config" => { "seconds" => 30, "timeout_seconds" => 0.5 } }]])
    task_id = TaskerCore.create_task(namespace, name, {})
    elapsed = run_until(worker(poll_interval: 30)) { finished?(task_id) }

    assert_equal "complete", TaskerCore.task_status(task_id)
    step = steps_of(task_id)["export"]
    assert_equal({ "attempt" => 2 }, step["results"])
    error = step_transitions(step["workflow_step_id"])[1]["metadata"]
    assert_equal "TaskerCore::StepTimeout", error["error"]["error_class"]
    assert_equal true, error["retryable"]
    assert_operator elapsed, :<, 5
  end

  class WorkerWithoutHeartbeats < TaskerCore::Worker
    private def heartbeat(_entry) = nil
  end

  def test_a_handler_longer_than_its_lease_keeps_it_by_heartbeats
    name = template("long", [["crunch", "Sleeper", [], { "handler_config" => { "seconds" => 4.5 } }]])
    kept = TaskerCore.create_task(namespace, name, {})
    # the control: the same step run by a worker that does not heartbeat, in another namespace
    other = "#{namespace}_control"
    TaskerCore.register_template("name" => name, "namespace_name" => other, "version" => "1.0.0",
                                 "step_templates" => [{ "name" => "crunch", "handler_class" => "Sleeper",
                                                        "handler_config" => { "seconds" => 4.5 } }])
    lost = TaskerCore.create_task(other, name, {})
    control = WorkerWithoutHeartbeats.new(namespaces: [other], logger: Logger.new(log_io), lease_seconds: 2)
    control_thread = Thread.new { control.run }
    # once the workers hold the steps, a rival claims all the while: a 2 s lease that is not
    # renewed expires and the rival takes the step over
    stolen = []
    rival = Thread.new do
      ActiveRecord::Base.connection_pool.with_connection do
        sleep 0.05 until [kept, lost].none? { |t| TaskerCore.task_status(t) == "pending" }
        until finished?(kept)
          stolen.concat(TaskerCore::SQL.claim_steps("rival", namespaces: [namespace, other], lease_seconds: 60))
          sleep 0.2
        end
      end
    end
    run_until(worker(lease_seconds: 2)) { finished?(kept) }
    rival.join(5)
    control.stop
    control_thread.join

    assert_equal [lost], stolen.map(&:task_id), "the control lost its step, the heartbeating worker kept its own"
    assert_equal "complete", TaskerCore.task_status(kept)
    step = steps_of(kept)["crunch"]
    assert_equal 1, step["attempts"]
    assert_equal %w[pending>in_progress in_progress>complete], states(step["workflow_step_id"])
  end

  def test_lease_lost_on_completion_is_logged_and_the_worker_goes_on
    name = template("resolved", [["a", "ResolvedUnderneath"], ["b", "PlainHandler", ["a"]]])
    task_id = TaskerCore.create_task(namespace, name, {})
    run_until(worker) { finished?(task_id) }

    assert_equal "complete", TaskerCore.task_status(task_id)
    steps = steps_of(task_id)
    assert_equal({ "by" => "operator" }, steps["a"]["results"])
    assert_equal({ "plain" => "b" }, steps["b"]["results"])
    assert_match(/outcome not recorded, lease lost: .*step #{steps["a"]["workflow_step_id"]}/, log_io.string)
  end

  # Loses the connection once while recording outcomes: before the commit, or after it with the
  # answer lost (a failover), which the worker cannot tell apart.
  class LossyWorker < TaskerCore::Worker
    attr_accessor :lose

    private def record_and_claim(batch, items)
      if (mode = lose)
        self.lose = nil
        super if mode == :after_commit
        raise ActiveRecord::ConnectionNotEstablished, "server closed the connection unexpectedly"
      end
      super
    end
  end

  def test_an_outcome_whose_connection_was_lost_is_sent_again_and_applied_once
    name = template("lossy", [["only", "PlainHandler"]])
    %i[before_commit after_commit].each do |mode|
      log_io.truncate(0)
      log_io.rewind
      task_id = TaskerCore.create_task(namespace, name, {})
      w = LossyWorker.new(namespaces: [namespace], logger: Logger.new(log_io), poll_interval: 0.2)
      w.lose = mode
      run_until(w) { finished?(task_id) }

      assert_equal "complete", TaskerCore.task_status(task_id), mode
      assert_nil w.lose, "#{mode}: the loss happened"
      assert_match(/recording 1 outcomes: connection lost .*; sending again/, log_io.string)
      assert_equal mode == :after_commit, log_io.string.include?("no longer held"), "#{mode}: #{log_io.string}"
      step = steps_of(task_id)["only"]
      assert_equal 1, step["attempts"]
      assert_equal %w[pending>in_progress in_progress>complete], states(step["workflow_step_id"]), mode
    end
  end

  def test_a_retryable_failure_whose_connection_was_lost_is_not_sent_again
    name = template("lossyfail", [["charge", "FlakyGateway", [], { "handler_config" => { "retry_after" => 0 }, "default_retry_limit" => 3 }]])
    task_id = TaskerCore.create_task(namespace, name, {})
    w = LossyWorker.new(namespaces: [namespace], logger: Logger.new(log_io), poll_interval: 0.2, lease_seconds: 2)
    w.lose = :after_commit
    run_until(w) { finished?(task_id) }

    assert_nil w.lose
    assert_equal "complete", TaskerCore.task_status(task_id)
    assert_match(/a retryable failure is not sent again/, log_io.string)
    step = steps_of(task_id)["charge"]
    failures = step_transitions(step["workflow_step_id"]).count do |t|
      t["to_state"] == "error" && t["metadata"]["reason"] != "lease_expired"
    end
    assert_equal 1, failures, log_io.string # recorded once, by the first send
  end

  def test_a_listening_worker_picks_up_a_new_task_well_before_its_poll_interval
    name = template("wake", [["only", "PlainHandler"]])
    w = worker(poll_interval: 30)
    thread = Thread.new { w.run }
    sleep 0.5 # it claimed nothing and sleeps in LISTEN
    created = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    task_id = TaskerCore.create_task(namespace, name, {})
    sleep 0.01 until finished?(task_id) || Process.clock_gettime(Process::CLOCK_MONOTONIC) - created > 10
    latency = Process.clock_gettime(Process::CLOCK_MONOTONIC) - created

    assert_equal "complete", TaskerCore.task_status(task_id)
    assert_operator latency, :<, 1.0, "took #{latency.round(2)}s with a poll interval of 30s"
  ensure
    w.stop
    thread&.join
  end

  def test_retries_stop_at_the_retry_limit
    name = template("limited", [["charge", "FlakyGateway", [], { "handler_config" => { "retry_after" => 0 }, "default_retry_limit" => 1 }]])
    task_id = TaskerCore.create_task(namespace, name, {})
    run_until(worker) { finished?(task_id) }

    assert_equal "error", TaskerCore.task_status(task_id)
    assert_match(/attempt 1 failed: TaskerCore::RetryableError: gateway busy \(not retried\)/, log_io.string)
  end

  def test_the_worker_survives_losing_its_connections
    name = template("resilient", [["only", "PlainHandler"]])
    w = worker(poll_interval: 30)
    thread = Thread.new { w.run }
    sleep 0.5
    killed = conn.select_value(<<~SQL)
      SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
      WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'
    SQL
    assert_operator killed, :>=, 2, "the worker's claim and LISTEN connections"
    sleep 0.5
    task_id = TaskerCore.create_task(namespace, name, {})
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + 10
    sleep 0.02 until finished?(task_id) || Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline
    assert_equal "complete", TaskerCore.task_status(task_id)
    assert_match(/LISTEN connection lost/, log_io.string)
  ensure
    w.stop
    thread&.join
  end

  def test_create_task_takes_a_priority_and_a_later_start
    name = template("sched", [["only", "Sched::Only"]])
    later = Time.utc(2099, 1, 1, 12, 0, 0)
    scheduled = TaskerCore.create_task(namespace, name, {}, priority: 7, run_at: later)
    delayed = TaskerCore.create_task(namespace, name, {}, delay_seconds: 3600)
    urgent = TaskerCore.create_task(namespace, name, {}, priority: 9, initiator: "ruby")
    rows = conn.select_rows("SELECT task_id, priority, to_char(run_at, 'YYYY-MM-DD HH24:MI') FROM tasker_core.task_options " \
                            "WHERE task_id IN (#{[scheduled, delayed, urgent].join(", ")}) ORDER BY 1")
    assert_equal [[scheduled, 7, "2099-01-01 12:00"], [urgent, 9, nil]], rows.values_at(0, 2)
    assert_equal delayed, rows[1][0]
    # only the urgent task can start now
    claimed = TaskerCore::SQL.claim_steps("probe", namespaces: [namespace], max_steps: 10)
    assert_equal [urgent], claimed.map(&:task_id)
  end
end
