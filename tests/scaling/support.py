"""What the tests under tests/scaling share."""
import time


def wait_until(predicate, seconds, what):
    """Polls `predicate` every 0.1 s until it is true; fails after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")
