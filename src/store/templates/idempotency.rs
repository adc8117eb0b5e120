//! Idempotency identities of tasks: the identity hashed now, and the lookup of identities
//! hashed before 0.4.0.

use crate::core::error::TaskerError;
use crate::core::ident::SchemaName;
use crate::store::plans::{one_value, with_plan, INT4, TEXT};
use crate::store::spi;
use pgrx::spi::SpiClient;

/// What a task's idempotency identity hashes: the namespace and the task name, each
/// prefixed by its length in bytes, then the key. Length prefixes make the encoding
/// unambiguous whatever the names hold; keys span the versions of a template, as before.
pub(super) fn identity_input(namespace: &str, name: &str, key: &str) -> String {
    format!("{}:{namespace}{}:{name}{key}", namespace.len(), name.len())
}

/// The SQL expression of a task's idempotency identity (`tasker_tasks.identity_hash`):
/// `idempotency:` and the hex SHA-256 of [`identity_input`] in UTF-8; NULL for a NULL input.
pub(super) fn identity_sql(input: &str) -> String {
    format!(
        "('idempotency:' || pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to({input}::text, 'UTF8')), 'hex'))"
    )
}

/// The task that `key` was given to before 0.4.0, if any. Identities then hashed
/// `namespace \x1f name \x1f key` (FNV-1a, 128 bits), which names containing `\x1f` made
/// ambiguous, and the key is not stored, so an upgrade cannot recompute them: create_task
/// looks them up as they are, among the tasks of the same namespace and name only, so a key
/// used before the upgrade still returns its task and no other template's task can answer.
pub(super) fn legacy_keyed_task(
    client: &SpiClient<'_>,
    schema: &SchemaName,
    named_task_id: i32,
    namespace: &str,
    name: &str,
    key: &str,
) -> Result<Option<i64>, TaskerError> {
    let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
    for b in format!("{namespace}\u{1f}{name}\u{1f}{key}").bytes() {
        h ^= b as u128;
        h = h.wrapping_mul(0x0000000001000000000000000000013B);
    }
    let legacy = format!("idempotency:{h:032x}");
    let q = schema.quoted();
    with_plan(
        client,
        "task_by_legacy_identity",
        schema.as_str(),
        &[TEXT, INT4],
        || {
            format!(
                "SELECT t.task_id FROM {q}.tasker_tasks t
                 JOIN {q}.tasker_named_tasks nt ON nt.named_task_id = t.named_task_id
                 JOIN {q}.tasker_named_tasks mine ON mine.task_namespace_id = nt.task_namespace_id
                                                 AND mine.name = nt.name
                 WHERE t.identity_hash = $1 AND mine.named_task_id = $2"
            )
        },
        |stmt| one_value::<i64>(client, stmt, &[legacy.as_str().into(), named_task_id.into()]),
    )
    .map_err(spi)
}
