"""A worker process for the SIGTERM tests: python proc_worker.py CONNINFO WORKER_ID SLEEP GRACE.

Its one handler, Slow::Step, prints "started <step_id>" and sleeps SLEEP seconds.
"""
import logging
import sys
import time

from tasker_worker import Worker

conninfo, worker_id, sleep, grace = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
worker = Worker(conninfo, worker_id=worker_id, lease_seconds=30, poll_interval=0.2, grace_period=grace)


@worker.handler("Slow::Step")
def slow(step):
    print(f"started {step.step_id}", flush=True)
    time.sleep(sleep)
    return {"slept": sleep, "by": worker_id}


worker.run()
print("exited", flush=True)
