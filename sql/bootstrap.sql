-- tasker_core bootstrap: objects owned by the extension that are plain SQL.
-- The Tasker data tables are NOT created here: they belong to the application and are
-- created by Rails migrations or by tasker_core.install_schema().

COMMENT ON SCHEMA tasker_core IS
  'tasker_core: the Tasker workflow engine core (readiness, DAG analysis, transitions, events)';
