//! The floor of any Wasm filter: a root context that configures nothing, and HTTP contexts whose
//! every callback continues (the SDK's defaults). What `just bench` compares the token hit
//! against: the cost of the VM, the ABI crossings Envoy makes for every callback, and nothing of
//! split-token's own.
//!
//! With the plugin configuration `rewrite`, each request also makes the three host calls no
//! token hit can do without, and nothing else: it reads `:path` and `Authorization` and replaces
//! `Authorization` with a JWT-sized value. That row is the floor of a hit through the proxy-wasm
//! ABI.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MapType};

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Noop { rewrite: false }) });
}}

/// A rebuilt `Authorization` of a typical RS256 JWT's size.
const REWRITTEN: &str = concat!(
    "Bearer eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCIsImtpZCI6ImsxIn0.",
    "eyJzdWIiOiJhbGljZSIsInJvbGVzIjoidXNlcixhZG1pbiIsImVtYWlsIjoiYWxpY2VAZXhhbXBsZS5jb20ifQ.",
    "c2lnbmF0dXJlLWJ5dGVzLWZvci10ZXN0cy1zaWduYXR1cmUtYnl0ZXMtZm9yLXRlc3RzLXNpZ25hdHVyZS1ieXRlcy1m",
    "b3ItdGVzdHMtc2lnbmF0dXJlLWJ5dGVzLWZvci10ZXN0cy1zaWduYXR1cmUtYnl0ZXMtZm9yLXRlc3RzLXNpZ25hdHVy",
    "ZS1ieXRlcy1mb3ItdGVzdHMtc2lnbmF0dXJlLWJ5dGVzLWZvci10ZXN0cy1zaWduYXR1cmUtYnl0ZXMtZm9yLXRlc3Rz",
    "LXNpZ25hdHVyZS1ieXRlcy1mb3ItdGVzdHMtc2lnbmF0dXJlLWJ5dGVzLWZvci10ZXN0cy1zaWduYXR1cmUtYnl0ZXMt",
);

struct Noop {
    rewrite: bool,
}

impl Context for Noop {}

impl RootContext for Noop {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX);
        self.rewrite = matches!(config, Ok(Some(bytes)) if bytes == b"rewrite");
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Noop {
            rewrite: self.rewrite,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

impl HttpContext for Noop {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.rewrite {
            let path = hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, ":path");
            let authorization =
                hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, "authorization");
            if matches!((path, authorization), (Ok(Some(_)), Ok(Some(_)))) {
                let _ = hostcalls::set_map_value(
                    MapType::HttpRequestHeaders,
                    "authorization",
                    Some(REWRITTEN),
                );
            }
        }
        Action::Continue
    }
}
