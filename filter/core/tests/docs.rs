//! The reference docs cannot drift from the code (issue 11): every configuration field the
//! parser accepts is in `docs/config.md`'s field tables and every field there is accepted; every
//! counter is in the Stats table of `docs/config.md` and in `docs/operations.md` (with its
//! Prometheus name), and those docs name no counter the filter does not export.
//!
//! The parser is asked, not copied: serde's error for an unknown field lists the fields a struct
//! accepts, so probing each object with a field that cannot exist reads the accepted names off
//! the real `Config::from_json`, nested objects and lists of objects included.

// A test binary: a panic is how its helpers report a failure.
#![allow(clippy::panic)]

use split_token_core::config::Config;
use split_token_core::stats::Counter;
use std::collections::BTreeSet;
use std::path::Path;

const PROBE: &str = "__probe__";

fn doc(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../docs")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The names between backticks in `text`.
fn backticked(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

/// A configuration whose object at `path` (field names; `[]` for "an element of this list")
/// holds only `value`.
fn nested(path: &[&str], value: serde_json::Value) -> serde_json::Value {
    path.iter().rev().fold(value, |inner, step| match *step {
        "[]" => serde_json::Value::Array(vec![inner]),
        field => serde_json::json!({ field: inner }),
    })
}

/// The fields the struct at `path` accepts, read off the parser's unknown-field error; `None`
/// when the value at `path` is not a struct.
fn accepted_fields(path: &[&str]) -> Option<Vec<String>> {
    let config = nested(path, serde_json::json!({ PROBE: 1 }));
    let err = Config::from_json(config.to_string().as_bytes()).err()?;
    let message = err.to_string();
    let (_, expected) = message.split_once(&format!("unknown field `{PROBE}`, expected "))?;
    Some(
        backticked(expected)
            .into_iter()
            .map(str::to_owned)
            .collect(),
    )
}

/// Every field the parser accepts, dotted from the root (`etcd.poll_ms`,
/// `introspection.clients[].client_id`).
fn parser_fields() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut todo: Vec<Vec<String>> = vec![vec![]];
    while let Some(path) = todo.pop() {
        let steps: Vec<&str> = path.iter().map(String::as_str).collect();
        let fields = accepted_fields(&steps)
            .unwrap_or_else(|| panic!("the parser does not read {steps:?} as an object"));
        for field in fields {
            let mut child = path.clone();
            child.push(field);
            out.insert(dotted(&child));
            let steps: Vec<&str> = child.iter().map(String::as_str).collect();
            if accepted_fields(&steps).is_some() {
                todo.push(child);
            } else {
                let mut element = child;
                element.push("[]".to_owned());
                let steps: Vec<&str> = element.iter().map(String::as_str).collect();
                if accepted_fields(&steps).is_some() {
                    todo.push(element);
                }
            }
        }
    }
    out
}

fn dotted(path: &[String]) -> String {
    path.join(".").replace(".[]", "[]")
}

/// The fields named in `docs/config.md`'s field tables (`| field | ...`), each prefixed with the
/// first backticked name of the heading above its table (`## \`etcd\`: ...` gives `etcd.`).
fn documented_fields(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut parent: Option<String> = None;
    let mut in_table = false;
    for line in text.lines() {
        if line.starts_with('#') {
            parent = backticked(line).first().map(|s| (*s).to_owned());
            in_table = false;
        } else if line.starts_with("| field |") {
            in_table = true;
        } else if in_table && line.starts_with("|---") {
        } else if in_table && line.starts_with('|') {
            let first = line.split('|').nth(1).unwrap_or_default();
            for name in backticked(first) {
                out.insert(match &parent {
                    Some(p) => format!("{p}.{name}"),
                    None => name.to_owned(),
                });
            }
        } else {
            in_table = false;
        }
    }
    out
}

fn counter_names() -> BTreeSet<String> {
    Counter::ALL
        .iter()
        .map(|c| c.name().trim_start_matches("split_token.").to_owned())
        .collect()
}

/// The text of the `## heading` section, up to the next `## `.
fn section<'a>(text: &'a str, heading: &str) -> &'a str {
    let (_, rest) = text
        .split_once(&format!("\n## {heading}\n"))
        .unwrap_or_default();
    rest.split("\n## ").next().unwrap_or_default()
}

fn assert_counters_documented(documented: &BTreeSet<String>, doc_name: &str) {
    assert_same("counters", &counter_names(), documented, doc_name);
}

/// Fails with the names each side has that the other lacks.
fn assert_same(what: &str, code: &BTreeSet<String>, docs: &BTreeSet<String>, doc_name: &str) {
    let undocumented: Vec<_> = code.difference(docs).collect();
    let unknown: Vec<_> = docs.difference(code).collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "{what}: missing from {doc_name}: {undocumented:?}; in {doc_name} but not in the code: {unknown:?}"
    );
}

#[test]
fn every_config_field_is_documented_and_every_documented_field_is_accepted() {
    let code = parser_fields();
    // The probe must have found the nested objects, or the test would prove little.
    for nested in [
        "etcd.poll_ms",
        "verify.jwks_cluster",
        "introspection.clients[].client_id",
        "claims_to_headers[].header",
    ] {
        assert!(
            code.contains(nested),
            "probe did not find {nested}: {code:?}"
        );
    }
    // A list's element fields are documented under the list's name, with or without `[]`.
    let flat = |names: BTreeSet<String>| names.iter().map(|n| n.replace("[]", "")).collect();
    assert_same(
        "configuration fields",
        &flat(code),
        &flat(documented_fields(&doc("config.md"))),
        "docs/config.md",
    );
}

#[test]
fn the_readme_summary_names_every_top_level_field() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .unwrap_or_default();
    let documented = documented_fields(section(&readme, "Configuration"));
    let code: BTreeSet<String> = accepted_fields(&[])
        .unwrap_or_default()
        .into_iter()
        .collect();
    assert!(!code.is_empty());
    assert_same(
        "top-level configuration fields",
        &code,
        &documented,
        "README.md#configuration",
    );
}

#[test]
fn every_counter_is_in_the_stats_table_of_the_config_reference() {
    let text = doc("config.md");
    let documented: BTreeSet<String> = section(&text, "Stats")
        .lines()
        .filter(|l| l.starts_with("| `"))
        .flat_map(|l| backticked(l.split('|').nth(1).unwrap_or_default()))
        .map(str::to_owned)
        .collect();
    assert_counters_documented(&documented, "docs/config.md#stats");
}

#[test]
fn every_counter_is_in_the_operations_guide_with_its_prometheus_name() {
    let text = doc("operations.md");
    let names: BTreeSet<&str> = backticked(&text).into_iter().collect();
    let documented: BTreeSet<String> = names
        .iter()
        .filter_map(|n| n.strip_prefix("split_token."))
        .map(str::to_owned)
        .collect();
    assert_counters_documented(&documented, "docs/operations.md");
    for counter in Counter::ALL {
        // Envoy's /stats/prometheus drops the `wasmcustom.` namespace and turns dots into `_`.
        let prometheus = counter.name().replace('.', "_");
        assert!(
            names.contains(prometheus.as_str()),
            "docs/operations.md lacks `{prometheus}`"
        );
    }
}
