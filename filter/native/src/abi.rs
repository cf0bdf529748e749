//! The FFI edge: the subset of Envoy's dynamic-module ABI this filter uses, and nothing else.
//!
//! Everything `unsafe` in the crate is here. Each declaration below was checked against
//! `source/extensions/dynamic_modules/abi/abi.h` (envoyproxy/envoy; the public copy says
//! `v0.1.0`, the pinned Envoy 1.40.0 answers to `v0.2.0` with the same HTTP-filter part) and
//! against the pinned binary: `tests/symbols.rs` checks that every `envoy_dynamic_module_callback_*`
//! declared here is exported by it, and the e2e suite (`--host native`) runs them in it.
//!
//! Three parts:
//! - the C types and the callbacks Envoy exports (`extern "C"` block);
//! - safe wrappers ([`FilterEnvoy`], [`ConfigEnvoy`], [`Scheduler`], [`log`]) that copy what
//!   they read out of Envoy's memory before returning, so no Envoy-owned pointer outlives a call;
//! - the event hooks Envoy calls (`envoy_dynamic_module_on_*`), each behind [`guard`]: a panic
//!   never unwinds into Envoy, it becomes a reset stream (fail closed) or a refused config.
//!
//! C enums are passed as `u32` (the header's enums have no negative values; Envoy is built for
//! x86-64/aarch64 Linux where such an enum is 4 bytes); `bool` is C's `_Bool`.

use crate::module::{self, CalloutAnswer, FilterConfig, NativeFilter};
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::{self, NonNull};
use std::rc::Rc;
use std::sync::Arc;

/// `envoy_dynamic_module_type_module_buffer`: bytes the module owns, lent for one call.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ModuleBuffer {
    ptr: *const u8,
    length: usize,
}

impl ModuleBuffer {
    fn of(bytes: &[u8]) -> Self {
        Self {
            ptr: bytes.as_ptr(),
            length: bytes.len(),
        }
    }

    const NULL: Self = Self {
        ptr: ptr::null(),
        length: 0,
    };
}

/// `envoy_dynamic_module_type_envoy_buffer`: bytes Envoy owns, valid until the hook returns (or
/// the next setter).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyBuffer {
    ptr: *const u8,
    length: usize,
}

impl EnvoyBuffer {
    const NULL: Self = Self {
        ptr: ptr::null(),
        length: 0,
    };

    /// Copies the bytes out.
    fn to_vec(self) -> Vec<u8> {
        if self.ptr.is_null() || self.length == 0 {
            return Vec::new();
        }
        // SAFETY: Envoy filled this buffer during the current call or hook; it points to
        // `length` initialized bytes that stay valid until the hook returns (abi.h, "OWNERSHIP").
        // The bytes are copied at once.
        unsafe { std::slice::from_raw_parts(self.ptr, self.length) }.to_vec()
    }
}

/// `envoy_dynamic_module_type_module_http_header`.
#[repr(C)]
pub struct ModuleHeader {
    key_ptr: *const u8,
    key_length: usize,
    value_ptr: *const u8,
    value_length: usize,
}

/// `envoy_dynamic_module_type_envoy_http_header`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyHeader {
    key_ptr: *const u8,
    key_length: usize,
    value_ptr: *const u8,
    value_length: usize,
}

/// The two callout functions of the ABI (a filter's, a config's): the same arguments after the
/// owner's pointer.
type CalloutFn = unsafe extern "C" fn(
    *mut c_void,
    *mut u64,
    ModuleBuffer,
    *mut ModuleHeader,
    usize,
    ModuleBuffer,
    u64,
) -> u32;

/// Starts a callout with `start` on `owner`; its id, or the ABI's error code.
///
/// # Safety
/// `owner` must be live and of the kind `start` takes (a filter's or a config's pointer).
unsafe fn start_callout(
    start: CalloutFn,
    owner: *mut c_void,
    cluster: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    timeout_ms: u64,
) -> Result<u64, u32> {
    let mut headers = module_headers(headers);
    let mut id = 0u64;
    let body = body.map_or(ModuleBuffer::NULL, ModuleBuffer::of);
    // SAFETY: `owner` is live and of `start`'s kind (the caller's promise); `id` is valid for
    // writes; every buffer outlives the call (Envoy copies the request).
    let result = unsafe {
        start(
            owner,
            &mut id,
            ModuleBuffer::of(cluster.as_bytes()),
            headers.as_mut_ptr(),
            headers.len(),
            body,
            timeout_ms,
        )
    };
    if result == CALLOUT_SUCCESS {
        Ok(id)
    } else {
        Err(result)
    }
}

fn module_headers(headers: &[(&str, &str)]) -> Vec<ModuleHeader> {
    headers
        .iter()
        .map(|(k, v)| ModuleHeader {
            key_ptr: k.as_ptr(),
            key_length: k.len(),
            value_ptr: v.as_ptr(),
            value_length: v.len(),
        })
        .collect()
}

// Enum values, as abi.h numbers them.
/// `envoy_dynamic_module_type_http_header_type`.
pub const REQUEST_HEADER: u32 = 0;
pub const RESPONSE_HEADER: u32 = 2;
/// `envoy_dynamic_module_type_http_body_type`.
const RECEIVED_REQUEST_BODY: u32 = 0;
const BUFFERED_REQUEST_BODY: u32 = 1;
const RECEIVED_RESPONSE_BODY: u32 = 2;
const BUFFERED_RESPONSE_BODY: u32 = 3;
/// `envoy_dynamic_module_type_attribute_id_ResponseCodeDetails`.
const ATTRIBUTE_RESPONSE_CODE_DETAILS: u32 = 16;
/// `envoy_dynamic_module_type_http_callout_init_result_Success`.
const CALLOUT_SUCCESS: u32 = 0;
/// `envoy_dynamic_module_type_http_callout_result_Success`.
const CALLOUT_RESULT_SUCCESS: u32 = 0;
/// `envoy_dynamic_module_type_metrics_result_Success`.
const METRICS_SUCCESS: u32 = 0;
/// `envoy_dynamic_module_type_http_filter_stream_reset_reason_LocalReset`.
const RESET_LOCAL: u32 = 0;
/// `envoy_dynamic_module_type_log_level`: Trace 0, Debug 1, Info 2, Warn 3, Error 4.
pub const LOG_INFO: u32 = 2;
pub const LOG_WARN: u32 = 3;
pub const LOG_ERROR: u32 = 4;

/// The status values of the headers/body/trailers hooks (`..._status_Continue` is 0 in each).
pub const CONTINUE: u32 = 0;
/// Headers: `StopIteration`; body: `StopIterationAndBuffer`; trailers: `StopIteration`.
pub const STOP: u32 = 1;

// The callbacks Envoy exports, as abi.h declares them (only those used). `tests/symbols.rs`
// reads the names from this block.
extern "C" {
    fn envoy_dynamic_module_callback_log(level: u32, message: ModuleBuffer);
    fn envoy_dynamic_module_callback_is_validation_mode() -> bool;

    fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        filter_config_envoy_ptr: *mut c_void,
        name: ModuleBuffer,
        label_names: *mut ModuleBuffer,
        label_names_length: usize,
        counter_id_ptr: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_increment_counter(
        filter_envoy_ptr: *mut c_void,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_increment_counter(
        filter_config_envoy_ptr: *mut c_void,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;

    fn envoy_dynamic_module_callback_http_get_header(
        filter_envoy_ptr: *mut c_void,
        header_type: u32,
        key: ModuleBuffer,
        result_buffer: *mut EnvoyBuffer,
        index: usize,
        optional_size: *mut usize,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_set_header(
        filter_envoy_ptr: *mut c_void,
        header_type: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;

    fn envoy_dynamic_module_callback_http_send_response(
        filter_envoy_ptr: *mut c_void,
        status_code: u32,
        headers_vector: *mut ModuleHeader,
        headers_vector_size: usize,
        body: ModuleBuffer,
        details: ModuleBuffer,
    );

    fn envoy_dynamic_module_callback_http_get_body_size(
        filter_envoy_ptr: *mut c_void,
        body_type: u32,
    ) -> usize;
    fn envoy_dynamic_module_callback_http_get_body_chunks_size(
        filter_envoy_ptr: *mut c_void,
        body_type: u32,
    ) -> usize;
    fn envoy_dynamic_module_callback_http_get_body_chunks(
        filter_envoy_ptr: *mut c_void,
        body_type: u32,
        result_buffer_vector: *mut EnvoyBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_append_body(
        filter_envoy_ptr: *mut c_void,
        body_type: u32,
        data: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_drain_body(
        filter_envoy_ptr: *mut c_void,
        body_type: u32,
        number_of_bytes: usize,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_received_buffered_request_body(
        filter_envoy_ptr: *mut c_void,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_received_buffered_response_body(
        filter_envoy_ptr: *mut c_void,
    ) -> bool;

    fn envoy_dynamic_module_callback_http_filter_continue_decoding(filter_envoy_ptr: *mut c_void);
    fn envoy_dynamic_module_callback_http_filter_continue_encoding(filter_envoy_ptr: *mut c_void);
    fn envoy_dynamic_module_callback_http_filter_reset_stream(
        filter_envoy_ptr: *mut c_void,
        reason: u32,
        details: ModuleBuffer,
    );
    fn envoy_dynamic_module_callback_http_clear_route_cache(filter_envoy_ptr: *mut c_void);
    fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
        filter_envoy_ptr: *mut c_void,
        attribute_id: u32,
        result: *mut EnvoyBuffer,
    ) -> bool;

    fn envoy_dynamic_module_callback_http_filter_http_callout(
        filter_envoy_ptr: *mut c_void,
        callout_id_out: *mut u64,
        cluster_name: ModuleBuffer,
        headers: *mut ModuleHeader,
        headers_size: usize,
        body: ModuleBuffer,
        timeout_milliseconds: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_http_callout(
        filter_config_envoy_ptr: *mut c_void,
        callout_id_out: *mut u64,
        cluster_name: ModuleBuffer,
        headers: *mut ModuleHeader,
        headers_size: usize,
        body: ModuleBuffer,
        timeout_milliseconds: u64,
    ) -> u32;

    fn envoy_dynamic_module_callback_http_filter_config_scheduler_new(
        filter_config_envoy_ptr: *mut c_void,
    ) -> *mut c_void;
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
        scheduler_module_ptr: *mut c_void,
        event_id: u64,
    );
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_delete(
        scheduler_module_ptr: *mut c_void,
    );
}

/// Writes one line to Envoy's log under `[dynamic_modules]`.
pub fn log(level: u32, message: &str) {
    // SAFETY: the buffer points to `message`, alive for the call; Envoy copies it into its log.
    unsafe { envoy_dynamic_module_callback_log(level, ModuleBuffer::of(message.as_bytes())) }
}

/// Whether Envoy only validates its configuration (`--mode validate`). Main thread only.
pub fn is_validation_mode() -> bool {
    // SAFETY: no arguments; called from `on_http_filter_config_new`, on the main thread, as the
    // header requires.
    unsafe { envoy_dynamic_module_callback_is_validation_mode() }
}

/// Envoy's `DynamicModuleHttpFilter` of the current hook. Made only by the hooks below from the
/// pointer Envoy passes, and never kept past the hook (not `Send`, not stored).
#[derive(Clone, Copy)]
pub struct FilterEnvoy(NonNull<c_void>);

/// The two halves of an exchange, as header and body types.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Half {
    Request,
    Response,
}

impl Half {
    fn header_type(self) -> u32 {
        match self {
            Self::Request => REQUEST_HEADER,
            Self::Response => RESPONSE_HEADER,
        }
    }

    fn received(self) -> u32 {
        match self {
            Self::Request => RECEIVED_REQUEST_BODY,
            Self::Response => RECEIVED_RESPONSE_BODY,
        }
    }

    fn buffered(self) -> u32 {
        match self {
            Self::Request => BUFFERED_REQUEST_BODY,
            Self::Response => BUFFERED_RESPONSE_BODY,
        }
    }
}

impl FilterEnvoy {
    fn raw(self) -> *mut c_void {
        self.0.as_ptr()
    }

    /// Value `index` of a header, and how many values it has.
    fn header_at(self, half: Half, name: &str, index: usize) -> (Option<Vec<u8>>, usize) {
        let mut out = EnvoyBuffer::NULL;
        let mut count = 0usize;
        // SAFETY: the filter pointer is the live one of this hook; `name` outlives the call;
        // `out` and `count` are valid for writes (the header's PRECONDITION: non-null).
        let found = unsafe {
            envoy_dynamic_module_callback_http_get_header(
                self.raw(),
                half.header_type(),
                ModuleBuffer::of(name.as_bytes()),
                &mut out,
                index,
                &mut count,
            )
        };
        let value = (found && !out.ptr.is_null()).then(|| out.to_vec());
        (value, count)
    }

    /// The first value of a header.
    pub fn header(self, half: Half, name: &str) -> Option<Vec<u8>> {
        self.header_at(half, name, 0).0
    }

    /// Every value of a header, in order.
    pub fn header_values(self, half: Half, name: &str) -> Vec<Vec<u8>> {
        let (first, count) = self.header_at(half, name, 0);
        let Some(first) = first else {
            return Vec::new();
        };
        let mut values = vec![first];
        for index in 1..count {
            if let (Some(value), _) = self.header_at(half, name, index) {
                values.push(value);
            }
        }
        values
    }

    /// Replaces every value of a header; `None` removes it.
    pub fn set_header(self, half: Half, name: &str, value: Option<&str>) -> bool {
        let value = value.map_or(ModuleBuffer::NULL, |v| ModuleBuffer::of(v.as_bytes()));
        // SAFETY: live filter pointer; both buffers outlive the call (a null value removes).
        unsafe {
            envoy_dynamic_module_callback_http_set_header(
                self.raw(),
                half.header_type(),
                ModuleBuffer::of(name.as_bytes()),
                value,
            )
        }
    }

    fn chunks(self, body_type: u32) -> Vec<u8> {
        // SAFETY: live filter pointer.
        let n = unsafe {
            envoy_dynamic_module_callback_http_get_body_chunks_size(self.raw(), body_type)
        };
        if n == 0 {
            return Vec::new();
        }
        let mut chunks = vec![EnvoyBuffer::NULL; n];
        // SAFETY: `chunks` has room for the `n` buffers Envoy reported just before (the
        // header's PRECONDITION); nothing ran on this thread in between.
        let ok = unsafe {
            envoy_dynamic_module_callback_http_get_body_chunks(
                self.raw(),
                body_type,
                chunks.as_mut_ptr(),
            )
        };
        if !ok {
            return Vec::new();
        }
        chunks.into_iter().flat_map(EnvoyBuffer::to_vec).collect()
    }

    fn received_is_buffered(self, half: Half) -> bool {
        // SAFETY: live filter pointer.
        unsafe {
            match half {
                Half::Request => {
                    envoy_dynamic_module_callback_http_received_buffered_request_body(self.raw())
                }
                Half::Response => {
                    envoy_dynamic_module_callback_http_received_buffered_response_body(self.raw())
                }
            }
        }
    }

    /// The size of [`Self::body`], without copying it.
    pub fn body_size(self, half: Half, in_body_hook: bool) -> usize {
        // SAFETY: live filter pointer.
        let size = |t| unsafe { envoy_dynamic_module_callback_http_get_body_size(self.raw(), t) };
        let mut total = size(half.buffered());
        if in_body_hook && !self.received_is_buffered(half) {
            total = total.saturating_add(size(half.received()));
        }
        total
    }

    /// The whole body so far: what Envoy buffered for this filter, then the chunk of the
    /// current body hook (`in_body_hook`), unless that chunk is the buffer itself.
    pub fn body(self, half: Half, in_body_hook: bool) -> Vec<u8> {
        let mut body = self.chunks(half.buffered());
        if in_body_hook && !self.received_is_buffered(half) {
            body.extend(self.chunks(half.received()));
        }
        body
    }

    /// Replaces the whole body with `new`.
    pub fn replace_body(self, half: Half, in_body_hook: bool, new: &[u8]) -> bool {
        // SAFETY: live filter pointer; `usize::MAX` drains everything (the header: more than
        // the body drains the whole body); `new` outlives the append.
        unsafe {
            let mut ok = true;
            envoy_dynamic_module_callback_http_drain_body(self.raw(), half.buffered(), usize::MAX);
            let target = if in_body_hook && !self.received_is_buffered(half) {
                envoy_dynamic_module_callback_http_drain_body(
                    self.raw(),
                    half.received(),
                    usize::MAX,
                );
                half.received()
            } else {
                half.buffered()
            };
            if !new.is_empty() {
                ok = envoy_dynamic_module_callback_http_append_body(
                    self.raw(),
                    target,
                    ModuleBuffer::of(new),
                );
            }
            ok
        }
    }

    /// Answers the exchange locally.
    pub fn send_response(self, status: u32, headers: &[(&str, &str)], body: &[u8]) {
        let mut headers = module_headers(headers);
        // SAFETY: live filter pointer; the header array and every buffer it points to (the
        // caller's strings), the body and the details outlive the call.
        unsafe {
            envoy_dynamic_module_callback_http_send_response(
                self.raw(),
                status,
                headers.as_mut_ptr(),
                headers.len(),
                ModuleBuffer::of(body),
                ModuleBuffer::of(b"split_token"),
            )
        }
    }

    pub fn continue_decoding(self) {
        // SAFETY: live filter pointer.
        unsafe { envoy_dynamic_module_callback_http_filter_continue_decoding(self.raw()) }
    }

    pub fn continue_encoding(self) {
        // SAFETY: live filter pointer.
        unsafe { envoy_dynamic_module_callback_http_filter_continue_encoding(self.raw()) }
    }

    pub fn reset(self) {
        // SAFETY: live filter pointer; a static details string.
        unsafe {
            envoy_dynamic_module_callback_http_filter_reset_stream(
                self.raw(),
                RESET_LOCAL,
                ModuleBuffer::of(b"split_token_reset"),
            )
        }
    }

    pub fn clear_route_cache(self) {
        // SAFETY: live filter pointer.
        unsafe { envoy_dynamic_module_callback_http_clear_route_cache(self.raw()) }
    }

    /// `response.code_details`.
    pub fn response_code_details(self) -> Option<Vec<u8>> {
        let mut out = EnvoyBuffer::NULL;
        // SAFETY: live filter pointer; `out` is valid for writes.
        let ok = unsafe {
            envoy_dynamic_module_callback_http_filter_get_attribute_string(
                self.raw(),
                ATTRIBUTE_RESPONSE_CODE_DETAILS,
                &mut out,
            )
        };
        ok.then(|| out.to_vec())
    }

    pub fn increment_counter(self, id: usize, n: u64) -> bool {
        // SAFETY: live filter pointer; no labels (null, 0), as the counter was defined.
        unsafe {
            envoy_dynamic_module_callback_http_filter_increment_counter(
                self.raw(),
                id,
                ptr::null_mut(),
                0,
                n,
            ) == METRICS_SUCCESS
        }
    }

    /// Starts a callout; its answer comes to `on_http_filter_http_callout_done`.
    pub fn callout(
        self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout_ms: u64,
    ) -> Result<u64, u32> {
        // SAFETY: a live filter pointer, for the filter's own callout function.
        unsafe {
            start_callout(
                envoy_dynamic_module_callback_http_filter_http_callout,
                self.raw(),
                cluster,
                headers,
                body,
                timeout_ms,
            )
        }
    }
}

/// Envoy's `DynamicModuleHttpFilterConfig`: lives from `on_http_filter_config_new` until
/// `on_http_filter_config_destroy`, which comes after every filter made from it is destroyed.
#[derive(Debug)]
pub struct ConfigEnvoy(NonNull<c_void>);

// SAFETY: the config object is owned by Envoy and outlives the in-module config holding this
// pointer (destroyed in `on_http_filter_config_destroy`). From worker threads it is used only to
// increment counters, which are Envoy stats (atomic, thread-safe); callouts and schedulers are
// made on the main thread (see `module`).
unsafe impl Send for ConfigEnvoy {}
// SAFETY: as above: shared use is limited to thread-safe counter increments.
unsafe impl Sync for ConfigEnvoy {}

impl ConfigEnvoy {
    fn raw(&self) -> *mut c_void {
        self.0.as_ptr()
    }

    /// Defines a counter (main thread, in `on_http_filter_config_new`).
    pub fn define_counter(&self, name: &str) -> Option<usize> {
        let mut id = 0usize;
        // SAFETY: live config pointer; no labels; `id` is valid for writes.
        let result = unsafe {
            envoy_dynamic_module_callback_http_filter_config_define_counter(
                self.raw(),
                ModuleBuffer::of(name.as_bytes()),
                ptr::null_mut(),
                0,
                &mut id,
            )
        };
        (result == METRICS_SUCCESS).then_some(id)
    }

    pub fn increment_counter(&self, id: usize, n: u64) -> bool {
        // SAFETY: live config pointer; no labels, as defined.
        unsafe {
            envoy_dynamic_module_callback_http_filter_config_increment_counter(
                self.raw(),
                id,
                ptr::null_mut(),
                0,
                n,
            ) == METRICS_SUCCESS
        }
    }

    /// A callout of the config (main thread); the answer comes to
    /// `on_http_filter_config_http_callout_done`.
    pub fn callout(
        &self,
        cluster: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout_ms: u64,
    ) -> Result<u64, u32> {
        // SAFETY: a live config pointer, for the config's own callout function.
        unsafe {
            start_callout(
                envoy_dynamic_module_callback_http_filter_config_http_callout,
                self.raw(),
                cluster,
                headers,
                body,
                timeout_ms,
            )
        }
    }

    /// A scheduler that posts events to this config on the main thread.
    pub fn scheduler(&self) -> Option<Scheduler> {
        // SAFETY: live config pointer; the returned scheduler is owned by the module and
        // deleted in `Scheduler::drop`.
        let raw =
            unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_new(self.raw()) };
        NonNull::new(raw).map(Scheduler)
    }
}

/// A config scheduler: `commit` from any thread runs `on_http_filter_config_scheduled` on the
/// main thread. Deleted when dropped.
pub struct Scheduler(NonNull<c_void>);

// SAFETY: abi.h: the scheduler "is used to dispatch HTTP filter configuration operations to the
// main thread from any thread"; commit is the only call made off the main thread.
unsafe impl Send for Scheduler {}
// SAFETY: as above.
unsafe impl Sync for Scheduler {}

impl Scheduler {
    pub fn commit(&self, event: u64) {
        // SAFETY: the scheduler is alive until `drop`, which the owner runs only after the
        // thread calling this has been joined.
        unsafe {
            envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
                self.0.as_ptr(),
                event,
            )
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        // SAFETY: created by scheduler_new, deleted once, here.
        unsafe {
            envoy_dynamic_module_callback_http_filter_config_scheduler_delete(self.0.as_ptr())
        }
    }
}

/// Copies a finished callout's answer out of Envoy's memory.
fn answer(
    result: u32,
    headers: *const EnvoyHeader,
    headers_size: usize,
    chunks: *const EnvoyBuffer,
    chunks_size: usize,
) -> CalloutAnswer {
    if result != CALLOUT_RESULT_SUCCESS || headers.is_null() {
        return CalloutAnswer::default();
    }
    // SAFETY: abi.h: `headers` (and `body_chunks`) are arrays of `headers_size` (`body_chunks_size`)
    // elements owned by Envoy, valid until the end of this hook; both were checked non-null.
    let headers = unsafe { std::slice::from_raw_parts(headers, headers_size) };
    let status = headers.iter().find_map(|h| {
        let key = EnvoyBuffer {
            ptr: h.key_ptr,
            length: h.key_length,
        }
        .to_vec();
        (key == b":status").then(|| {
            EnvoyBuffer {
                ptr: h.value_ptr,
                length: h.value_length,
            }
            .to_vec()
        })
    });
    let body = if chunks.is_null() {
        Vec::new()
    } else {
        // SAFETY: as above.
        let chunks = unsafe { std::slice::from_raw_parts(chunks, chunks_size) };
        chunks.iter().flat_map(|c| c.to_vec()).collect()
    };
    CalloutAnswer {
        headers: headers_size,
        status,
        body,
    }
}

/// Runs a hook; a panic becomes `fallback` (and is logged without its payload, which could name
/// request data).
fn guard<T>(hook: &str, fallback: T, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(value) => value,
        Err(_) => {
            log(
                LOG_ERROR,
                &format!("split-token: panic in {hook}, failing closed"),
            );
            fallback
        }
    }
}

/// A stream hook: a panic resets the stream (fail closed) and stops it.
fn stream_hook(
    hook: &str,
    filter_envoy_ptr: *mut c_void,
    filter_module_ptr: *const c_void,
    f: impl FnOnce(&NativeFilter, FilterEnvoy) -> u32,
) -> u32 {
    let Some(envoy) = NonNull::new(filter_envoy_ptr).map(FilterEnvoy) else {
        return STOP;
    };
    if filter_module_ptr.is_null() {
        // `on_http_filter_new` failed (its guard returned null): no filter to decide, and a
        // stopped stream would only hang until Envoy's timeouts. Fail closed at once.
        reset(envoy);
        return STOP;
    }
    // SAFETY: a live filter pointer (Envoy passes it from `on_http_filter_new` until
    // `on_http_filter_destroy`, on this filter's worker thread only).
    let filter = unsafe { filter_rc(filter_module_ptr) };
    // After a panic in an earlier hook, nothing may act on the state it left half way.
    let decided = if filter.is_poisoned() {
        None
    } else {
        match catch_unwind(AssertUnwindSafe(|| f(&filter, envoy))) {
            Ok(status) => Some(status),
            Err(_) => {
                log(
                    LOG_ERROR,
                    &format!("split-token: panic in {hook}, stream reset"),
                );
                filter.poison();
                None
            }
        }
    };
    let status = decided.unwrap_or_else(|| {
        if !filter.is_destroyed() {
            reset(envoy);
        }
        STOP
    });
    // The hook's reference may be the last (Envoy destroyed the filter inside the hook): its
    // drop frees the stream, inside a guard too.
    let _ = catch_unwind(AssertUnwindSafe(move || drop(filter)));
    status
}

/// Resets a stream to fail it closed, itself behind a guard.
fn reset(envoy: FilterEnvoy) {
    let _ = catch_unwind(AssertUnwindSafe(|| envoy.reset()));
}

/// `Rc<NativeFilter>` from the pointer `on_http_filter_new` returned, as a reference of the
/// hook's own: Envoy may destroy the filter inside the hook (a local reply or a reset ends the
/// stream, and Envoy runs `on_http_filter_destroy` at once), and the filter must outlive the
/// hook still using it. It is dropped, on this thread, when the last of them goes.
///
/// # Safety
/// `ptr` must come from `Rc::into_raw` in `on_http_filter_new`, not yet destroyed, and be used
/// on the thread that made it (Envoy calls a filter's hooks on its worker thread only).
unsafe fn filter_rc(ptr: *const c_void) -> Rc<NativeFilter> {
    let ptr = ptr.cast::<NativeFilter>();
    // SAFETY: per the function's contract the Rc is alive and on its own thread; its count goes
    // up by one, and the returned Rc gives it back when dropped.
    unsafe {
        Rc::increment_strong_count(ptr);
        Rc::from_raw(ptr)
    }
}

/// `Arc<FilterConfig>` from the pointer `on_http_filter_config_new` returned, without taking
/// Envoy's reference.
///
/// # Safety
/// `ptr` must come from `Arc::into_raw` in `on_http_filter_config_new` and not yet be destroyed.
unsafe fn config_arc(ptr: *const c_void) -> Arc<FilterConfig> {
    let ptr = ptr.cast::<FilterConfig>();
    // SAFETY: per the function's contract the Arc is alive; its count goes up by one, and the
    // returned Arc gives it back when dropped.
    unsafe {
        Arc::increment_strong_count(ptr);
        Arc::from_raw(ptr)
    }
}

// ------------------------------------ Event hooks ------------------------------------

/// The ABI version this module was written against; 1.40.0 reports "matched" for it.
static ABI_VERSION: &[u8] = b"v0.2.0\0";

/// Replaces Rust's default panic hook (of this module's own runtime: Envoy and other modules
/// keep theirs), which prints the panic's message and a backtrace to Envoy's stderr: a message
/// may hold request data. This one logs where it happened, never what it said; the hook's guard
/// then logs what it did about it.
fn quiet_panic_hook(info: &std::panic::PanicHookInfo<'_>) {
    let at = info
        .location()
        .map(|l| format!(" at {}:{}", l.file(), l.line()))
        .unwrap_or_default();
    log(LOG_ERROR, &format!("split-token: panic{at}"));
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const u8 {
    guard("on_program_init", (), || {
        std::panic::set_hook(Box::new(quiet_panic_hook));
    });
    ABI_VERSION.as_ptr()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    filter_config_envoy_ptr: *mut c_void,
    name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> *const c_void {
    let Some(envoy) = NonNull::new(filter_config_envoy_ptr) else {
        return ptr::null();
    };
    guard(
        "on_http_filter_config_new",
        ptr::null(),
        || match module::config_new(ConfigEnvoy(envoy), &name.to_vec(), &config.to_vec()) {
            Some(config) => Arc::into_raw(config).cast(),
            None => ptr::null(),
        },
    )
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(
    filter_config_ptr: *const c_void,
) {
    if filter_config_ptr.is_null() {
        return;
    }
    guard("on_http_filter_config_destroy", (), || {
        // SAFETY: the pointer came from `Arc::into_raw` in config_new; Envoy destroys it once:
        // this gives back the reference Envoy held.
        let config = unsafe { Arc::from_raw(filter_config_ptr.cast::<FilterConfig>()) };
        module::config_destroy(&config);
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
    _filter_config_envoy_ptr: *mut c_void,
    filter_config_ptr: *const c_void,
    event_id: u64,
) {
    if filter_config_ptr.is_null() {
        return;
    }
    guard("on_http_filter_config_scheduled", (), || {
        // SAFETY: a live config pointer from config_new (events stop before its destroy).
        let config = unsafe { config_arc(filter_config_ptr) };
        module::config_scheduled(&config, event_id);
    })
}

#[no_mangle]
#[allow(clippy::too_many_arguments)] // the ABI's signature
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
    _filter_config_envoy_ptr: *mut c_void,
    filter_config_ptr: *const c_void,
    callout_id: u64,
    result: u32,
    headers: *const EnvoyHeader,
    headers_size: usize,
    body_chunks: *const EnvoyBuffer,
    body_chunks_size: usize,
) {
    if filter_config_ptr.is_null() {
        return;
    }
    guard("on_http_filter_config_http_callout_done", (), || {
        // SAFETY: a live config pointer from config_new.
        let config = unsafe { config_arc(filter_config_ptr) };
        let answer = answer(result, headers, headers_size, body_chunks, body_chunks_size);
        module::config_callout_done(&config, callout_id, answer);
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_new(
    _name: EnvoyBuffer,
    _config: EnvoyBuffer,
) -> *const c_void {
    // No per-route configuration: refusing one tells the operator at once.
    log(
        LOG_ERROR,
        "split-token: per-route configuration is not supported",
    );
    ptr::null()
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_destroy(
    _config: *const c_void,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
    filter_config_ptr: *const c_void,
    filter_envoy_ptr: *mut c_void,
) -> *const c_void {
    if filter_config_ptr.is_null() || filter_envoy_ptr.is_null() {
        return ptr::null();
    }
    guard("on_http_filter_new", ptr::null(), || {
        // SAFETY: a live config pointer from config_new (Envoy keeps it alive for its filters).
        let config = unsafe { config_arc(filter_config_ptr) };
        Rc::into_raw(Rc::new(module::filter_new(config))).cast()
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_destroy(filter_module_ptr: *const c_void) {
    if filter_module_ptr.is_null() {
        return;
    }
    guard("on_http_filter_destroy", (), || {
        // SAFETY: from `Rc::into_raw` in filter_new, on this worker thread; Envoy destroys each
        // filter once: this gives back Envoy's reference. A hook still running on the filter
        // (the one that ended the stream) holds its own, so the filter goes when that returns.
        let filter = unsafe { Rc::from_raw(filter_module_ptr.cast::<NativeFilter>()) };
        module::filter_destroy(&filter);
    })
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    filter_envoy_ptr: *mut c_void,
    filter_module_ptr: *const c_void,
    end_of_stream: bool,
) -> u32 {
    stream_hook(
        "request_headers",
        filter_envoy_ptr,
        filter_module_ptr,
        |f, e| f.request_headers(e, end_of_stream),
    )
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    filter_envoy_ptr: *mut c_void,
    filter_module_ptr: *const c_void,
    end_of_stream: bool,
) -> u32 {
    stream_hook(
        "request_body",
        filter_envoy_ptr,
        filter_module_ptr,
        |f, e| f.request_body(e, end_of_stream),
    )
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    filter_envoy_ptr: *mut c_void,
    filter_module_ptr: *const c_void,
) -> u32 {
    stream_hook(
        "request_trailers",
        filter_envoy_ptr,
        filter_module_ptr,
        |f, e| f.request_trailers(e),
    )
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    filter_envoy_ptr: *mut c_void,
    filter_module_ptr: *const c_void,
    end_of_stream: bool,
) -> u32 {
    stream_hook(
        "response_headers",
        filter_envoy_ptr,
        filter_module_ptr,
        |f, e| f.response_headers(e, end_of_stream),
    )
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    filter_envoy_ptr: *mut c_void,
    filter_module_ptr: *const c_void,
    end_of_stream: bool,
) -> u32 {
    stream_hook(
        "response_body",
        filter_envoy_ptr,
        filter_module_ptr,
        |f, e| f.response_body(e, end_of_stream),
    )
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    filter_envoy_ptr: *mut c_void,
    filter_module_ptr: *const c_void,
) -> u32 {
    stream_hook(
        "response_trailers",
        filter_envoy_ptr,
        filter_module_ptr,
        |f, e| f.response_trailers(e),
    )
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
) {
}

#[no_mangle]
#[allow(clippy::too_many_arguments)] // the ABI's signature
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    filter_envoy_ptr: *mut c_void,
    filter_module_ptr: *const c_void,
    callout_id: u64,
    result: u32,
    headers: *const EnvoyHeader,
    headers_size: usize,
    body_chunks: *const EnvoyBuffer,
    body_chunks_size: usize,
) {
    stream_hook(
        "http_callout_done",
        filter_envoy_ptr,
        filter_module_ptr,
        |f, e| {
            let answer = answer(result, headers, headers_size, body_chunks, body_chunks_size);
            f.callout_done(e, callout_id, answer);
            CONTINUE
        },
    );
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
    _event_id: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_local_reply(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
    _response_code: u32,
    _details: EnvoyBuffer,
    _reset_imminent: bool,
) -> u32 {
    CONTINUE
}

// Hooks Envoy resolves for every module but this filter never triggers (it starts no streamed
// callouts and is not a terminal filter): exported as no-ops.

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
    _stream_id: u64,
    _headers: *const EnvoyHeader,
    _headers_size: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
    _stream_id: u64,
    _data: *const EnvoyBuffer,
    _data_count: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
    _stream_id: u64,
    _trailers: *const EnvoyHeader,
    _trailers_size: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
    _stream_id: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
    _stream_id: u64,
    _reason: u32,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_headers(
    _filter_config_envoy_ptr: *mut c_void,
    _filter_config_ptr: *const c_void,
    _stream_id: u64,
    _headers: *const EnvoyHeader,
    _headers_size: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_data(
    _filter_config_envoy_ptr: *mut c_void,
    _filter_config_ptr: *const c_void,
    _stream_id: u64,
    _data: *const EnvoyBuffer,
    _data_count: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_trailers(
    _filter_config_envoy_ptr: *mut c_void,
    _filter_config_ptr: *const c_void,
    _stream_id: u64,
    _trailers: *const EnvoyHeader,
    _trailers_size: usize,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_complete(
    _filter_config_envoy_ptr: *mut c_void,
    _filter_config_ptr: *const c_void,
    _stream_id: u64,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_config_http_stream_reset(
    _filter_config_envoy_ptr: *mut c_void,
    _filter_config_ptr: *const c_void,
    _stream_id: u64,
    _reason: u32,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
) {
}

#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _filter_envoy_ptr: *mut c_void,
    _filter_module_ptr: *const c_void,
) {
}
