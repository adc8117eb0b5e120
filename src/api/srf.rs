//! Returning sets in materialize mode: all rows go straight into a tuplestore in one call,
//! instead of one function call per row (pgrx's value-per-call protocol). The readiness
//! functions return thousands of rows per call; this halves their per-row cost.

use pgrx::pg_sys::{self, Datum};

/// One output row being filled: set each column once.
pub struct RowOut<'a> {
    values: &'a mut [Datum],
    nulls: &'a mut [bool],
    /// Per column, the buffer of its `text` value for this row: a varlena built in Rust
    /// memory, read (copied) by `tuplestore_putvalues` before the next row reuses it.
    texts: &'a mut [Vec<u32>],
}

impl RowOut<'_> {
    pub fn i64(&mut self, col: usize, v: i64) {
        self.values[col] = Datum::from(v);
        self.nulls[col] = false;
    }

    pub fn i32(&mut self, col: usize, v: i32) {
        self.values[col] = Datum::from(v);
        self.nulls[col] = false;
    }

    pub fn bool(&mut self, col: usize, v: bool) {
        self.values[col] = Datum::from(v);
        self.nulls[col] = false;
    }

    /// A `timestamp` (microseconds since 2000-01-01) or NULL.
    pub fn timestamp(&mut self, col: usize, v: Option<i64>) {
        match v {
            Some(t) => self.i64(col, t),
            None => self.null(col),
        }
    }

    pub fn opt_i32(&mut self, col: usize, v: Option<i32>) {
        match v {
            Some(x) => self.i32(col, x),
            None => self.null(col),
        }
    }

    pub fn text(&mut self, col: usize, v: &str) {
        // A 4-byte-header varlena in this column's buffer (u32 words: aligned as `text`
        // needs), instead of a palloc'd copy per value through a foreign call.
        let len = v.len() + 4;
        let buf = &mut self.texts[col];
        buf.clear();
        buf.resize(len.div_ceil(4), 0);
        let ptr = buf.as_mut_ptr().cast::<u8>();
        // SAFETY: the buffer holds at least `len` bytes; the header is written by pgrx's
        // SET_VARSIZE for a 4-byte header and the bytes follow it.
        unsafe {
            pgrx::varlena::set_varsize_4b(ptr.cast(), len as i32);
            std::ptr::copy_nonoverlapping(v.as_ptr(), ptr.add(4), v.len());
        }
        self.values[col] = Datum::from(ptr);
        self.nulls[col] = false;
    }

    pub fn datum(&mut self, col: usize, v: Option<Datum>) {
        match v {
            Some(d) => {
                self.values[col] = d;
                self.nulls[col] = false;
            }
            None => self.null(col),
        }
    }

    pub fn null(&mut self, col: usize) {
        self.values[col] = Datum::from(0usize);
        self.nulls[col] = true;
    }
}

/// Returns `rows` from the set-returning function called through `fcinfo`, in materialize
/// mode, with the result row type declared by the function. `fill` sets every column of a row.
///
/// # Safety
/// `fcinfo` must be the call info of a function declared to return a set of a composite type
/// with `ncols` columns whose types match what `fill` writes.
pub unsafe fn materialize<T>(
    fcinfo: pg_sys::FunctionCallInfo,
    ncols: usize,
    rows: impl IntoIterator<Item = T>,
    mut fill: impl FnMut(&T, &mut RowOut<'_>),
) {
    let rsinfo = (*fcinfo).resultinfo as *mut pg_sys::ReturnSetInfo;
    if rsinfo.is_null()
        || (*rsinfo).type_ != pg_sys::NodeTag::T_ReturnSetInfo
        || ((*rsinfo).allowedModes & pg_sys::SetFunctionReturnMode::SFRM_Materialize as i32) == 0
    {
        pgrx::error!(
            "tasker_core: set-valued function called in a context that cannot accept a set"
        );
    }
    let mut tupdesc: pg_sys::TupleDesc = std::ptr::null_mut();
    let kind = pg_sys::get_call_result_type(fcinfo, std::ptr::null_mut(), &mut tupdesc);
    if kind != pg_sys::TypeFuncClass::TYPEFUNC_COMPOSITE || tupdesc.is_null() {
        pgrx::error!("tasker_core: the function's result type is not a row type");
    }
    if (*tupdesc).natts as usize != ncols {
        pgrx::error!(
            "tasker_core: the function is declared with {} result columns, expected {ncols}",
            (*tupdesc).natts
        );
    }
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

    let mut values = vec![Datum::from(0usize); ncols];
    let mut nulls = vec![true; ncols];
    let mut texts = vec![Vec::new(); ncols];
    for row in rows {
        let mut out = RowOut { values: &mut values, nulls: &mut nulls, texts: &mut texts };
        fill(&row, &mut out);
        pg_sys::tuplestore_putvalues(store, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
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
