//! `#[pg_test]`s: the SQL surface, inside a transaction that is rolled back.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn relation_count(schema: &str) -> i64 {
        Spi::get_one_with_args::<i64>(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1",
            &[schema.into()],
        )
        .unwrap()
        .unwrap()
    }

    #[pg_test]
    fn install_schema_creates_then_is_a_noop() {
        assert_eq!(
            Spi::get_one::<bool>("SELECT tasker_core.install_schema('tk_test', 'rails')").unwrap(),
            Some(true)
        );
        let after_first = relation_count("tk_test");
        // 13 tables, their sequences, indexes and the view.
        assert!(after_first > 100, "only {after_first} relations created");
        assert_eq!(
            Spi::get_one::<bool>("SELECT tasker_core.install_schema('tk_test', 'rails')").unwrap(),
            Some(false)
        );
        assert_eq!(relation_count("tk_test"), after_first);
    }

    #[pg_test]
    fn install_schema_defaults_to_public() {
        Spi::run("SELECT tasker_core.install_schema()").unwrap();
        assert_eq!(
            Spi::get_one::<bool>("SELECT to_regclass('public.tasker_tasks') IS NOT NULL").unwrap(),
            Some(true)
        );
    }

    #[pg_test(error = "invalid schema name \"pg_nope\": it is reserved for the system")]
    fn install_schema_rejects_system_names() {
        Spi::run("SELECT tasker_core.install_schema('pg_nope')").unwrap();
    }

    #[pg_test]
    fn task_steps_orders_by_level() {
        Spi::run("SELECT tasker_core.install_schema('public')").unwrap();
        Spi::run(include_str!("../demo/sample_workflow.sql")).unwrap();
        let names = Spi::get_one::<String>(
            "SELECT string_agg(name || ':' || dependency_level, ',' ORDER BY dependency_level, workflow_step_id) \
             FROM tasker_core.task_steps((SELECT max(task_id) FROM public.tasker_tasks))",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            names,
            "validate_order:0,reserve_inventory:1,charge_payment:1,pack_items:1,ship_order:2,notify_customer:3"
        );
    }

    #[pg_test(error = "task -1 not found")]
    fn task_steps_unknown_task() {
        Spi::run("SELECT tasker_core.install_schema('public')").unwrap();
        Spi::run("SELECT * FROM tasker_core.task_steps(-1)").unwrap();
    }
}
