//! Reading SPI results column-by-column without a foreign call per value.
//!
//! pgrx's `SpiHeapTupleData::get` looks up the column type and re-walks the tuple for every
//! value; readiness reads 14 columns of thousands of rows per call, so this module deforms each
//! tuple once (`heap_deform_tuple`) and converts the datums directly, after checking once per
//! result that the column types are the ones the query promises.

use pgrx::pg_sys::{self, BuiltinOid, Datum, Oid};
use pgrx::spi::{SpiError, SpiResult};
use rustc_hash::FxHashMap;
use std::ffi::CStr;
use std::rc::Rc;

/// The expected type of each result column, checked before any value is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Col {
    Int8,
    Int4,
    Bool,
    Text,
    Timestamp,
    Int8Array,
}

impl Col {
    pub fn oid(self) -> Oid {
        match self {
            Col::Int8 => BuiltinOid::INT8OID.value(),
            Col::Int4 => BuiltinOid::INT4OID.value(),
            Col::Bool => BuiltinOid::BOOLOID.value(),
            Col::Text => BuiltinOid::TEXTOID.value(),
            Col::Timestamp => BuiltinOid::TIMESTAMPOID.value(),
            Col::Int8Array => BuiltinOid::INT8ARRAYOID.value(),
        }
    }
}

/// Shares equal strings read from many rows (step names, states).
#[derive(Default)]
pub struct Interner(FxHashMap<Rc<str>, ()>);

impl Interner {
    /// The shared copy of `s`.
    pub fn get(&mut self, s: &str) -> Rc<str> {
        if let Some((k, _)) = self.0.get_key_value(s) {
            return k.clone();
        }
        let k: Rc<str> = Rc::from(s);
        self.0.insert(k.clone(), ());
        k
    }
}

/// One deformed row.
pub struct Row<'a> {
    values: &'a [Datum],
    nulls: &'a [bool],
}

impl<'a> Row<'a> {
    /// A row of the given datums (each a value of the type its reader expects, alive while
    /// the row is read).
    pub fn new(values: &'a [Datum], nulls: &'a [bool]) -> Row<'a> {
        Row { values, nulls }
    }

    /// An `int8` or `timestamp` column (0-based).
    pub fn i64(&self, i: usize) -> Option<i64> {
        (!self.nulls[i]).then(|| self.values[i].value() as i64)
    }

    /// An `int4` column.
    pub fn i32(&self, i: usize) -> Option<i32> {
        (!self.nulls[i]).then(|| self.values[i].value() as i32)
    }

    /// A `bool` column.
    pub fn bool(&self, i: usize) -> Option<bool> {
        (!self.nulls[i]).then(|| self.values[i].value() != 0)
    }

    /// A `text` column.
    pub fn text(&self, i: usize) -> Option<String> {
        self.with_text(i, str::to_owned)
    }

    /// A `text` column, shared through `interner` (repeated values are allocated once).
    pub fn text_interned(&self, i: usize, interner: &mut Interner) -> Option<Rc<str>> {
        self.with_text(i, |s| interner.get(s))
    }

    /// Calls `f` with a `text` column's value, borrowed.
    pub fn with_text<R>(&self, i: usize, f: impl FnOnce(&str) -> R) -> Option<R> {
        if self.nulls[i] {
            return None;
        }
        // SAFETY: the column was checked to be text. A value stored inline and uncompressed
        // (the usual case) is read where it is; otherwise detoasting returns a copy. Either
        // pointer is valid while the row's datums are (an SPI result, a scanned buffer).
        unsafe {
            let raw = self.values[i].cast_mut_ptr::<pg_sys::varlena>();
            let v = if pgrx::varlena::varatt_is_1b_e(raw) || pgrx::varlena::varatt_is_4b_c(raw) {
                pg_sys::pg_detoast_datum_packed(raw)
            } else {
                raw
            };
            let len = pgrx::varlena::varsize_any_exhdr(v);
            let data = pgrx::varlena::vardata_any(v) as *const u8;
            let bytes = std::slice::from_raw_parts(data, len);
            Some(match std::str::from_utf8(bytes) {
                Ok(s) => f(s),
                Err(_) => f(&String::from_utf8_lossy(bytes)),
            })
        }
    }

    /// An `int8[]` column without NULL elements (NULL elements are skipped).
    pub fn i64_array(&self, i: usize) -> Vec<i64> {
        if self.nulls[i] {
            return Vec::new();
        }
        // SAFETY: the column was checked to be int8[]; the detoasted array lives while the
        // row's datums do, and is copied out here.
        unsafe {
            let ptr =
                pg_sys::pg_detoast_datum(self.values[i].cast_mut_ptr()) as *mut pg_sys::ArrayType;
            let Some(nn) = std::ptr::NonNull::new(ptr) else {
                return Vec::new();
            };
            let mut raw = pgrx::array::RawArray::from_ptr(nn);
            if raw.len() == 0 {
                return Vec::new();
            }
            let data: &[i64] = raw.data::<i64>().as_ref();
            match raw.nulls_bitslice() {
                None => data.to_vec(),
                Some(bits) => {
                    // NULL elements take no space in the data area.
                    let bits = bits.as_ref();
                    let mut out = Vec::with_capacity(data.len());
                    let mut next = 0;
                    for k in 0..raw.len() {
                        if bits[k] {
                            out.push(data[next]);
                            next += 1;
                        }
                    }
                    out
                }
            }
        }
    }
}

/// Calls `f` for every row of the SPI result just produced (`SPI_tuptable`), after checking
/// that its columns have the types of `cols`.
///
/// # Safety
/// Call right after an SPI query returned, before any other SPI call.
pub unsafe fn for_each_row(cols: &[Col], mut f: impl FnMut(&Row<'_>)) -> SpiResult<()> {
    let table = pg_sys::SPI_tuptable;
    if table.is_null() {
        return Ok(());
    }
    let tupdesc = (*table).tupdesc;
    let natts = (*tupdesc).natts as usize;
    if natts != cols.len() {
        return Err(SpiError::InvalidPosition);
    }
    // Borrowed, not reference counted: dropping it releases nothing.
    let desc = pgrx::tupdesc::PgTupleDesc::from_pg_unchecked(tupdesc);
    for (i, col) in cols.iter().enumerate() {
        let att = desc.get(i).ok_or(SpiError::InvalidPosition)?;
        if att.atttypid != col.oid() {
            let name = CStr::from_ptr(att.attname.data.as_ptr()).to_string_lossy().into_owned();
            pgrx::error!(
                "tasker_core: column {name} has type oid {:?}, expected {:?}",
                att.atttypid,
                col
            );
        }
    }
    drop(desc);
    let n = (*table).numvals as usize;
    let mut values = vec![Datum::from(0usize); natts];
    let mut nulls = vec![true; natts];
    for r in 0..n {
        let tuple = *(*table).vals.add(r);
        pg_sys::heap_deform_tuple(tuple, tupdesc, values.as_mut_ptr(), nulls.as_mut_ptr());
        f(&Row { values: &values, nulls: &nulls });
    }
    Ok(())
}
