"""The Python worker of the failover test: the unchanged client (clients/python) over the
formation's multi-host connection string. Each handler run appends "step_id attempt" to the
file named by FO_RUNS before it returns, so the test can count how often every step ran."""
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "clients" / "python"))
from tasker_worker import Worker  # noqa: E402

logging.basicConfig(level=logging.INFO, format="%(asctime)s python %(levelname)s %(message)s")
NAME = os.environ.get("FO_NAME", "python")
RUNS = os.environ["FO_RUNS"]
worker = Worker(os.environ["FO_CONNINFO"], worker_id=NAME, namespaces=["failover"], batch_size=4,
                lease_seconds=int(os.environ.get("FO_LEASE", "20")), poll_interval=0.5)


@worker.handler("FO::Work")
def work(step):
    time.sleep(0.02)
    with open(RUNS, "a") as f:
        f.write(f"{step.step_id} {step.attempt}\n")
    return {"by": NAME}


worker.run()
