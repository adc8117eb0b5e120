-- Run once before the regression tests: the extension, the Tasker tables in public, tracking.
CREATE EXTENSION tasker_core;
SELECT tasker_core.install_schema();
SELECT tasker_core.enable_tracking();
