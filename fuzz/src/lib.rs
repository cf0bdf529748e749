//! Properties of every parser and rewriter of `split-token-core`, for `cargo fuzz`.
//!
//! Each public function takes the fuzzer's bytes and panics when a property fails: that is how a
//! fuzz target reports a finding. The `fuzz_targets/*.rs` binaries are one-line wrappers, and
//! the `replay` test below runs every checked-in input (`corpus/<target>/` seeds and
//! `regressions/<target>/` minimized findings) through the same functions on stable `cargo test`,
//! so a fixed bug stays fixed without a nightly toolchain.
//!
//! Targets whose input is first-byte `0` switch to a structured mode: the rest of the bytes drive
//! `arbitrary` to build well-formed tokens, bodies, configurations or operation sequences, which
//! random bytes would rarely reach; any other first byte feeds the bytes to the parser as they
//! are.
//!
//! | target | code under test |
//! |---|---|
//! | [`jws`] | `token`: `is_base64url`, `Signature`, `StoreKey`, `CompactJws` |
//! | [`authorization`] | `request`: `parse_authorization`, `authorize` |
//! | [`token_response`] | `response`: `classify`, `split` |
//! | [`slot`] | `store`: `entries`, `find`, `insert`, `Store` against a model |
//! | [`config`] | `config`: `Config::from_json`, `Config::route` |
//! | [`claims`] | `claims`: `ClaimPath`, `check_header_name`, `render`, `project` |
//! | [`jwks`] | `verify::KeySet::parse`, `keys::on_response`, `verify::verify` |
//! | [`revocation`] | `revoke`: `parse_form`, `encode_form`, `revoke` |
//! | [`introspect`] | `introspect`: `authenticate`, `introspect` |
//! | [`etcd`] | `etcd`: calls and answers, `Sweeps` and `Watermark` against a simulated etcd, `RecentRevocations` and `Leases` against models, `miss_key`, `adopt`, `apply_markers`; `StoreKey::to_hex`/`from_hex`, `revoke::remote_candidate` |
#![forbid(unsafe_code)]
// A fuzz target reports a violated property by panicking, so asserts, `unwrap`/`expect` and
// indexing on what must hold, and `panic!`, are the point of this crate, not a hazard.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod authorization;
mod claims;
mod config;
mod etcd;
mod introspect;
mod jwks;
mod jws;
mod revocation;
mod slot;
mod support;
mod token_response;

pub use authorization::authorization;
pub use claims::claims;
pub use config::config;
pub use etcd::etcd;
pub use introspect::introspect;
pub use jwks::jwks;
pub use jws::jws;
pub use revocation::revocation;
pub use slot::slot;
pub use token_response::token_response;

/// A target's property: panics when the input violates it.
pub type Property = fn(&[u8]);

/// Every target by name, as `cargo fuzz` knows it: the replay test walks this list.
pub const TARGETS: [(&str, Property); 10] = [
    ("jws", jws),
    ("authorization", authorization),
    ("token_response", token_response),
    ("slot", slot),
    ("config", config),
    ("claims", claims),
    ("jwks", jwks),
    ("revocation", revocation),
    ("introspect", introspect),
    ("etcd", etcd),
];

#[cfg(test)]
mod tests {
    use super::TARGETS;
    use std::path::Path;

    fn inputs(dir: &Path) -> Vec<std::path::PathBuf> {
        let Ok(read) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut files: Vec<_> = read
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        files
    }

    /// Every seed and every minimized finding still satisfies its target's properties.
    #[test]
    fn replay() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for (name, property) in TARGETS {
            let seeds = inputs(&root.join("corpus").join(name));
            assert!(!seeds.is_empty(), "corpus/{name}/ has no seeds");
            for path in seeds
                .iter()
                .chain(&inputs(&root.join("regressions").join(name)))
            {
                let data = std::fs::read(path).unwrap();
                let outcome = std::panic::catch_unwind(|| property(&data));
                assert!(outcome.is_ok(), "{name}: {} fails", path.display());
            }
        }
    }

    /// Every target has a binary, so `cargo fuzz list` and this list cannot drift apart.
    #[test]
    fn every_target_has_a_binary() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for (name, _) in TARGETS {
            let bin = root.join("fuzz_targets").join(format!("{name}.rs"));
            let text = std::fs::read_to_string(&bin).unwrap();
            assert!(
                text.contains(&format!("split_token_fuzz::{name}(")),
                "{name}"
            );
        }
    }
}
