"""A pg_auto_failover formation on this machine: a monitor, a primary and a synchronous
secondary, each a PostgreSQL cluster of its own (own port and data directory under
target/failover/), run by the packaged `pg_autoctl` as the postgres user when we are root.

Each node's `pg_autoctl run` is started in a session of its own, so `kill_hard` can SIGKILL the
keeper, its postgres and every backend at once: the machine is gone, as far as the others see.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

from support import wait_until

# The monitor's failure detection, shortened for a test (defaults: a health check every 5 s,
# a node unhealthy after 20 s, a demoted primary awaited 30 s): promotion in seconds, with room
# for a loaded 2-core machine (a spurious "unhealthy" would turn synchronous replication off).
FAST_DETECTION = {
    "pgautofailover.health_check_period": 1000,
    "pgautofailover.health_check_timeout": 2000,
    "pgautofailover.health_check_max_retries": 2,
    "pgautofailover.health_check_retry_delay": 500,
    "pgautofailover.node_considered_unhealthy_timeout": 5000,
    "pgautofailover.startup_grace_period": 2000,
    "pgautofailover.primary_demote_timeout": 5000,
}


def free_ports(n: int) -> list:
    """n distinct free ports (the sockets held open together, so none is picked twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Formation:
    def __init__(self, base: Path, dbname: str = "app"):
        self.base, self.dbname = base, dbname
        self.root = os.geteuid() == 0
        self.ports = {}
        self.procs = {}

    # ------------------------------------------------------------------ processes
    def _env(self):
        # not the integration cluster's PGHOST/PGPORT/... (run.sh exports them): pg_autoctl reads them
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        # its configuration, state and pid files under base (the pid files default to /tmp,
        # where a stale one from an earlier run would say "already running")
        return dict(env, PG_CONFIG=shutil.which("pg_config") or "pg_config",
                    XDG_CONFIG_HOME=str(self.base / "config"), XDG_DATA_HOME=str(self.base / "state"),
                    XDG_RUNTIME_DIR=str(self.base / "run"))

    def _argv(self, args):
        return ["runuser", "-u", "postgres", "--", *args] if self.root else list(args)

    def autoctl(self, *args, check=True):
        r = subprocess.run(self._argv(["pg_autoctl", *args]), env=self._env(), capture_output=True, text=True)
        if check and r.returncode != 0:
            raise RuntimeError(f"pg_autoctl {' '.join(args)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
        return r

    def _run(self, name):
        log = open(self.base / f"{name}.log", "a")
        self.procs[name] = subprocess.Popen(self._argv(["pg_autoctl", "run", "--pgdata", str(self.base / name)]),
                                            env=self._env(), stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def pgdata(self, name):
        return str(self.base / name)

    # ------------------------------------------------------------------ set-up
    def create(self):
        self.destroy()
        (self.base / "run").mkdir(parents=True)
        if self.root:
            shutil.chown(self.base, "postgres", "postgres")
            shutil.chown(self.base / "run", "postgres", "postgres")
            probe = subprocess.run(["runuser", "-u", "postgres", "--", "test", "-w", str(self.base)])
            if probe.returncode != 0:
                raise RuntimeError(f"the postgres user cannot write {self.base}: a parent directory is closed to it")
        self.ports = dict(zip(("monitor", "node1", "node2"), free_ports(3)))
        self.autoctl("create", "monitor", "--pgdata", self.pgdata("monitor"), "--pgport", str(self.ports["monitor"]),
                     "--hostname", "127.0.0.1", "--auth", "trust", "--no-ssl")
        self._run("monitor")
        wait_until(lambda: self._try("monitor", "pg_auto_failover", "SELECT 1"), 60, "the monitor to accept connections")
        with self.connect("monitor", "pg_auto_failover") as m:
            # FO_DEFAULT_DETECTION=1 keeps pg_auto_failover's defaults (to measure them)
            for name, value in ({} if os.environ.get("FO_DEFAULT_DETECTION") == "1" else FAST_DETECTION).items():
                m.execute(f"ALTER SYSTEM SET {name} = {int(value)}")
            m.execute("SELECT pg_reload_conf()")
        monitor = f"postgres://autoctl_node@127.0.0.1:{self.ports['monitor']}/pg_auto_failover?sslmode=disable"
        for node in ("node1", "node2"):  # node1 becomes the primary: it registers first
            self.autoctl("create", "postgres", "--pgdata", self.pgdata(node), "--pgport", str(self.ports[node]),
                         "--hostname", "127.0.0.1", "--listen", "127.0.0.1", "--auth", "trust", "--no-ssl",
                         "--monitor", monitor, "--dbname", self.dbname, "--name", node)
            self._run(node)
            if node == "node1":  # alone in the formation, it is "single" until a secondary joins
                wait_until(lambda: self.states().get("node1") == ("single", "single"), 90, "node1 to run")
        wait_until(lambda: self.states() == {"node1": ("primary", "primary"), "node2": ("secondary", "secondary")},
                   90, "node1 primary and node2 its secondary")

    def states(self):
        """{node name: (reported state, assigned state)} from the monitor."""
        try:
            with self.connect("monitor", "pg_auto_failover") as m:
                rows = m.execute("SELECT nodename, reportedstate::text, goalstate::text FROM pgautofailover.node").fetchall()
        except Exception:
            return {}
        return {n: (r, g) for n, r, g in rows}

    # ------------------------------------------------------------------ connections
    def conninfo(self, nodes=("node1", "node2"), **extra):
        """A multi-host connection string: libpq tries the hosts in turn and keeps the first that
        is read-write (the primary, wherever it is now)."""
        hosts = ",".join("127.0.0.1" for _ in nodes)
        ports = ",".join(str(self.ports[n]) for n in nodes)
        params = dict(host=hosts, port=ports, user="postgres", dbname=self.dbname,
                      target_session_attrs="read-write", connect_timeout=2, **extra)
        return " ".join(f"{k}={v}" for k, v in params.items())

    def connect(self, node, dbname=None):
        import psycopg
        return psycopg.connect(host="127.0.0.1", port=self.ports[node], user="postgres",
                               dbname=dbname or self.dbname, autocommit=True, connect_timeout=2)

    def _try(self, node, dbname, sql):
        try:
            with self.connect(node, dbname) as c:
                return c.execute(sql).fetchone()[0]
        except Exception:
            return None

    def writable(self, node):
        return self._try(node, self.dbname, "SELECT NOT pg_is_in_recovery() AND "
                         "current_setting('default_transaction_read_only') = 'off'") is True

    # ------------------------------------------------------------------ failure and tear-down
    def kill_hard(self, node):
        """SIGKILL to the node's keeper, its postgres and every backend (one session)."""
        os.killpg(self.procs[node].pid, signal.SIGKILL)
        self.procs[node].wait()

    def destroy(self):
        # An immediate stop first: PostgreSQL's processes are each a session of their own, and
        # the monitor's health-check worker does not exit when its postmaster is killed.
        for name in sorted(self.procs, key=lambda n: n == "monitor"):
            proc = self.procs[name]
            if proc.poll() is None:
                self.autoctl("stop", "--pgdata", self.pgdata(name), "--immediate", check=False)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        self.procs.clear()
        # a previous run's leftovers (a crashed test): their postmaster.pid names the postmaster,
        # killed with its keeper's session only if that pid is still a postgres of this directory
        for pid_file in self.base.glob("*/postmaster.pid") if self.base.exists() else []:
            try:
                pid = int(pid_file.read_text().split()[0])
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                if "postgres" in cmdline and str(pid_file.parent) in cmdline:
                    os.killpg(os.getpgid(pid), signal.SIGKILL)
            except (ValueError, OSError, IndexError):
                pass
        shutil.rmtree(self.base, ignore_errors=True)

    def describe(self):
        return json.dumps(self.states())
