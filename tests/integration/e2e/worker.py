"""The Python worker of the end-to-end test (clients/python). Handlers behave the same in every
language: Work sleeps a little and returns who ran it; Flaky fails its first attempt (retry
after 1 s); Fatal fails permanently when the task is doomed; Join checks its parents' results.
E2E_SLOW=1 makes every step take 300 ms (the worker the test kills mid-step)."""
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "clients" / "python"))
from tasker_worker import PermanentError, RetryableError, Worker  # noqa: E402

NAME = "python"
SLOW = os.environ.get("E2E_SLOW") == "1"
worker = Worker(worker_id=NAME, namespaces=["e2e"], batch_size=4, lease_seconds=3, poll_interval=0.5)


def work(step):
    time.sleep(0.3 if SLOW else random.uniform(0.01, 0.04))
    return {"by": NAME, "step": step.name, "n": step.inputs["n"], "tp": step.traceparent}


@worker.handler("E2E::Work")
def plain(step):
    return work(step)


@worker.handler("E2E::Flaky")
def flaky(step):
    if step.attempt == 1:
        raise RetryableError("flaky on its first attempt", retry_after=1)
    return work(step)


@worker.handler("E2E::Fatal")
def fatal(step):
    if step.inputs.get("doomed"):
        raise PermanentError("this task is doomed")
    return work(step)


@worker.handler("E2E::Join")
def join(step):
    return dict(work(step), parents=sorted(step.parent_results))


worker.run()
