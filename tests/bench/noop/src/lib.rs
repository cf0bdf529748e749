//! The floor of any Wasm filter: a root context that configures nothing, and HTTP contexts whose
//! every callback continues (the SDK's defaults). What `just bench` compares the token hit
//! against: the cost of the VM, the ABI crossings Envoy makes for every callback, and nothing of
//! split-token's own.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Noop) });
}}

struct Noop;

impl Context for Noop {}

impl RootContext for Noop {
    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Noop))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

impl HttpContext for Noop {}
