"""tasker_worker: run tasker_core workflow steps from Python (psycopg 3, nothing else).

    from tasker_worker import Worker, RetryableError, PermanentError

    worker = Worker("dbname=app", namespaces=["mail"])

    @worker.handler("Mail::Send")
    def send(step):
        return {"message_id": deliver(step.inputs["user_id"])}

    worker.run()   # until SIGTERM / SIGINT / worker.stop()
"""
from .worker import PermanentError, RetryableError, Step, Worker, create_task

__all__ = ["Worker", "Step", "RetryableError", "PermanentError", "create_task"]
__version__ = "0.1.0"

# Error classes are recorded by name in the step's error; name them by the public module.
RetryableError.__module__ = PermanentError.__module__ = __name__
