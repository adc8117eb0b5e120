//! SQL identifiers that come from callers (schema names): validated, then quoted.

use super::error::TaskerError;

/// PostgreSQL's identifier limit (NAMEDATALEN - 1) in bytes.
pub const MAX_IDENTIFIER_BYTES: usize = 63;

/// A schema name accepted from a caller, safe to splice into SQL once quoted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaName(String);

impl SchemaName {
    /// Validates a schema name: non-empty, at most 63 bytes, no NUL byte, not a `pg_` system
    /// schema name. Any other character is allowed because the name is always quoted.
    pub fn parse(raw: &str) -> Result<SchemaName, TaskerError> {
        let reason = if raw.is_empty() {
            Some("it is empty")
        } else if raw.len() > MAX_IDENTIFIER_BYTES {
            Some("it is longer than 63 bytes")
        } else if raw.contains('\0') {
            Some("it contains a NUL byte")
        } else if raw.starts_with("pg_") || raw == "information_schema" {
            Some("it is reserved for the system")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(TaskerError::InvalidName {
                what: "schema",
                name: raw.chars().take(80).collect(),
                reason,
            }),
            None => Ok(SchemaName(raw.to_owned())),
        }
    }

    /// The name as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as a quoted SQL identifier (`"my ""odd"" schema"`).
    pub fn quoted(&self) -> String {
        quote_ident(&self.0)
    }
}

/// Whether `s` is a W3C trace context `traceparent` header value: version `00`, a 32-hex trace
/// id and a 16-hex parent id (neither all zeros), and 2-hex flags, lower case.
pub fn is_traceparent(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    let hex = |p: &str, n: usize| {
        p.len() == n && p.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    parts.len() == 4
        && parts[0] == "00"
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
        && parts[1].bytes().any(|b| b != b'0')
        && parts[2].bytes().any(|b| b != b'0')
}

/// Quotes an identifier the way `quote_ident` does when quoting is needed (always, here).
pub fn quote_ident(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_and_odd_names() {
        assert_eq!(SchemaName::parse("public").unwrap().quoted(), "\"public\"");
        assert_eq!(SchemaName::parse("we\"ird; drop").unwrap().quoted(), "\"we\"\"ird; drop\"");
        assert!(SchemaName::parse(&"a".repeat(63)).is_ok());
    }

    #[test]
    fn rejects_bad_names() {
        for bad in ["", "pg_catalog", "information_schema", "a\0b"] {
            assert!(SchemaName::parse(bad).is_err(), "{bad:?} must be rejected");
        }
        assert!(SchemaName::parse(&"a".repeat(64)).is_err());
    }
}
