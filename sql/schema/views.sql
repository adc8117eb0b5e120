-- tasker_step_dag_relationships: one row per workflow step with its parents, children and
-- shortest depth from a root. Same columns and values as the Rails view; the depth walk uses
-- UNION (one row per step and depth) instead of enumerating every path, and keeps the Rails
-- cap of 50 levels.
CREATE VIEW @schema@.tasker_step_dag_relationships AS
SELECT ws.workflow_step_id,
       ws.task_id,
       ws.named_step_id,
       COALESCE(parents.ids, '[]'::jsonb) AS parent_step_ids,
       COALESCE(children.ids, '[]'::jsonb) AS child_step_ids,
       COALESCE(parents.n, 0::bigint) AS parent_count,
       COALESCE(children.n, 0::bigint) AS child_count,
       COALESCE(parents.n, 0::bigint) = 0 AS is_root_step,
       COALESCE(children.n, 0::bigint) = 0 AS is_leaf_step,
       depth.min_depth_from_root
FROM @schema@.tasker_workflow_steps ws
LEFT JOIN (SELECT e.to_step_id AS step_id,
                  jsonb_agg(e.from_step_id ORDER BY e.from_step_id) AS ids,
                  count(*) AS n
           FROM @schema@.tasker_workflow_step_edges e
           GROUP BY e.to_step_id) parents ON parents.step_id = ws.workflow_step_id
LEFT JOIN (SELECT e.from_step_id AS step_id,
                  jsonb_agg(e.to_step_id ORDER BY e.to_step_id) AS ids,
                  count(*) AS n
           FROM @schema@.tasker_workflow_step_edges e
           GROUP BY e.from_step_id) children ON children.step_id = ws.workflow_step_id
LEFT JOIN (WITH RECURSIVE walk(step_id, d) AS (
               SELECT r.workflow_step_id, 0
               FROM @schema@.tasker_workflow_steps r
               WHERE NOT EXISTS (SELECT 1 FROM @schema@.tasker_workflow_step_edges e
                                 WHERE e.to_step_id = r.workflow_step_id)
             UNION
               SELECT e.to_step_id, w.d + 1
               FROM walk w
               JOIN @schema@.tasker_workflow_step_edges e ON e.from_step_id = w.step_id
               WHERE w.d < 50)
           SELECT step_id, min(d) AS min_depth_from_root
           FROM walk GROUP BY step_id) depth ON depth.step_id = ws.workflow_step_id;
