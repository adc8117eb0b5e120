module TaskerCore
  class Error < StandardError; end

  # Raise from a handler for a failure worth retrying. `retry_after:` (seconds) overrides the
  # server's exponential backoff (the server caps it at 300 s).
  class RetryableError < Error
    attr_reader :retry_after

    def initialize(message = nil, retry_after: nil)
      super(message)
      @retry_after = retry_after
    end
  end

  # Raise from a handler for a failure that retrying cannot fix: the step is not retried and
  # its task ends in error.
  class PermanentError < Error; end

  # The step's handler_class names no class (or not a handler): a permanent failure.
  class UnknownHandler < PermanentError; end

  # The handler ran longer than its timeout: a retryable failure.
  class StepTimeout < RetryableError; end

  # SQLSTATE TK030: the worker no longer holds the step's lease (it expired, or an operator
  # resolved or cancelled the step), so its completion or failure was not recorded.
  class LeaseLost < Error; end
end
