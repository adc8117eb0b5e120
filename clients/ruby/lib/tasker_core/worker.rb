require "active_support/inflector"
require "securerandom"
require "socket"
require "timeout"

module TaskerCore
  # Runs steps until stopped. It LISTENs on `tasker_ready` (falling back to a poll every
  # poll_interval), claims up to `concurrency` ready steps under a lease, runs each handler in
  # its own thread under a timeout while a heartbeat thread renews the leases every
  # lease_seconds / 3. A reporter thread records the outcomes in batches, one call at a time:
  # those that finish while one is recorded (or within flush_interval seconds) go in the next.
  # The call also claims steps for the slots the batch frees, in the same transaction
  # (report_and_claim, tasker_core 0.6.0; report_steps on 0.5.0; one complete_step or
  # fail_step each on older servers, or when a batch is refused).
  #
  # SIGTERM / SIGINT (or #stop, or `stop_when`) stop the claiming; running steps get
  # shutdown_timeout seconds to finish, the rest are given back with release_step (a second
  # signal skips the wait). #run then returns, so a script that calls it exits 0.
  #
  # Claims, heartbeats and outcomes go through ActiveRecord's connection pool (the step's thread
  # holds one connection while its handler runs: the handler's queries use it too), so the pool
  # needs concurrency + 3 connections. The LISTEN connection is a separate PG::Connection.
  class Worker
    CHANNEL = "tasker_ready"
    # SQLSTATEs (and classes) of a connection that failed rather than a statement: connection
    # exceptions, the server shutting down or not yet accepting, a read-only server
    CONNECTION_LOST = %w[08 57P01 57P02 57P03 25006].freeze
    Running = Struct.new(:step, :thread, :reporting, :killed)

    attr_reader :worker_id, :concurrency

    def initialize(namespaces: nil, concurrency: nil, lease_seconds: 60, step_timeout: 300,
                   poll_interval: 5, shutdown_timeout: 25, worker_id: nil, logger: nil, traceparent: nil,
                   flush_interval: 0,
                   executor: (Rails.application&.executor if defined?(Rails) && Rails.respond_to?(:application)))
      pool_size = TaskerCore.record_class.connection_pool.size
      @namespaces = namespaces && Array(namespaces).map(&:to_s)
      @concurrency = concurrency || [pool_size - 3, 1].max
      @flush_interval = Float(flush_interval)
      raise ArgumentError, "flush_interval must not be negative" if @flush_interval.negative?
      @lease_seconds = Integer(lease_seconds)
      @step_timeout = step_timeout
      @poll_interval = poll_interval
      @shutdown_timeout = shutdown_timeout
      raise ArgumentError, "traceparent must respond to call" unless traceparent.nil? || traceparent.respond_to?(:call)

      @traceparent = traceparent # -> the worker's current W3C traceparent (or nil), at each claim
      @worker_id = worker_id || "#{Socket.gethostname}:#{Process.pid}:#{SecureRandom.hex(3)}"
      @logger = logger || ActiveRecord::Base.logger || Logger.new($stderr, level: :info)
      @executor = executor # Rails: autoloading, reloading and the query cache are safe in step threads
      @running = {}
      @mutex = Mutex.new
      @outbox = [] # outcomes waiting for the reporter: [step, kind, value, seconds, reply queue]
      @outbox_cv = ConditionVariable.new
      @wake_r, @wake_w = IO.pipe
      @stopping = @force = false
      if @concurrency + 3 > pool_size
        log(:warn, "concurrency #{@concurrency} needs a connection pool of #{@concurrency + 3} (it has #{pool_size})")
      end
    end

    # Blocks until SIGTERM/SIGINT (when run on the main thread), #stop, or `stop_when`
    # (checked after every wake-up) returns true; then shuts down gracefully. A worker runs once.
    def run(stop_when: nil)
      traps = install_traps if Thread.current == Thread.main
      @batched = SQL.report_steps?
      @combined = SQL.report_and_claim?
      @reserved = 0 # slots of claims under way (guarded by @mutex)
      @reporter = Thread.new { reporter_loop }
      @heartbeat = Thread.new { heartbeat_loop }
      listen
      log(:info, "worker #{@worker_id} started (namespaces: #{@namespaces&.join(", ") || "all"}, concurrency: #{@concurrency})")
      begin
        until @stopping || stop_when&.call
          wait unless claim
        end
      ensure
        shutdown
        traps&.each { |sig, old| Signal.trap(sig, old || "DEFAULT") }
        @heartbeat_stop = true
        begin
          @heartbeat.wakeup
        rescue ThreadError # it already ended
          nil
        end
        @heartbeat.join
        @mutex.synchronize do
          @reporter_stop = true
          @outbox_cv.broadcast
        end
        @reporter.join
        close_listener
      end
    end

    # Stops the worker from any thread, also before #run began (a signal does the same).
    def stop
      @stopping = true
      wake
    end

    private

    # ---- the loop: claim, wait for a wake-up

    # Claims what there is room for; true when it got all it asked for (claim again at once).
    def claim
      free = reserve
      return false if free <= 0

      begin
        steps = SQL.claim_steps(@worker_id, namespaces: @namespaces, max_steps: free, lease_seconds: @lease_seconds,
                                            traceparent: @traceparent&.call)
      ensure
        unreserve(free)
      end
      steps.each { |step| start(step) }
      steps.size == free
    rescue ActiveRecord::ActiveRecordError, PG::Error => e
      log(:error, "claim failed: #{brief(e)}")
      TaskerCore.record_class.connection_pool.release_connection # verified again at the next checkout
      false
    end

    # Reserves the free slots for a claim (`finishing` steps are being reported by it).
    def reserve(finishing = 0)
      @mutex.synchronize do
        next 0 if @stopping

        free = [@concurrency - @running.size + finishing - @reserved, 0].max
        @reserved += free
        free
      end
    end

    def unreserve(count)
      @mutex.synchronize { @reserved -= count }
    end

    # Sleeps until a NOTIFY, a step of ours finished, a signal, the backoff of a step we failed
    # ran out, or the poll interval passed.
    def wait
      retry_at = @mutex.synchronize { @retry_at }
      timeout = retry_at ? [@poll_interval, retry_at - now].min : @poll_interval
      listen unless @listener
      ios = [@wake_r]
      ios << @listener.socket_io if @listener
      IO.select(ios, nil, nil, [timeout, 0].max)
      @wake_r.read_nonblock(4096, exception: false)
      @mutex.synchronize { @retry_at = nil if @retry_at && @retry_at <= now }
      nil while @listener&.wait_for_notify(0) { |channel, _pid, payload| log(:debug, "woken: #{channel} #{payload}") }
    rescue PG::Error, IOError => e
      log(:warn, "LISTEN connection lost (#{brief(e)}); reconnecting")
      close_listener
    end

    def listen
      config = TaskerCore.record_class.connection_db_config.configuration_hash.compact
      params = { application_name: "tasker_core listener" }
               .merge(config.transform_keys(username: :user, database: :dbname))
               .slice(*PG::Connection.conndefaults_hash.keys)
      @listener = PG.connect(params)
      @listener.set_notice_processor { |message| log(:debug, message.strip) }
      @listener.exec("LISTEN #{CHANNEL}")
    rescue PG::Error => e
      log(:warn, "cannot LISTEN (#{brief(e)}); polling every #{@poll_interval}s")
      close_listener
    end

    def close_listener
      @listener&.close
    rescue PG::Error
      nil
    ensure
      @listener = nil
    end

    def wake
      @wake_w.write_nonblock(".", exception: false)
    rescue IOError
      nil
    end

    def install_traps
      %w[TERM INT].to_h do |sig|
        # trap context: no mutexes (so no Logger) — set flags and wake the loop
        [sig, Signal.trap(sig) { @force = @stopping; @stopping = true; wake }]
      end
    end

    # ---- one step, in its own thread

    def start(step)
      entry = Running.new(step, nil, false, false)
      @mutex.synchronize do
        @running[step.step_id] = entry
        entry.thread = Thread.new { perform(entry) }
      end
    end

    def perform(entry)
      step = entry.step
      started = now
      outcome = wrapped do
        TaskerCore.record_class.connection_pool.with_connection do |conn|
          execute(step, conn)
        ensure
          conn.disconnect! if entry.killed # stopped mid-query: do not hand the session back as is
        end
      end
      entry.reporting = true
      report(step, *outcome, now - started)
    rescue StandardError => e
      log(:error, "step #{step.step_id}: #{e.class}: #{brief(e)}")
    ensure
      @mutex.synchronize { @running.delete(step.step_id) }
      wake
    end

    def wrapped(&block)
      @executor ? @executor.wrap(&block) : yield
    end

    # Runs the handler: [:complete, results] or [:fail, error].
    def execute(step, conn)
      handler = build_handler(step)
      limit = step.config["timeout_seconds"] if step.config.is_a?(Hash)
      limit = limit ? Float(limit) : @step_timeout
      started = now
      results = Timeout.timeout(limit) { handler.call(step) }
      results = {} if results.nil?
      JSON.generate(results) # not serializable: a failure of the handler, not of the worker
      [:complete, results]
    rescue Timeout::Error => e
      ours = limit && now - started >= limit
      return [:fail, e] unless ours # a Timeout::Error of the handler's own (Net::ReadTimeout, ...)

      conn.reconnect! # the handler may have been stopped in the middle of a query
      [:fail, StepTimeout.new("#{step.handler_class} ran longer than #{limit}s")]
    rescue StandardError, ScriptError => e # ScriptError: NotImplementedError, autoload failures
      [:fail, e]
    end

    def build_handler(step)
      klass = step.handler_class && ActiveSupport::Inflector.safe_constantize(step.handler_class)
      raise UnknownHandler, "handler_class #{step.handler_class.inspect} names no class" unless klass.is_a?(Class)

      raise UnknownHandler, "#{klass} does not respond to call(step)" unless klass.method_defined?(:call)

      klass.instance_method(:initialize).arity.zero? ? klass.new : klass.new(step.config)
    end

    def report(step, kind, value, seconds)
      what = "step #{step.step_id} #{step.task_name}/#{step.name} attempt #{step.attempt}"
      outcome, detail = @batched ? record_in_batch(step, kind, value) : record_one(step, kind, value)
      case outcome
      when :completed
        log(:info, "#{what} completed (#{(seconds * 1000).round} ms)")
      when :failed
        what = "#{what} failed: #{value.class}: #{value.message}"
        if detail
          @mutex.synchronize { @retry_at = [@retry_at, now + detail + 0.05].compact.min } # claim it when due
          log(:warn, "#{what} (retry in #{detail}s)")
        else
          log(:error, "#{what} (not retried)")
        end
      when :lease_lost
        log(:warn, "step #{step.step_id}: outcome not recorded, lease lost#{detail && ": #{detail}"}")
      when :no_longer_held # a resend after a lost connection: recorded by the first send, or the lease passed on
        log(:info, "step #{step.step_id}: outcome sent again after a lost connection; the step is no longer held " \
                   "(recorded by the first send, or its lease passed on)")
      when :not_resent # a retryable failure whose first send was cut off (see sendable?)
        log(:info, "step #{step.step_id}: a retryable failure is not sent again after a lost connection " \
                   "(its lease will expire and the step be retried)")
      else
        log(:error, "step #{step.step_id}: recording the outcome failed: #{detail}")
      end
    end

    def failure_args(value)
      [!value.is_a?(PermanentError), (value.retry_after if value.is_a?(RetryableError))]
    end

    # Records one outcome on its own: [:completed], [:failed, backoff or nil], [:lease_lost, why]
    # ([:no_longer_held] when it was sent again after a lost connection).
    def record_one(step, kind, value)
      resending("step #{step.step_id}: recording the outcome") do |resent|
        next [:not_resent] if resent && !sendable?(kind, value)

        wrapped do
          TaskerCore.record_class.connection_pool.with_connection do
            if kind == :complete
              SQL.complete_step(step.step_id, @worker_id, value)
              [:completed]
            else
              retryable, retry_after = failure_args(value)
              [:failed, SQL.fail_step(step.step_id, @worker_id, error_json(value), retryable: retryable, retry_after: retry_after)]
            end
          end
        end
      rescue LeaseLost => e
        resent ? [:no_longer_held] : [:lease_lost, e.message]
      end
    rescue StandardError => e
      [:error, brief(e)]
    end

    # Yields (resent) until the block returns. A lost connection (a failover, a restart) leaves
    # the call's outcome unknown: the block runs again on a new connection (resent = true) after
    # a short pause, for up to twice the lease (a minute at least), until the worker is forced
    # to stop or its shutdown's grace period is over; any other error is raised. What may be
    # sent again: see sendable?.
    def resending(what)
      give_up = now + [60.0, 2.0 * @lease_seconds].max
      resent = false
      begin
        yield resent
      rescue StandardError => e
        raise unless connection_lost?(e) && !@force && now < give_up && !(@shutdown_deadline && now > @shutdown_deadline)

        log(:warn, "#{what}: connection lost (#{brief(e)}); sending again")
        resent = true
        sleep([1.0, @poll_interval].min)
        retry
      end
    end

    # Whether an outcome whose first send was cut off may be sent again. A completion or a
    # permanent failure may: if the first send was recorded, the step is finished and no claim
    # can take it again, so the server refuses the resend (the lease is gone) and nothing
    # changes. A retryable failure may not: if its first send was recorded, the step may already
    # be claimed again by this worker (the claim half of that very call takes it when the
    # backoff is 0), and the resend would count as the new attempt's failure. Unsent, it is as
    # if the worker had died: the lease expires, the attempt counts, the step is retried.
    def sendable?(kind, value)
      kind == :complete || !failure_args(value).first
    end

    # The error says the connection failed, not the statement: none could be had, it broke, or
    # the server is shutting down or read-only (a failover under way).
    def connection_lost?(error)
      [error, error.cause].any? do |e|
        e.is_a?(ActiveRecord::ConnectionNotEstablished) || e.is_a?(PG::ConnectionBad) || e.is_a?(PG::UnableToSend)
      end || CONNECTION_LOST.any? { |state| SQL.sqlstate(error)&.start_with?(state) }
    end

    # Hands the outcome to the reporter thread and waits until it is recorded.
    def record_in_batch(step, kind, value)
      reply = Queue.new
      @mutex.synchronize do
        @outbox << [step, kind, value, reply]
        @outbox_cv.signal
      end
      reply.pop
    end

    def reporter_loop
      loop do
        stop = @mutex.synchronize do
          @outbox_cv.wait(@mutex, 0.5) while @outbox.empty? && !@reporter_stop
          @outbox.empty? && @reporter_stop
        end
        break if stop

        sleep(@flush_interval) if @flush_interval.positive?
        batch = @mutex.synchronize { @outbox.slice!(0..) }
        flush(batch)
      end
    end

    def flush(batch)
      resent = false
      rows = resending("recording #{batch.size} outcomes") do |again|
        resent = again
        sent = again ? batch.select { |_, kind, value, _| sendable?(kind, value) } : batch
        next [] if sent.empty?

        items = sent.map { |step, kind, value, _| outcome_item(step, kind, value) }
        wrapped { TaskerCore.record_class.connection_pool.with_connection { record_and_claim(sent, items) } }
      end
      by_id = rows.to_h { |r| [r["workflow_step_id"], r] }
      batch.each do |step, _, _, reply|
        row = by_id[step.step_id]
        next reply << [:not_resent] unless row # dropped from the resend (sendable?)

        outcome = row["outcome"].to_sym
        outcome = :no_longer_held if outcome == :lease_lost && resent
        reply << [outcome, outcome == :lease_lost ? "#{@worker_id} no longer holds step #{step.step_id}" : row["backoff_seconds"]]
      end
    rescue StandardError => e
      if connection_lost?(e)
        log(:error, "recording #{batch.size} outcomes gave up (#{brief(e)}): their steps run again when the leases expire")
        return batch.each { |_, _, _, reply| reply << [:error, brief(e)] }
      end
      # refused as a whole: one by one, so one bad outcome holds back no other
      log(:warn, "recording #{batch.size} outcomes failed (#{brief(e)}); recording them one by one")
      batch.each { |step, kind, value, reply| reply << record_one(step, kind, value) }
    end

    # One outcome as an element of report_steps' JSON array.
    def outcome_item(step, kind, value)
      return { "step_id" => step.step_id, "results" => value } if kind == :complete

      retryable, retry_after = failure_args(value)
      { "step_id" => step.step_id, "error" => error_json(value), "retryable" => retryable,
        "retry_after_seconds" => retry_after&.ceil }
    end

    # The batch's outcomes; with report_and_claim, also the next steps for the slots it frees
    # (started here). Returns the report's rows.
    def record_and_claim(batch, items)
      return SQL.report_steps(@worker_id, items) unless @combined

      free = reserve(batch.size)
      begin
        rows, steps = SQL.report_and_claim(@worker_id, items, namespaces: @namespaces, max_steps: free,
                                                              lease_seconds: @lease_seconds,
                                                              traceparent: (@traceparent&.call if free.positive?))
        steps.each { |step| start(step) }
      ensure
        unreserve(free)
      end
      rows
    end

    def error_json(error)
      { "message" => error.message, "error_class" => error.class.name,
        "backtrace" => Array(error.backtrace).first(10) }
    end

    # ---- leases

    def heartbeat_loop
      until @heartbeat_stop
        sleep(@lease_seconds / 3.0)
        entries = @mutex.synchronize { @running.values.reject(&:reporting) }
        next if @heartbeat_stop || entries.empty?

        begin
          TaskerCore.record_class.connection_pool.with_connection { entries.each { |entry| heartbeat(entry) } }
        rescue StandardError => e
          log(:error, "heartbeat failed: #{brief(e)}")
        end
      end
    end

    def heartbeat(entry)
      SQL.heartbeat(entry.step.step_id, @worker_id)
    rescue LeaseLost => e
      log(:warn, "step #{entry.step.step_id}: #{e.message}") if @mutex.synchronize { @running[entry.step.step_id] && !entry.reporting }
    end

    # ---- shutdown

    def shutdown
      deadline = @shutdown_deadline = now + @shutdown_timeout
      left = @mutex.synchronize { @running.size }
      log(:info, "stopping: #{left} running step(s), waiting up to #{@shutdown_timeout}s") if left.positive?
      while @mutex.synchronize { @running.any? } && !@force && now < deadline
        IO.select([@wake_r], nil, nil, [deadline - now, 0].max) # woken by finishing steps and signals
        @wake_r.read_nonblock(4096, exception: false)
      end
      @mutex.synchronize { @running.values }.each { |entry| give_back(entry) }
    end

    def give_back(entry)
      # recording its outcome: let it (a resend gives up once the grace period is over)
      return if entry.reporting && entry.thread.join(5)

      entry.killed = true
      entry.thread.kill
      entry.thread.join(5)
      SQL.release_step(entry.step.step_id, @worker_id)
      log(:warn, "released step #{entry.step.step_id} #{entry.step.task_name}/#{entry.step.name}")
    rescue LeaseLost => e
      log(:warn, "step #{entry.step.step_id} not released: #{e.message}")
    rescue StandardError => e
      log(:error, "step #{entry.step.step_id} not released: #{brief(e)}")
    end

    def now
      Process.clock_gettime(Process::CLOCK_MONOTONIC)
    end

    def brief(error)
      error.message.lines.first&.strip
    end

    def log(level, message)
      @logger.public_send(level, "tasker_core: #{message}")
    end
  end
end
