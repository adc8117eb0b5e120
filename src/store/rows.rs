//! Reading SPI results column-by-column without a foreign call per value.
//!
//! pgrx's `SpiHeapTupleData::get` looks up the column type and re-walks the tuple for every
//! value; readiness reads 14 columns of thousands of rows per call, so this module deforms each
//! tuple once (`heap_deform_tuple`) and converts the datums directly, after checking once per
//! result that the column types are the ones the query promises.

use crate::core::readiness::ParentIds;
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
        let bytes = self.text_bytes(i)?;
        Some(match std::str::from_utf8(bytes) {
            Ok(s) => f(s),
            Err(_) => f(&String::from_utf8_lossy(bytes)),
        })
    }

    /// A `text` column's bytes as stored (in the server's encoding), borrowed.
    pub fn text_bytes(&self, i: usize) -> Option<&'a [u8]> {
        if self.nulls[i] {
            return None;
        }
        // SAFETY: the column was checked to be text, a varlena; its datum is valid while the
        // row's datums are (an SPI result, a scanned buffer).
        Some(unsafe { varlena_bytes(self.values[i]) })
    }

    /// The number of non-NULL elements of an `int8[]` column (0 when NULL), read from its
    /// header and NULL bitmap when it is stored inline.
    pub fn i64_array_len(&self, i: usize) -> usize {
        if self.nulls[i] {
            return 0;
        }
        // SAFETY: the column was checked to be int8[] and its datum is alive while the row is
        // read; only an inline, uncompressed value is read in place.
        let inline = unsafe {
            let raw = self.values[i].cast_mut_ptr::<pg_sys::varlena>();
            if pgrx::varlena::varatt_is_1b_e(raw) || pgrx::varlena::varatt_is_4b_c(raw) {
                None
            } else {
                read_inline_int8_array(raw, None)
            }
        };
        inline.unwrap_or_else(|| self.i64_array(i).len())
    }

    /// An `int8[]` column without NULL elements (NULL elements are skipped), in element order.
    pub fn i64_array(&self, i: usize) -> ParentIds {
        let mut out = ParentIds::new();
        if self.nulls[i] {
            return out;
        }
        // SAFETY: the column was checked to be int8[] and its datum is alive while the row is
        // read. An array stored inline and uncompressed (the usual case) is read where it
        // is, each element copied out; otherwise (or should its header not be the plain
        // one-dimensional form the bounds below check) detoasting returns a copy to read.
        unsafe {
            let raw = self.values[i].cast_mut_ptr::<pg_sys::varlena>();
            if !pgrx::varlena::varatt_is_1b_e(raw)
                && !pgrx::varlena::varatt_is_4b_c(raw)
                && read_inline_int8_array(raw, Some(&mut out)).is_some()
            {
                return out;
            }
            let ptr = pg_sys::pg_detoast_datum(raw) as *mut pg_sys::ArrayType;
            let Some(nn) = std::ptr::NonNull::new(ptr) else {
                return out;
            };
            let mut raw = pgrx::array::RawArray::from_ptr(nn);
            if raw.len() == 0 {
                return out;
            }
            let data: &[i64] = raw.data::<i64>().as_ref();
            match raw.nulls_bitslice() {
                None => out.extend_from_slice(data),
                Some(bits) => {
                    // NULL elements take no space in the data area.
                    let bits = bits.as_ref();
                    let mut next = 0;
                    for k in 0..raw.len() {
                        if bits[k] {
                            out.push(data[next]);
                            next += 1;
                        }
                    }
                }
            }
            out
        }
    }
}

/// The contents of a varlena datum, borrowed: read where it lies when stored inline and
/// uncompressed (the usual case), else detoasted into a copy in the current memory context.
///
/// # Safety
/// `d` must be a non-NULL varlena datum, valid for `'a`.
pub unsafe fn varlena_bytes<'a>(d: Datum) -> &'a [u8] {
    let raw = d.cast_mut_ptr::<pg_sys::varlena>();
    let v = if pgrx::varlena::varatt_is_1b_e(raw) || pgrx::varlena::varatt_is_4b_c(raw) {
        pg_sys::pg_detoast_datum_packed(raw)
    } else {
        raw
    };
    let len = pgrx::varlena::varsize_any_exhdr(v);
    std::slice::from_raw_parts(pgrx::varlena::vardata_any(v) as *const u8, len)
}

/// Reads the elements of an inline, uncompressed `int8[]` varlena (1- or 4-byte header)
/// without copying or aligning it first, into `out` when given; the number of (non-NULL)
/// elements, or `None` (nothing read) when it is not a one-dimensional array whose parts lie
/// within its length — the caller then detoasts it.
///
/// The layout is PostgreSQL's `ArrayType` (array.h) after a 4-byte header: `ndim`,
/// `dataoffset` (0 without a NULL bitmap), `elemtype`, then per dimension its length and
/// lower bound, the NULL bitmap, and the elements at `dataoffset` or else at
/// `ARR_OVERHEAD_NONULLS(ndim)`. Offsets below are from the start of that 4-byte form; a
/// 1-byte header shifts everything by 3 bytes, so every read is unaligned.
///
/// # Safety
/// `raw` must point to a valid inline, uncompressed varlena of type `int8[]`.
unsafe fn read_inline_int8_array(
    raw: *const pg_sys::varlena,
    out: Option<&mut ParentIds>,
) -> Option<usize> {
    let (base, total) = if pgrx::varlena::varatt_is_1b(raw) {
        // the 4-byte form's field at offset k is at raw + 1 + (k - 4)
        ((raw as *const u8).wrapping_sub(3), pgrx::varlena::varsize_1b(raw) + 3)
    } else {
        (raw as *const u8, pgrx::varlena::varsize_4b(raw))
    };
    let at = |offset: usize| (base.wrapping_add(offset) as *const i32).read_unaligned();
    // header: 16 bytes; one dimension: + 8
    if total < 16 {
        return None;
    }
    let ndim = at(4);
    if ndim == 0 {
        return Some(0);
    }
    if ndim != 1 || total < 24 {
        return None;
    }
    let dataoffset = at(8);
    let n = at(16);
    if n < 0 {
        return None;
    }
    let n = n as usize;
    let bitmap = (dataoffset != 0).then_some(24usize);
    // ARR_OVERHEAD_NONULLS(1) = MAXALIGN(16 + 8) = 24
    let data = if dataoffset != 0 { dataoffset as usize } else { 24 };
    if let Some(b) = bitmap {
        if b + n.div_ceil(8) > data {
            return None;
        }
    }
    let present = |k: usize| match bitmap {
        None => true,
        Some(b) => *base.wrapping_add(b + k / 8) & (1 << (k % 8)) != 0,
    };
    let stored = (0..n).filter(|&k| present(k)).count();
    if data + 8 * stored > total {
        return None;
    }
    if let Some(out) = out {
        out.extend(
            (0..stored).map(|k| (base.wrapping_add(data + 8 * k) as *const i64).read_unaligned()),
        );
    }
    Some(stored)
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
