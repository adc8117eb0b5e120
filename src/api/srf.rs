//! Returning sets in materialize mode: all rows go straight into a tuplestore in one call,
//! instead of one function call per row (pgrx's value-per-call protocol). The readiness
//! functions return thousands of rows per call; this halves their per-row cost.
//!
//! Each row is laid out here as PostgreSQL's `heap_fill_tuple` would lay it out, column by
//! column into one reused buffer, and handed to the tuplestore, which copies it once. Through
//! `tuplestore_putvalues` a row cost a size pass, a zeroed allocation and a fill pass that
//! looks up every attribute (a quarter of a 1,000-step readiness call under `perf`); a text
//! value was also built as a varlena first and copied again.

use pgrx::pg_sys::{self, Datum};
use std::mem::offset_of;

/// How a result column is stored in a tuple (from the declared result type).
#[derive(Clone, Copy)]
struct Layout {
    /// `attlen`: 1, 2, 4 or 8 for the by-value types written here; -1 for a varlena.
    len: i16,
    /// `attalign` in bytes.
    align: usize,
    /// Whether a varlena may be stored with a 1-byte header (`attstorage` is not plain).
    packable: bool,
}

/// Raises for a column written with a value of another type or out of order (a bug).
#[cold]
fn mismatch(col: usize) -> ! {
    pgrx::error!("tasker_core: result column {col} is not of the type written, or out of order")
}

/// The offset of the tuple header's `t_infomask2`, `t_infomask`, `t_hoff` and `t_bits`.
const INFOMASK2: usize = offset_of!(pg_sys::HeapTupleHeaderData, t_infomask2);
const INFOMASK: usize = offset_of!(pg_sys::HeapTupleHeaderData, t_infomask);
const HOFF: usize = offset_of!(pg_sys::HeapTupleHeaderData, t_hoff);
const BITS: usize = offset_of!(pg_sys::HeapTupleHeaderData, t_bits);
/// `VARATT_SHORT_MAX`: the largest varlena (header included) a 1-byte header can hold, so
/// contents shorter than it fit.
const SHORT_MAX: usize = 0x7F;

/// One output row being filled: set each column once, in column order.
pub struct RowOut<'a> {
    layout: &'a [Layout],
    /// The tuple: header, NULL bitmap (always present: a valid tuple whose bits say "not
    /// null" where a value is), then the data from `hoff` on.
    buf: &'a mut Vec<u8>,
    hoff: usize,
    next: usize,
}

impl RowOut<'_> {
    /// Starts column `col` (which must be the next one) with `len` as the caller's value
    /// size; raises when the declared result type disagrees (a bug, not input).
    #[inline]
    fn start(&mut self, col: usize, len: i16) -> Layout {
        let layout = match self.layout.get(col) {
            Some(l) if col == self.next && l.len == len => *l,
            _ => mismatch(col),
        };
        self.next += 1;
        self.buf[BITS + col / 8] |= 1 << (col % 8);
        layout
    }

    /// Pads the data to `align` bytes, a power of two (offsets from the data start, which is
    /// max-aligned).
    #[inline]
    fn pad(&mut self, align: usize) {
        let at = self.buf.len() - self.hoff;
        let aligned = (at + align - 1) & !(align - 1);
        if aligned != at {
            self.buf.resize(self.hoff + aligned, 0);
        }
    }

    #[inline]
    fn by_value<const N: usize>(&mut self, col: usize, bytes: [u8; N]) {
        let layout = self.start(col, N as i16);
        let at = self.buf.len();
        let data = at - self.hoff;
        let start = self.hoff + ((data + layout.align - 1) & !(layout.align - 1));
        // room for the padding (under 8 bytes), the value, and one 8-byte zeroing store
        self.buf.reserve((start + N).max(at + 8) - at);
        // SAFETY: the buffer has room for `at + 8` and `start + N` bytes (reserved just
        // above); the padding is zeroed (by one unaligned store covering it) and the value
        // copied before the length covers them.
        unsafe {
            let p = self.buf.as_mut_ptr();
            p.add(at).cast::<u64>().write_unaligned(0);
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), p.add(start), N);
            self.buf.set_len(start + N);
        }
    }

    #[inline]
    pub fn i64(&mut self, col: usize, v: i64) {
        self.by_value(col, v.to_ne_bytes());
    }

    #[inline]
    pub fn i32(&mut self, col: usize, v: i32) {
        self.by_value(col, v.to_ne_bytes());
    }

    #[inline]
    pub fn bool(&mut self, col: usize, v: bool) {
        self.by_value(col, [v as u8]);
    }

    /// A `timestamp` (microseconds since 2000-01-01) or NULL.
    #[inline]
    pub fn timestamp(&mut self, col: usize, v: Option<i64>) {
        match v {
            Some(t) => self.i64(col, t),
            None => self.null(col),
        }
    }

    #[inline]
    pub fn opt_i32(&mut self, col: usize, v: Option<i32>) {
        match v {
            Some(x) => self.i32(col, x),
            None => self.null(col),
        }
    }

    /// A varlena column's contents `bytes` (a `text` value's UTF-8): stored with a 1-byte
    /// header when it fits and the column allows it, unaligned — as `heap_fill_tuple` stores
    /// a value it can make short — else with a 4-byte header, aligned.
    fn varlena(&mut self, col: usize, bytes: &[u8]) {
        let layout = self.start(col, -1);
        let at = self.buf.len();
        if layout.packable && bytes.len() < SHORT_MAX {
            self.buf.push(0);
            // SAFETY: the byte just pushed is the header being set.
            unsafe {
                pgrx::varlena::set_varsize_1b(
                    self.buf.as_mut_ptr().add(at).cast(),
                    (bytes.len() + 1) as i32,
                )
            };
        } else {
            self.pad(layout.align);
            let at = self.buf.len();
            self.buf.extend_from_slice(&[0; 4]);
            // SAFETY: the four bytes just added are the header being set (written unaligned
            // through a copy: the buffer itself has no alignment).
            unsafe {
                let mut header = [0u8; 4];
                pgrx::varlena::set_varsize_4b(header.as_mut_ptr().cast(), (bytes.len() + 4) as i32);
                self.buf[at..at + 4].copy_from_slice(&header);
            }
        }
        self.buf.extend_from_slice(bytes);
    }

    #[inline]
    pub fn text(&mut self, col: usize, v: &str) {
        self.varlena(col, v.as_bytes());
    }

    /// A `text` value given as its bytes in the server's encoding (as read from a table).
    #[inline]
    pub fn text_bytes(&mut self, col: usize, v: &[u8]) {
        self.varlena(col, v);
    }

    /// A varlena datum (a `numeric`, say), or NULL.
    pub fn datum(&mut self, col: usize, v: Option<Datum>) {
        let Some(d) = v else {
            return self.null(col);
        };
        // SAFETY: a non-NULL varlena datum of the column's type, made by the caller in this
        // call and alive during it.
        let bytes = unsafe { crate::store::rows::varlena_bytes(d) };
        self.varlena(col, bytes);
    }

    #[inline]
    pub fn null(&mut self, col: usize) {
        if col != self.next || col >= self.layout.len() {
            mismatch(col);
        }
        self.next += 1;
    }
}

/// The result of one set-returning call in materialize mode, being filled row by row.
pub struct Materializer {
    store: *mut pg_sys::Tuplestorestate,
    layout: Vec<Layout>,
    /// The header and NULL bitmap every row starts from.
    header: Vec<u8>,
    buf: Vec<u8>,
}

impl Materializer {
    /// Starts the result of the set-returning function called through `fcinfo`, with the
    /// result row type the function declares (which must have `ncols` columns).
    ///
    /// # Safety
    /// `fcinfo` must be the call info of a function declared to return a set of a composite
    /// type with `ncols` columns whose types match what the rows write (by-value widths and
    /// varlenas are checked; a `text` column must be given text, a `numeric` one a numeric
    /// datum), and the materializer must be used only during this call.
    pub unsafe fn begin(fcinfo: pg_sys::FunctionCallInfo, ncols: usize) -> Materializer {
        let rsinfo = (*fcinfo).resultinfo as *mut pg_sys::ReturnSetInfo;
        if rsinfo.is_null()
            || (*rsinfo).type_ != pg_sys::NodeTag::T_ReturnSetInfo
            || ((*rsinfo).allowedModes & pg_sys::SetFunctionReturnMode::SFRM_Materialize as i32)
                == 0
        {
            pgrx::error!(
                "tasker_core: set-valued function called in a context that cannot accept a set"
            );
        }
        // The row type the calling query expects (a FROM clause builds it once, at plan
        // start-up); else the declared one, built from the catalog on every call.
        let mut tupdesc: pg_sys::TupleDesc = (*rsinfo).expectedDesc;
        if tupdesc.is_null() {
            let kind = pg_sys::get_call_result_type(fcinfo, std::ptr::null_mut(), &mut tupdesc);
            if kind != pg_sys::TypeFuncClass::TYPEFUNC_COMPOSITE || tupdesc.is_null() {
                pgrx::error!("tasker_core: the function's result type is not a row type");
            }
        }
        if (*tupdesc).natts as usize != ncols {
            pgrx::error!(
                "tasker_core: the function is declared with {} result columns, expected {ncols}",
                (*tupdesc).natts
            );
        }
        let layout: Vec<Layout> = (*tupdesc)
            .attrs
            .as_slice(ncols)
            .iter()
            .map(|a| Layout {
                len: if a.attisdropped || (!a.attbyval && a.attlen != -1) { 0 } else { a.attlen },
                align: match a.attalign as u8 {
                    b'd' => 8,
                    b'i' => 4,
                    b's' => 2,
                    _ => 1,
                },
                packable: a.attstorage as u8 != b'p',
            })
            .collect();
        let per_query = (*(*rsinfo).econtext).ecxt_per_query_memory;
        let old = pg_sys::MemoryContextSwitchTo(per_query);
        let desc = pg_sys::CreateTupleDescCopy(tupdesc);
        let random = ((*rsinfo).allowedModes
            & pg_sys::SetFunctionReturnMode::SFRM_Materialize_Random as i32)
            != 0;
        let store = pg_sys::tuplestore_begin_heap(random, false, pg_sys::work_mem);
        (*rsinfo).returnMode = pg_sys::SetFunctionReturnMode::SFRM_Materialize;
        (*rsinfo).setResult = store;
        (*rsinfo).setDesc = desc;
        pg_sys::MemoryContextSwitchTo(old);

        // header and bitmap, data max-aligned after them (as heap_form_tuple computes t_hoff)
        let hoff = (BITS + ncols.div_ceil(8)).next_multiple_of(8);
        let mut header = vec![0u8; hoff];
        header[INFOMASK2..INFOMASK2 + 2].copy_from_slice(&(ncols as u16).to_ne_bytes());
        let mut infomask = pg_sys::HEAP_HASNULL as u16;
        if layout.iter().any(|l| l.len == -1) {
            infomask |= pg_sys::HEAP_HASVARWIDTH as u16;
        }
        header[INFOMASK..INFOMASK + 2].copy_from_slice(&infomask.to_ne_bytes());
        header[HOFF] = hoff as u8;
        Materializer { store, layout, header, buf: Vec::with_capacity(hoff + 256) }
    }

    /// Adds one row: `fill` sets every column, in order.
    pub fn row(&mut self, fill: impl FnOnce(&mut RowOut<'_>)) {
        self.buf.clear();
        self.buf.extend_from_slice(&self.header);
        let hoff = self.header.len();
        let mut out = RowOut { layout: &self.layout, buf: &mut self.buf, hoff, next: 0 };
        fill(&mut out);
        if out.next != self.layout.len() {
            pgrx::error!("tasker_core: a result row was left with unwritten columns");
        }
        // SAFETY: `store` is the tuplestore `begin` created for this call (the materializer is
        // used only during it); the tuple in `buf` is laid out as heap_fill_tuple lays out a
        // row of the declared type, and the tuplestore copies it (from its header's
        // t_infomask2 on) into its own memory.
        unsafe {
            let mut tuple = pg_sys::HeapTupleData {
                t_len: self.buf.len() as u32,
                t_data: self.buf.as_mut_ptr().cast(),
                ..std::mem::zeroed()
            };
            pg_sys::tuplestore_puttuple(self.store, &mut tuple);
        }
    }
}

/// Returns `rows` from the set-returning function called through `fcinfo`, in materialize
/// mode. `fill` sets every column of a row, in order.
///
/// # Safety
/// As [`Materializer::begin`].
pub unsafe fn materialize<T>(
    fcinfo: pg_sys::FunctionCallInfo,
    ncols: usize,
    rows: impl IntoIterator<Item = T>,
    mut fill: impl FnMut(&T, &mut RowOut<'_>),
) {
    let mut out = Materializer::begin(fcinfo, ncols);
    for row in rows {
        out.row(|o| fill(&row, o));
    }
}

/// Argument `n` of a function call as an `int8`, or `None` when NULL.
///
/// # Safety
/// Argument `n` must exist and be of type bigint.
pub unsafe fn arg_i64(fcinfo: pg_sys::FunctionCallInfo, n: usize) -> Option<i64> {
    pgrx::fcinfo::pg_getarg::<i64>(fcinfo, n)
}

/// Argument `n` of a function call as an `int8[]`, or `None` when NULL (NULL elements dropped).
///
/// # Safety
/// Argument `n` must exist and be of type bigint[].
pub unsafe fn arg_i64_array(fcinfo: pg_sys::FunctionCallInfo, n: usize) -> Option<Vec<i64>> {
    pgrx::fcinfo::pg_getarg::<Vec<Option<i64>>>(fcinfo, n)
        .map(|v| v.into_iter().flatten().collect())
}
