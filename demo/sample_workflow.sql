-- A sample order-fulfilment workflow written with plain INSERTs into the Tasker tables, the
-- way a Rails app's models would write it: one task of six steps with a fan-out and a fan-in.
--
--   validate_order -> { reserve_inventory, charge_payment, pack_items } -> ship_order -> notify_customer
--
-- Safe to run more than once: definitions are reused, and each run adds one new task.
-- Tables are resolved through search_path (public by default).

INSERT INTO tasker_task_namespaces (name, description, created_at, updated_at)
VALUES ('fulfilment', 'order fulfilment workflows', now(), now())
ON CONFLICT (name) DO NOTHING;

INSERT INTO tasker_dependent_systems (name, description, created_at, updated_at)
VALUES ('shop', 'the shop backend', now(), now())
ON CONFLICT (name) DO NOTHING;

INSERT INTO tasker_named_tasks (name, description, task_namespace_id, version, configuration, created_at, updated_at)
SELECT 'process_order', 'validate, reserve, charge, pack, ship, notify', ns.task_namespace_id, '1.0.0', '{}'::jsonb, now(), now()
FROM tasker_task_namespaces ns WHERE ns.name = 'fulfilment'
ON CONFLICT (task_namespace_id, name, version) DO NOTHING;

INSERT INTO tasker_named_steps (dependent_system_id, name, description, created_at, updated_at)
SELECT ds.dependent_system_id, s.name, s.name, now(), now()
FROM tasker_dependent_systems ds
CROSS JOIN (VALUES ('validate_order'), ('reserve_inventory'), ('charge_payment'),
                   ('pack_items'), ('ship_order'), ('notify_customer')) AS s(name)
WHERE ds.name = 'shop'
ON CONFLICT (dependent_system_id, name) DO NOTHING;

INSERT INTO tasker_named_tasks_named_steps (named_task_id, named_step_id, created_at, updated_at)
SELECT nt.named_task_id, nst.named_step_id, now(), now()
FROM tasker_named_tasks nt
JOIN tasker_named_steps nst ON nst.name IN ('validate_order', 'reserve_inventory', 'charge_payment',
                                            'pack_items', 'ship_order', 'notify_customer')
WHERE nt.name = 'process_order' AND nt.version = '1.0.0'
ON CONFLICT (named_task_id, named_step_id) DO NOTHING;

WITH task AS (
    INSERT INTO tasker_tasks (named_task_id, requested_at, initiator, source_system, reason,
                              bypass_steps, tags, context, identity_hash, created_at, updated_at)
    SELECT nt.named_task_id, now(), 'demo', 'psql', 'sample workflow', '[]', '["demo"]',
           '{"order_id": 1001, "items": 3}', md5(random()::text || clock_timestamp()::text), now(), now()
    FROM tasker_named_tasks nt WHERE nt.name = 'process_order' AND nt.version = '1.0.0'
    RETURNING task_id, context
), steps AS (
    INSERT INTO tasker_workflow_steps (task_id, named_step_id, retryable, retry_limit, attempts,
                                       inputs, results, created_at, updated_at)
    SELECT task.task_id, nst.named_step_id, true, 3, 0, task.context, '{}', now(), now()
    FROM task CROSS JOIN tasker_named_steps nst
    WHERE nst.name IN ('validate_order', 'reserve_inventory', 'charge_payment',
                       'pack_items', 'ship_order', 'notify_customer')
    ORDER BY nst.named_step_id
    RETURNING workflow_step_id, named_step_id
), named AS (
    SELECT steps.workflow_step_id, nst.name FROM steps JOIN tasker_named_steps nst USING (named_step_id)
)
INSERT INTO tasker_workflow_step_edges (from_step_id, to_step_id, name, created_at, updated_at)
SELECT p.workflow_step_id, c.workflow_step_id, 'provides', now(), now()
FROM (VALUES ('validate_order', 'reserve_inventory'), ('validate_order', 'charge_payment'),
             ('validate_order', 'pack_items'), ('reserve_inventory', 'ship_order'),
             ('charge_payment', 'ship_order'), ('pack_items', 'ship_order'),
             ('ship_order', 'notify_customer')) AS e(parent, child)
JOIN named p ON p.name = e.parent
JOIN named c ON c.name = e.child;
