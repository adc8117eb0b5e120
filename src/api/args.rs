//! Checks of the arguments the SQL functions share: required values, ranges, worker ids,
//! trace contexts.

use crate::core::error::TaskerError;

pub(crate) fn required<T>(v: Option<T>, argument: &'static str) -> Result<T, TaskerError> {
    v.ok_or(TaskerError::NullArgument { argument })
}

/// A template's namespace and name, both required.
pub(crate) fn template_name(
    namespace: Option<String>,
    name: Option<String>,
) -> Result<(String, String), TaskerError> {
    Ok((required(namespace, "namespace")?, required(name, "name")?))
}

pub(crate) fn bounded(
    argument: &'static str,
    v: i32,
    min: i32,
    max: i32,
) -> Result<i32, TaskerError> {
    if (min..=max).contains(&v) {
        Ok(v)
    } else {
        Err(TaskerError::InvalidArgument {
            argument,
            reason: format!("{v} is outside {min}..={max}"),
        })
    }
}

pub(crate) fn worker_id(raw: Option<String>) -> Result<String, TaskerError> {
    let w = required(raw, "worker_id")?;
    if w.is_empty() || w.chars().count() > 200 || w.chars().any(char::is_control) {
        return Err(TaskerError::InvalidArgument {
            argument: "worker_id",
            reason: "expected 1 to 200 printable characters".into(),
        });
    }
    Ok(w)
}

/// `t` if it is a W3C trace context value (`version-traceid-parentid-flags`), else 22023.
pub(crate) fn valid_traceparent(argument: &'static str, t: String) -> Result<String, TaskerError> {
    if crate::core::ident::is_traceparent(&t) {
        Ok(t)
    } else {
        Err(TaskerError::InvalidArgument {
            argument,
            reason: "traceparent must be a W3C trace context value like \
                     00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .into(),
        })
    }
}
