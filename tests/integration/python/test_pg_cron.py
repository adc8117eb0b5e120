"""The recurring-task recipe with the real pg_cron (Debian's postgresql-15-cron): a cluster of
its own with pg_cron preloaded, two jobs running the README's command on the same minute — as
a scheduler that fires twice would — and one task for that minute. pg_cron 1.4 schedules by
the minute: the test waits for the next minute's runs (up to about 70 s)."""
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import psycopg
import pytest

from test_scheduling import RECIPE, TEMPLATE

ROOT = Path(os.environ.get("TASKER_ROOT", Path(__file__).resolve().parents[3]))


def pg_cron_installed():
    sharedir = subprocess.run(["pg_config", "--sharedir"], capture_output=True, text=True).stdout.strip()
    return (Path(sharedir) / "extension" / "pg_cron.control").exists()


@pytest.mark.skipif(not pg_cron_installed(), reason="pg_cron is not installed (make test installs it)")
def test_two_schedulers_firing_on_one_minute_create_one_task():
    cluster_dir = ROOT / "target" / "cron-cluster"
    env = dict(os.environ, TASKER_CLUSTER_DIR=str(cluster_dir),
               TASKER_PG_OPTS="-c shared_preload_libraries=pg_cron -c cron.database_name=postgres "
                              "-c cron.use_background_workers=on -c max_worker_processes=16 "
                              "-c cron.timezone=UTC")
    subprocess.run([ROOT / "scripts" / "cluster.sh", "stop"], env=env, capture_output=True)
    shutil.rmtree(cluster_dir, ignore_errors=True)
    subprocess.run([ROOT / "scripts" / "cluster.sh", "start"], env=env, check=True, capture_output=True)
    try:
        port = (cluster_dir / "port").read_text().strip()
        conninfo = dict(host="127.0.0.1", port=port, user="postgres", autocommit=True)
        with psycopg.connect(dbname="postgres", **conninfo) as admin:
            admin.execute("CREATE DATABASE cron_app")
            admin.execute("CREATE EXTENSION pg_cron")
        with psycopg.connect(dbname="cron_app", **conninfo) as app:
            app.execute("CREATE EXTENSION tasker_core")
            app.execute("SELECT tasker_core.install_schema()")
            app.execute("SELECT tasker_core.enable_tracking()")
            app.execute("SELECT tasker_core.register_task_template(%s::jsonb)", (json.dumps(TEMPLATE),))
        with psycopg.connect(dbname="postgres", **conninfo) as admin:
            for job in ("sched-a", "sched-b"):
                admin.execute("SELECT cron.schedule_in_database(%s, '* * * * *', %s, 'cron_app')", (job, RECIPE))
            deadline = time.time() + 75
            runs = []
            while time.time() < deadline:
                runs = admin.execute("SELECT status, return_message FROM cron.job_run_details "
                                     "WHERE status IN ('succeeded', 'failed')").fetchall()
                if len(runs) >= 2:
                    break
                time.sleep(0.5)
            assert len(runs) >= 2, f"pg_cron ran {runs} in 75 s"
            assert all(status == "succeeded" for status, _ in runs), runs
            minutes = admin.execute("SELECT count(DISTINCT date_trunc('minute', start_time)) "
                                    "FROM cron.job_run_details WHERE status = 'succeeded'").fetchone()[0]
            admin.execute("SELECT cron.unschedule(j) FROM unnest(ARRAY['sched-a', 'sched-b']) j")
        with psycopg.connect(dbname="cron_app", **conninfo) as app:
            tasks = app.execute("SELECT count(*) FROM tasker_tasks").fetchone()[0]
        # two runs a minute, one task a minute
        assert len(runs) > minutes and tasks == minutes, (runs, minutes, tasks)
    finally:
        subprocess.run([ROOT / "scripts" / "cluster.sh", "stop"], env=env, capture_output=True)
