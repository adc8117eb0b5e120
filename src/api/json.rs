//! `jsonb` values that cross the SQL boundary as PostgreSQL's own text form.
//!
//! pgrx's `JsonB` parses every argument with serde_json, which fails past 128 levels of
//! nesting with a panic (XX000), and would do the same to stored documents a claim hands on.
//! [`JsonbText`] is a `jsonb` in SQL signatures that holds the text of the value: arguments are
//! depth-checked before serde sees them ([`JsonbText::parse`], TK026 past the limit), and
//! stored documents go back out through `jsonb_in` without being parsed in Rust at all, however
//! deep Rails or anyone else wrote them.

use crate::core::error::TaskerError;
use pgrx::callconv::{Arg, ArgAbi, BoxRet, FcInfo};
use pgrx::pg_sys;
use pgrx::pgrx_sql_entity_graph::metadata::{
    ArgumentError, ReturnsError, ReturnsRef, SqlMappingRef, SqlTranslatable, TypeOrigin,
};
use pgrx::{FromDatum, IntoDatum};
use serde_json::Value;

/// A `jsonb` value as its canonical text (what `jsonb_out` prints).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonbText(pub String);

impl JsonbText {
    /// The value for Rust code, or TK026 when it is nested deeper than
    /// [`crate::core::json::MAX_DEPTH`] (the argument's name in the message).
    pub fn parse(&self, argument: &'static str) -> Result<Value, TaskerError> {
        crate::core::json::parse(argument, &self.0)
    }

    /// An optional argument parsed as [`Self::parse`] does, `{}` when it is NULL.
    pub fn parse_or_empty(arg: Option<Self>, argument: &'static str) -> Result<Value, TaskerError> {
        Ok(arg.map(|j| j.parse(argument)).transpose()?.unwrap_or(Value::Object(Default::default())))
    }
}

impl FromDatum for JsonbText {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _typoid: pg_sys::Oid,
    ) -> Option<Self> {
        if is_null {
            return None;
        }
        // SAFETY: the caller guarantees `datum` is a jsonb varlena (its SQL type is jsonb);
        // jsonb_out reads it (detoasting as needed) and returns a palloc'd C string, which is
        // copied into Rust and freed before returning. jsonb_out never recurses in Rust.
        unsafe {
            let cstr =
                pgrx::direct_function_call::<&core::ffi::CStr>(pg_sys::jsonb_out, &[Some(datum)])?;
            let text = cstr.to_string_lossy().into_owned();
            pg_sys::pfree(cstr.as_ptr() as *mut core::ffi::c_void);
            Some(JsonbText(text))
        }
    }
}

impl IntoDatum for JsonbText {
    fn into_datum(self) -> Option<pg_sys::Datum> {
        // a NUL cannot occur in JSON text (jsonb escapes it as \u0000)
        let cstring = std::ffi::CString::new(self.0.replace('\0', "")).ok()?;
        // SAFETY: jsonb_in takes a NUL-terminated C string, valid for the call; it copies what
        // it needs into a new palloc'd jsonb and guards its recursion with check_stack_depth.
        unsafe {
            pgrx::direct_function_call_as_datum(pg_sys::jsonb_in, &[Some(cstring.as_ptr().into())])
        }
    }

    fn type_oid() -> pg_sys::Oid {
        pg_sys::JSONBOID
    }
}

// SAFETY: the SQL type is jsonb, which is what FromDatum and IntoDatum above read and make.
unsafe impl SqlTranslatable for JsonbText {
    const TYPE_IDENT: &'static str = pgrx::pgrx_resolved_type!(JsonbText);
    const TYPE_ORIGIN: TypeOrigin = TypeOrigin::External;
    const ARGUMENT_SQL: Result<SqlMappingRef, ArgumentError> = Ok(SqlMappingRef::literal("jsonb"));
    const RETURN_SQL: Result<ReturnsRef, ReturnsError> =
        Ok(ReturnsRef::One(SqlMappingRef::literal("jsonb")));
}

// SAFETY: as pgrx does for its own FromDatum types: the argument's SQL type is jsonb.
unsafe impl<'fcx> ArgAbi<'fcx> for JsonbText {
    unsafe fn unbox_arg_unchecked(arg: Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        // SAFETY: the wrapper pgrx generates calls this only for a non-null jsonb argument.
        unsafe {
            arg.unbox_arg_using_from_datum()
                .unwrap_or_else(|| panic!("argument {index} must not be null"))
        }
    }
}

// SAFETY: returns the datum IntoDatum made (or NULL), as pgrx does for its own types.
unsafe impl BoxRet for JsonbText {
    unsafe fn box_into<'fcx>(self, fcinfo: &mut FcInfo<'fcx>) -> pgrx::datum::Datum<'fcx> {
        match self.into_datum() {
            Some(datum) => unsafe { fcinfo.return_raw_datum(datum) },
            None => fcinfo.return_null(),
        }
    }
}
