-- Roll back the switch-over: restore the saved function and view definitions, drop the
-- triggers and the maintained state. The extension itself stays installed (DROP EXTENSION
-- tasker_core afterwards if it is no longer wanted; it never touches the Tasker tables).
BEGIN;
SELECT tasker_core.switch_back();
COMMIT;
