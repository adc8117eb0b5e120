"""A benchmark worker: python py_worker.py WORKER_ID (connection from the PG* environment).
Handlers: Noop (returns {}), Stamp (returns the wall time it ended), Measure (returns the
milliseconds since its parent's Stamp ended)."""
import sys
import time

from tasker_worker import Worker

worker = Worker("", worker_id=sys.argv[1], batch_size=4, poll_interval=1.0)
worker.handler("Noop")(lambda step: {})
worker.handler("Stamp")(lambda step: {"t": time.time()})
worker.handler("Measure")(lambda step: {"latency_ms": (time.time() - step.parent_results["first"]["t"]) * 1000})
print("ready", flush=True)
worker.run()
