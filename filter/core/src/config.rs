//! Filter configuration: a raw serde struct, then a validated [`Config`].
//!
//! Parsing is two steps so that every check lives in one place and every error names the
//! field it is about (`store_slots: must be between 1 and 4194304, got 0`). Envoy hands the
//! JSON to `on_configure`; an error there makes the filter refuse the configuration.

use crate::claims::{check_header_name, ClaimHeader, ClaimPath};
use crate::token::verify::{KeySet, Policy, DEFAULT_ALGORITHMS, SUPPORTED_ALGORITHMS};
use serde::Deserialize;
use std::fmt;

/// Upper bound for `store_slots`: every slot is created at configuration time (about 120 bytes
/// of Envoy memory each when empty), so 4 Mi slots (~0.5 GiB) is the sane ceiling.
pub const MAX_STORE_SLOTS: u32 = 1 << 22;
/// Upper bound for `slot_capacity`: a slot is copied whole on every lookup, so it must stay small.
pub const MAX_SLOT_CAPACITY: u16 = 64;
/// Upper bound for `local_cache_entries`, per worker.
pub const MAX_LOCAL_CACHE_ENTRIES: usize = 1_000_000;
/// Upper bound for `max_token_response_bytes`; Envoy's own buffer limit (1 MiB by default)
/// usually bites first.
pub const MAX_TOKEN_RESPONSE_BYTES: usize = 16 << 20;

/// What to do with a full three-part JWT presented by a client instead of a signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FullJwtPolicy {
    /// Reject it as `invalid_token`: clients of this gateway only ever hold signatures.
    #[default]
    Reject,
    /// Forward it unchanged (for a migration period; the upstream must verify it).
    Allow,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    token_paths: Vec<String>,
    #[serde(default)]
    revocation_paths: Vec<String>,
    #[serde(default)]
    logout_paths: Vec<String>,
    #[serde(default)]
    introspection: Option<RawIntrospection>,
    #[serde(default)]
    public_prefixes: Vec<String>,
    #[serde(default)]
    full_jwt: FullJwtPolicy,
    #[serde(default)]
    strip_response_fields: Vec<String>,
    #[serde(default = "defaults::max_ttl_seconds")]
    max_ttl_seconds: u64,
    #[serde(default = "defaults::store_slots")]
    store_slots: u32,
    #[serde(default = "defaults::slot_capacity")]
    slot_capacity: u16,
    #[serde(default = "defaults::store_prefix")]
    store_prefix: String,
    #[serde(default = "defaults::realm")]
    realm: String,
    #[serde(default = "defaults::max_token_response_bytes")]
    max_token_response_bytes: usize,
    #[serde(default)]
    verify: Option<RawVerify>,
    #[serde(default)]
    claims_to_headers: Vec<RawClaimHeader>,
    #[serde(default = "defaults::forward_jwt")]
    forward_jwt: bool,
    #[serde(default = "defaults::local_cache_entries")]
    local_cache_entries: usize,
    #[serde(default = "defaults::recompute_route")]
    recompute_route: bool,
    #[serde(default)]
    allow_on_headers_stop_iteration: bool,
    #[serde(default)]
    etcd: Option<RawEtcd>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEtcd {
    cluster: String,
    #[serde(default)]
    authority: Option<String>,
    #[serde(default = "defaults::etcd_key_prefix")]
    key_prefix: String,
    #[serde(default = "defaults::etcd_timeout_ms")]
    timeout_ms: u64,
    #[serde(default)]
    per_try_timeout_ms: Option<u64>,
    #[serde(default = "defaults::etcd_retries")]
    retries: u32,
    #[serde(default = "defaults::etcd_poll_ms")]
    poll_ms: u64,
    #[serde(default = "defaults::etcd_lease_bucket_seconds")]
    lease_bucket_seconds: u64,
    #[serde(default = "defaults::etcd_max_pending_lookups")]
    max_pending_lookups: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVerify {
    #[serde(default)]
    jwks: Option<serde_json::Value>,
    #[serde(default)]
    jwks_cluster: Option<String>,
    #[serde(default)]
    jwks_path: Option<String>,
    #[serde(default)]
    jwks_authority: Option<String>,
    #[serde(default = "defaults::refresh_seconds")]
    refresh_seconds: u64,
    #[serde(default = "defaults::fetch_timeout_ms")]
    fetch_timeout_ms: u64,
    #[serde(default = "defaults::min_refetch_seconds")]
    min_refetch_seconds: u64,
    #[serde(default)]
    algorithms: Option<Vec<String>>,
    #[serde(default)]
    issuer: Option<String>,
    #[serde(default)]
    audiences: Vec<String>,
    #[serde(default = "defaults::leeway_seconds")]
    leeway_seconds: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIntrospection {
    paths: Vec<String>,
    clients: Vec<RawIntrospectionClient>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIntrospectionClient {
    client_id: String,
    client_secret_sha256: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClaimHeader {
    claim: RawClaim,
    header: String,
}

/// `"realm_access.roles"`, or `["https://example.com/roles"]` for names that contain dots.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawClaim {
    Dotted(String),
    Segments(Vec<String>),
}

mod defaults {
    pub fn max_ttl_seconds() -> u64 {
        86_400
    }
    pub fn store_slots() -> u32 {
        65_536
    }
    pub fn slot_capacity() -> u16 {
        8
    }
    pub fn store_prefix() -> String {
        "split-token/".to_owned()
    }
    pub fn realm() -> String {
        "split-token".to_owned()
    }
    pub fn max_token_response_bytes() -> usize {
        64 * 1024
    }
    pub fn forward_jwt() -> bool {
        true
    }
    pub fn local_cache_entries() -> usize {
        4096
    }
    pub fn recompute_route() -> bool {
        true
    }
    pub fn refresh_seconds() -> u64 {
        300
    }
    pub fn fetch_timeout_ms() -> u64 {
        5_000
    }
    pub fn min_refetch_seconds() -> u64 {
        30
    }
    pub fn leeway_seconds() -> u64 {
        60
    }
    pub fn etcd_key_prefix() -> String {
        "split-token/".to_owned()
    }
    pub fn etcd_timeout_ms() -> u64 {
        3_000
    }
    pub fn etcd_per_try_timeout_ms() -> u64 {
        500
    }
    pub fn etcd_retries() -> u32 {
        10
    }
    pub fn etcd_poll_ms() -> u64 {
        500
    }
    pub fn etcd_lease_bucket_seconds() -> u64 {
        60
    }
    pub fn etcd_max_pending_lookups() -> u32 {
        256
    }
}

/// Where verification keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// An inline JWKS, parsed at load.
    Inline(KeySet),
    /// Fetched through an Envoy cluster with `dispatch_http_call`.
    Remote {
        cluster: String,
        /// The JWKS path; `None` means discover it from `/.well-known/openid-configuration`.
        path: Option<String>,
        authority: String,
    },
}

/// The validated `verify` block.
#[derive(Debug, Clone)]
pub struct VerifyConfig {
    pub source: KeySource,
    pub policy: Policy,
    pub refresh_seconds: u64,
    pub fetch_timeout_ms: u64,
    pub min_refetch_seconds: u64,
}

/// RFC 7662 introspection: where, and which resource servers may ask.
#[derive(Debug, Clone)]
pub struct IntrospectionConfig {
    /// Exact paths answered by the filter itself.
    pub paths: Vec<String>,
    /// `(client_id, SHA-256 of the client secret)` of each allowed caller.
    pub clients: Vec<(String, [u8; 32])>,
}

/// The validated `etcd` block: the tier that shares tokens and revocations between replicas.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// The Envoy cluster of etcd's v3 JSON gateway.
    pub cluster: String,
    /// `:authority` of the calls.
    pub authority: String,
    /// Prefix of every etcd key the filter writes.
    pub key_prefix: String,
    /// Deadline of each etcd operation, its retries included.
    pub timeout_ms: u64,
    /// Timeout of one attempt; a timed-out attempt is retried like a 5xx.
    pub per_try_timeout_ms: u64,
    /// The retry policy of every call (`retries`: how many times Envoy retries an attempt that
    /// failed, on another member when the cluster has one; every call is idempotent), as Envoy
    /// request headers (`x-envoy-retry-on`...), formatted once.
    pub retry_headers: Vec<(&'static str, String)>,
    /// Shared-data prefix of the revocations applied lately in this process
    /// ([`crate::replicas::etcd::RecentRevocations`]).
    pub recent_prefix: String,
    /// Shared-data key of the revocation poller's lease ([`crate::replicas::etcd::PollerLease`]).
    pub poller_key: String,
    /// How often each worker asks for new revocations.
    pub poll_ms: u64,
    /// Width of the expiry buckets that share one lease.
    pub lease_bucket_seconds: u64,
    /// etcd reads of unknown signatures one worker may have under way; more get a 503.
    pub max_pending_lookups: u32,
}

/// A validated filter configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Exact request paths (query ignored) whose responses carry tokens to split.
    pub token_paths: Vec<String>,
    /// Exact paths of RFC 7009 revocation endpoints: the token is revoked here and at the IdP.
    pub revocation_paths: Vec<String>,
    /// Exact paths of logout endpoints called with the token: revoked here, then forwarded.
    pub logout_paths: Vec<String>,
    /// RFC 7662 introspection answered by the gateway, when configured.
    pub introspection: Option<IntrospectionConfig>,
    /// Path prefixes that pass through without a token.
    pub public_prefixes: Vec<String>,
    /// What a full JWT presented by a client means.
    pub full_jwt: FullJwtPolicy,
    /// Top-level fields removed from token responses.
    pub strip_response_fields: Vec<String>,
    /// Upper bound on how long a split token stays in the store.
    pub max_ttl_seconds: u64,
    /// Number of shared-data keys the store may ever create.
    pub store_slots: u32,
    /// Entries one slot holds before it evicts.
    pub slot_capacity: u16,
    /// Prefix of every shared-data key (Istio gives all plugins one namespace).
    pub store_prefix: String,
    /// The store's revocation epoch key ([`crate::store::epoch_key`]), made once.
    pub epoch_key: String,
    /// `WWW-Authenticate` header value for requests without credentials, precomputed.
    pub challenge: String,
    /// `WWW-Authenticate` header value for invalid tokens, precomputed.
    pub challenge_invalid_token: String,
    /// `WWW-Authenticate` header value for malformed requests, precomputed.
    pub challenge_invalid_request: String,
    /// `WWW-Authenticate` for a DPoP-bound token presented the wrong way, precomputed.
    pub challenge_dpop_invalid_token: String,
    /// `WWW-Authenticate` for a DPoP request without a usable proof, precomputed.
    pub challenge_dpop_invalid_proof: String,
    /// `WWW-Authenticate` for introspection callers without valid client credentials.
    pub challenge_basic: String,
    /// Largest token response body the filter buffers.
    pub max_token_response_bytes: usize,
    /// Verification at issuance, when configured.
    pub verify: Option<VerifyConfig>,
    /// Claims projected into request headers.
    pub claims_to_headers: Vec<ClaimHeader>,
    /// Whether upstreams get the rebuilt JWT in `Authorization`.
    pub forward_jwt: bool,
    /// Rebuilt requests each worker keeps for repeat hits (0: none).
    pub local_cache_entries: usize,
    /// Have Envoy recompute the route after identity headers changed (when claims are mapped).
    pub recompute_route: bool,
    /// Envoy lets this filter stop in a headers callback and still see the body (its own
    /// `allow_on_headers_stop_iteration`, which Istio's WasmPlugin and Envoy Gateway cannot
    /// set). Then held messages keep their headers until the body decided, and a token response
    /// that cannot be split becomes a 502. Without it (the default, which cannot stall) headers
    /// go on first and such a response is reset.
    pub allow_on_headers_stop_iteration: bool,
    /// Tokens and revocations shared with other replicas through etcd, when configured.
    pub etcd: Option<EtcdConfig>,
}

/// Why a configuration was refused. Each variant names the field at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// The plugin was given no configuration at all.
    Missing,
    /// The JSON did not parse or did not fit the schema (unknown field, wrong type...).
    Syntax { message: String },
    /// A field has a value outside what the filter accepts.
    Invalid { field: String, reason: String },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing => f.write_str("configuration: missing (token_paths is required)"),
            Self::Syntax { message } => write!(f, "configuration: {message}"),
            Self::Invalid { field, reason } => write!(f, "{field}: {reason}"),
        }
    }
}

impl std::error::Error for ConfigError {}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

impl Config {
    /// Parses and validates the plugin configuration bytes.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ConfigError::Missing);
        }
        let raw: RawConfig = serde_json::from_slice(bytes).map_err(|e| ConfigError::Syntax {
            message: e.to_string(),
        })?;
        if let Some(e) = serde_json::from_slice(bytes)
            .ok()
            .as_ref()
            .and_then(array_for_object)
        {
            return Err(e);
        }
        Self::try_from(raw)
    }
}

/// Where the configuration gives an array for an object. serde reads a struct from an array
/// too, field by field in declaration order, so such a configuration would silently change
/// meaning whenever a field is added (`[["/t"], ["/health/"]]` made `/health/` a public prefix,
/// then a revocation path). Only objects configure.
fn array_for_object(config: &serde_json::Value) -> Option<ConfigError> {
    use serde_json::Value;
    let array = |field: String| Some(invalid(field, "must be a JSON object, not an array"));
    if config.is_array() {
        return Some(ConfigError::Syntax {
            message: "expected a JSON object, not an array".to_owned(),
        });
    }
    for field in ["verify", "introspection", "etcd"] {
        if config.get(field).is_some_and(Value::is_array) {
            return array(field.to_owned());
        }
    }
    fn items(v: Option<&Value>) -> impl Iterator<Item = (usize, &Value)> {
        v.and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
    }
    for (i, m) in items(config.get("claims_to_headers")) {
        if m.is_array() {
            return array(format!("claims_to_headers[{i}]"));
        }
    }
    let clients = config.get("introspection").and_then(|v| v.get("clients"));
    for (i, c) in items(clients) {
        if c.is_array() {
            return array(format!("introspection.clients[{i}]"));
        }
    }
    None
}

fn check_path(field: &str, index: usize, path: &str) -> Result<(), ConfigError> {
    let field = format!("{field}[{index}]");
    if path.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if !path.starts_with('/') {
        return Err(invalid(field, format!("{path:?} must start with '/'")));
    }
    if path.contains(['?', '#']) || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(invalid(
            field,
            format!(
                "{path:?} must be a plain path (no query, fragment, space or control character)"
            ),
        ));
    }
    Ok(())
}

fn introspection_config(raw: RawIntrospection) -> Result<IntrospectionConfig, ConfigError> {
    if raw.paths.is_empty() {
        return Err(invalid(
            "introspection.paths",
            "must name at least one path",
        ));
    }
    if raw.clients.is_empty() {
        return Err(invalid(
            "introspection.clients",
            "must name at least one client: introspection answers only authenticated callers",
        ));
    }
    let mut clients = Vec::with_capacity(raw.clients.len());
    for (i, c) in raw.clients.into_iter().enumerate() {
        if c.client_id.is_empty() || c.client_id.contains(':') {
            return Err(invalid(
                format!("introspection.clients[{i}].client_id"),
                "must be non-empty and contain no ':'",
            ));
        }
        let Some(digest) = crate::token::StoreKey::from_hex(&c.client_secret_sha256) else {
            return Err(invalid(
                format!("introspection.clients[{i}].client_secret_sha256"),
                "must be the SHA-256 of the secret as 64 hex digits (sha256sum prints it)",
            ));
        };
        clients.push((c.client_id, digest.0));
    }
    Ok(IntrospectionConfig {
        paths: raw.paths,
        clients,
    })
}

/// A realm is put inside a quoted-string; keep it to printable ASCII without quote or backslash.
fn check_realm(realm: &str) -> Result<(), ConfigError> {
    if realm.is_empty() || realm.len() > 128 {
        return Err(invalid("realm", "must be 1 to 128 characters"));
    }
    if realm
        .bytes()
        .any(|b| !(b' '..=b'~').contains(&b) || b == b'"' || b == b'\\')
    {
        return Err(invalid(
            "realm",
            format!("{realm:?} must be printable ASCII without '\"' or '\\'"),
        ));
    }
    Ok(())
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Self, ConfigError> {
        if raw.token_paths.is_empty() {
            return Err(invalid("token_paths", "must name at least one path"));
        }
        for (i, p) in raw.token_paths.iter().enumerate() {
            check_path("token_paths", i, p)?;
        }
        let mut handled: Vec<&str> = raw.token_paths.iter().map(String::as_str).collect();
        let no_paths = Vec::new();
        let introspection_paths = raw.introspection.as_ref().map_or(&no_paths, |i| &i.paths);
        for (field, paths) in [
            ("revocation_paths", &raw.revocation_paths),
            ("logout_paths", &raw.logout_paths),
            ("introspection.paths", introspection_paths),
        ] {
            for (i, p) in paths.iter().enumerate() {
                check_path(field, i, p)?;
                if handled.contains(&p.as_str()) {
                    return Err(invalid(
                        format!("{field}[{i}]"),
                        format!("{p:?} is already a token, revocation or logout path"),
                    ));
                }
                handled.push(p);
            }
        }
        for (i, p) in raw.public_prefixes.iter().enumerate() {
            check_path("public_prefixes", i, p)?;
            if let Some(t) = handled.iter().find(|t| t.starts_with(p.as_str())) {
                return Err(invalid(
                    format!("public_prefixes[{i}]"),
                    format!("{p:?} would make path {t:?} public; token, revocation and logout paths are handled on their own"),
                ));
            }
        }
        for (i, f) in raw.strip_response_fields.iter().enumerate() {
            let field = format!("strip_response_fields[{i}]");
            if f.is_empty() {
                return Err(invalid(field, "must not be empty"));
            }
            if f == "access_token" {
                return Err(invalid(
                    field,
                    "\"access_token\" cannot be stripped: it carries the signature",
                ));
            }
        }
        if raw.max_ttl_seconds == 0 || raw.max_ttl_seconds > 366 * 86_400 {
            return Err(invalid(
                "max_ttl_seconds",
                format!(
                    "must be between 1 and 31622400, got {}",
                    raw.max_ttl_seconds
                ),
            ));
        }
        if raw.store_slots == 0 || raw.store_slots > MAX_STORE_SLOTS {
            return Err(invalid(
                "store_slots",
                format!(
                    "must be between 1 and {MAX_STORE_SLOTS}, got {}",
                    raw.store_slots
                ),
            ));
        }
        if raw.slot_capacity == 0 || raw.slot_capacity > MAX_SLOT_CAPACITY {
            return Err(invalid(
                "slot_capacity",
                format!(
                    "must be between 1 and {MAX_SLOT_CAPACITY}, got {}",
                    raw.slot_capacity
                ),
            ));
        }
        if raw.store_prefix.is_empty() || raw.store_prefix.len() > 256 {
            return Err(invalid("store_prefix", "must be 1 to 256 characters"));
        }
        check_realm(&raw.realm)?;
        if raw.max_token_response_bytes < 256
            || raw.max_token_response_bytes > MAX_TOKEN_RESPONSE_BYTES
        {
            return Err(invalid(
                "max_token_response_bytes",
                format!(
                    "must be between 256 and {MAX_TOKEN_RESPONSE_BYTES}, got {}",
                    raw.max_token_response_bytes
                ),
            ));
        }
        if raw.local_cache_entries > MAX_LOCAL_CACHE_ENTRIES {
            return Err(invalid(
                "local_cache_entries",
                format!(
                    "must be at most {MAX_LOCAL_CACHE_ENTRIES}, got {}",
                    raw.local_cache_entries
                ),
            ));
        }
        let introspection = raw.introspection.map(introspection_config).transpose()?;
        let etcd = raw
            .etcd
            .map(|e| etcd_config(e, &raw.store_prefix))
            .transpose()?;
        let verify = raw.verify.map(verify_config).transpose()?;
        let claims_to_headers = claim_headers(raw.claims_to_headers)?;
        let challenge = format!("Bearer realm=\"{}\"", raw.realm);
        Ok(Self {
            verify,
            claims_to_headers,
            forward_jwt: raw.forward_jwt,
            local_cache_entries: raw.local_cache_entries,
            recompute_route: raw.recompute_route,
            allow_on_headers_stop_iteration: raw.allow_on_headers_stop_iteration,
            challenge_invalid_token: format!("{challenge}, error=\"invalid_token\""),
            challenge_invalid_request: format!("{challenge}, error=\"invalid_request\""),
            challenge_dpop_invalid_token: format!(
                "DPoP realm=\"{}\", error=\"invalid_token\"",
                raw.realm
            ),
            challenge_basic: format!("Basic realm=\"{}\"", raw.realm),
            challenge_dpop_invalid_proof: format!(
                "DPoP realm=\"{}\", error=\"invalid_dpop_proof\"",
                raw.realm
            ),
            challenge,
            token_paths: raw.token_paths,
            revocation_paths: raw.revocation_paths,
            logout_paths: raw.logout_paths,
            introspection,
            etcd,
            public_prefixes: raw.public_prefixes,
            full_jwt: raw.full_jwt,
            strip_response_fields: raw.strip_response_fields,
            max_ttl_seconds: raw.max_ttl_seconds,
            store_slots: raw.store_slots,
            slot_capacity: raw.slot_capacity,
            epoch_key: crate::store::epoch_key(&raw.store_prefix),
            store_prefix: raw.store_prefix,
            max_token_response_bytes: raw.max_token_response_bytes,
        })
    }
}

fn claim_headers(raw: Vec<RawClaimHeader>) -> Result<Vec<ClaimHeader>, ConfigError> {
    let mut out: Vec<ClaimHeader> = Vec::with_capacity(raw.len());
    for (i, m) in raw.into_iter().enumerate() {
        let claim = match m.claim {
            RawClaim::Dotted(path) => ClaimPath::parse(&path).ok_or_else(|| {
                invalid(
                    format!("claims_to_headers[{i}].claim"),
                    format!("{path:?} is not a dotted claim path"),
                )
            })?,
            RawClaim::Segments(segments) => {
                ClaimPath::from_segments(segments).ok_or_else(|| {
                    invalid(
                        format!("claims_to_headers[{i}].claim"),
                        "a list of claim names must be non-empty, without empty names",
                    )
                })?
            }
        };
        let header = check_header_name(&m.header)
            .map_err(|reason| invalid(format!("claims_to_headers[{i}].header"), reason))?;
        if out.iter().any(|c| c.header == header) {
            return Err(invalid(
                format!("claims_to_headers[{i}].header"),
                format!("{header:?} is already mapped"),
            ));
        }
        out.push(ClaimHeader { claim, header });
    }
    Ok(out)
}

fn etcd_config(raw: RawEtcd, store_prefix: &str) -> Result<EtcdConfig, ConfigError> {
    if raw.cluster.is_empty() {
        return Err(invalid("etcd.cluster", "must not be empty"));
    }
    let authority = raw.authority.unwrap_or_else(|| raw.cluster.clone());
    if authority.is_empty() || authority.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(invalid(
            "etcd.authority",
            format!("{authority:?} must be a host name without spaces or control characters"),
        ));
    }
    if raw.key_prefix.is_empty() || raw.key_prefix.len() > 256 {
        return Err(invalid("etcd.key_prefix", "must be 1 to 256 characters"));
    }
    if !(50..=60_000).contains(&raw.timeout_ms) {
        return Err(invalid(
            "etcd.timeout_ms",
            format!("must be between 50 and 60000, got {}", raw.timeout_ms),
        ));
    }
    let per_try_timeout_ms = raw
        .per_try_timeout_ms
        .unwrap_or_else(|| defaults::etcd_per_try_timeout_ms().min(raw.timeout_ms));
    if !(10..=raw.timeout_ms).contains(&per_try_timeout_ms) {
        return Err(invalid(
            "etcd.per_try_timeout_ms",
            format!(
                "must be between 10 and timeout_ms ({}), got {per_try_timeout_ms}",
                raw.timeout_ms
            ),
        ));
    }
    if raw.retries > 20 {
        return Err(invalid(
            "etcd.retries",
            format!("must be between 0 and 20, got {}", raw.retries),
        ));
    }
    if !(100..=60_000).contains(&raw.poll_ms) {
        return Err(invalid(
            "etcd.poll_ms",
            format!("must be between 100 and 60000, got {}", raw.poll_ms),
        ));
    }
    if !(1..=3_600).contains(&raw.lease_bucket_seconds) {
        return Err(invalid(
            "etcd.lease_bucket_seconds",
            format!(
                "must be between 1 and 3600, got {}",
                raw.lease_bucket_seconds
            ),
        ));
    }
    if !(1..=100_000).contains(&raw.max_pending_lookups) {
        return Err(invalid(
            "etcd.max_pending_lookups",
            format!(
                "must be between 1 and 100000, got {}",
                raw.max_pending_lookups
            ),
        ));
    }
    Ok(EtcdConfig {
        max_pending_lookups: raw.max_pending_lookups,
        cluster: raw.cluster,
        authority,
        key_prefix: raw.key_prefix.clone(),
        timeout_ms: raw.timeout_ms,
        per_try_timeout_ms,
        retry_headers: retry_headers(raw.retries, per_try_timeout_ms),
        recent_prefix: format!("{store_prefix}etcd-recent/"),
        poller_key: format!("{store_prefix}etcd-poller/{}", raw.key_prefix),
        poll_ms: raw.poll_ms,
        lease_bucket_seconds: raw.lease_bucket_seconds,
    })
}

/// Envoy's retry policy for etcd calls, set per request: callouts from a filter have no route,
/// so no route retry policy, but Envoy's router honours these headers on them. 5xx covers etcd's
/// 503s during a leader election ("leader changed", "request timed out") and per-try timeouts;
/// connect failures and resets cover a member that died. Back-off is Envoy's (jittered, 25 ms
/// doubling to 250 ms).
fn retry_headers(retries: u32, per_try_timeout_ms: u64) -> Vec<(&'static str, String)> {
    if retries == 0 {
        return Vec::new();
    }
    vec![
        (
            "x-envoy-retry-on",
            "5xx,reset,connect-failure,refused-stream".to_owned(),
        ),
        ("x-envoy-max-retries", retries.to_string()),
        (
            "x-envoy-upstream-rq-per-try-timeout-ms",
            per_try_timeout_ms.to_string(),
        ),
    ]
}

fn verify_config(raw: RawVerify) -> Result<VerifyConfig, ConfigError> {
    let source = match (raw.jwks, raw.jwks_cluster) {
        (Some(jwks), None) => {
            let keys = KeySet::parse(jwks.to_string().as_bytes(), true)
                .map_err(|e| invalid("verify.jwks", e.to_string()))?;
            KeySource::Inline(keys)
        }
        (None, Some(cluster)) => {
            if cluster.is_empty() {
                return Err(invalid("verify.jwks_cluster", "must not be empty"));
            }
            if let Some(path) = &raw.jwks_path {
                if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
                    return Err(invalid(
                        "verify.jwks_path",
                        format!("{path:?} must be a path starting with '/'"),
                    ));
                }
            }
            KeySource::Remote {
                authority: raw.jwks_authority.unwrap_or_else(|| cluster.clone()),
                path: raw.jwks_path,
                cluster,
            }
        }
        _ => {
            return Err(invalid(
                "verify",
                "set exactly one of jwks (inline keys) and jwks_cluster (fetched keys)",
            ))
        }
    };
    let algorithms = raw
        .algorithms
        .unwrap_or_else(|| DEFAULT_ALGORITHMS.iter().map(|a| (*a).to_owned()).collect());
    if algorithms.is_empty() {
        return Err(invalid(
            "verify.algorithms",
            "must name at least one algorithm",
        ));
    }
    for (i, alg) in algorithms.iter().enumerate() {
        let field = format!("verify.algorithms[{i}]");
        if alg.eq_ignore_ascii_case("none") {
            return Err(invalid(field, "\"none\" is never allowed"));
        }
        if !SUPPORTED_ALGORITHMS.contains(&alg.as_str()) {
            return Err(invalid(
                field,
                format!("{alg:?} is not one of {}", SUPPORTED_ALGORITHMS.join(", ")),
            ));
        }
        if alg.starts_with("HS") {
            let has_secret = matches!(&source, KeySource::Inline(keys) if keys.has_symmetric());
            if !has_secret {
                return Err(invalid(
                    field,
                    format!("{alg} needs an inline jwks with an \"oct\" key"),
                ));
            }
        }
    }
    if !(1..=86_400).contains(&raw.refresh_seconds) {
        return Err(invalid(
            "verify.refresh_seconds",
            format!("must be between 1 and 86400, got {}", raw.refresh_seconds),
        ));
    }
    if raw.min_refetch_seconds > 3_600 {
        return Err(invalid(
            "verify.min_refetch_seconds",
            format!("must be at most 3600, got {}", raw.min_refetch_seconds),
        ));
    }
    if !(100..=60_000).contains(&raw.fetch_timeout_ms) {
        return Err(invalid(
            "verify.fetch_timeout_ms",
            format!(
                "must be between 100 and 60000, got {}",
                raw.fetch_timeout_ms
            ),
        ));
    }
    if raw.leeway_seconds > 600 {
        return Err(invalid("verify.leeway_seconds", "must be at most 600"));
    }
    for (i, a) in raw.audiences.iter().enumerate() {
        if a.is_empty() {
            return Err(invalid(
                format!("verify.audiences[{i}]"),
                "must not be empty",
            ));
        }
    }
    Ok(VerifyConfig {
        source,
        policy: Policy {
            algorithms,
            issuer: raw.issuer,
            audiences: raw.audiences,
            leeway_seconds: raw.leeway_seconds,
        },
        refresh_seconds: raw.refresh_seconds,
        fetch_timeout_ms: raw.fetch_timeout_ms,
        min_refetch_seconds: raw.min_refetch_seconds,
    })
}

/// What the filter does with a request, decided from its path alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// A token endpoint: its response is split.
    TokenEndpoint,
    /// A revocation endpoint (RFC 7009): the body names the token to revoke.
    Revocation,
    /// A logout endpoint: authorized like an API call, and the token is revoked.
    Logout,
    /// An introspection endpoint (RFC 7662), answered by the filter.
    Introspection,
    /// A public prefix: passed through untouched.
    Public,
    /// Everything else: a valid token is required.
    Protected,
}

impl Config {
    /// Whether tokens can be revoked, so workers must watch the revocation epoch. With etcd,
    /// another replica may revoke any token.
    pub fn revocation_enabled(&self) -> bool {
        !self.revocation_paths.is_empty() || !self.logout_paths.is_empty() || self.etcd.is_some()
    }

    /// Classifies a request by its `:path` (query string and fragment ignored).
    pub fn route(&self, path: &[u8]) -> Route {
        let end = path
            .iter()
            .position(|&b| b == b'?' || b == b'#')
            .unwrap_or(path.len());
        let path = path.get(..end).unwrap_or(path);
        let exact = |paths: &[String]| paths.iter().any(|t| t.as_bytes() == path);
        if exact(&self.token_paths) {
            Route::TokenEndpoint
        } else if exact(&self.revocation_paths) {
            Route::Revocation
        } else if exact(&self.logout_paths) {
            Route::Logout
        } else if self.introspection.as_ref().is_some_and(|i| exact(&i.paths)) {
            Route::Introspection
        } else if self
            .public_prefixes
            .iter()
            .any(|p| path.starts_with(p.as_bytes()))
        {
            Route::Public
        } else {
            Route::Protected
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Config, ConfigError> {
        Config::from_json(json.as_bytes())
    }

    fn field_of(err: ConfigError) -> String {
        match err {
            ConfigError::Invalid { field, .. } => field,
            other => panic!("expected an Invalid error, got {other:?}"),
        }
    }

    #[test]
    fn parse_config_minimal_uses_defaults() {
        let c = parse(r#"{"token_paths": ["/auth/token"]}"#).unwrap();
        assert_eq!(c.token_paths, ["/auth/token"]);
        assert_eq!(c.full_jwt, FullJwtPolicy::Reject);
        assert_eq!(c.max_ttl_seconds, 86_400);
        assert_eq!(c.store_slots, 65_536);
        assert_eq!(c.slot_capacity, 8);
        assert_eq!(c.store_prefix, "split-token/");
        assert_eq!(c.challenge, "Bearer realm=\"split-token\"");
        assert_eq!(
            c.challenge_invalid_token,
            "Bearer realm=\"split-token\", error=\"invalid_token\""
        );
    }

    #[test]
    fn parse_config_happy_path() {
        let c = parse(
            r#"{"token_paths": ["/auth/token", "/oauth/token"], "public_prefixes": ["/health"],
                "full_jwt": "allow", "strip_response_fields": ["refresh_token"],
                "max_ttl_seconds": 2, "store_slots": 16, "slot_capacity": 2,
                "store_prefix": "st:", "realm": "api", "max_token_response_bytes": 4096}"#,
        )
        .unwrap();
        assert_eq!(c.full_jwt, FullJwtPolicy::Allow);
        assert_eq!(c.strip_response_fields, ["refresh_token"]);
        assert_eq!(c.store_slots, 16);
        assert_eq!(c.challenge, "Bearer realm=\"api\"");
    }

    #[test]
    fn parse_config_invalid_data_names_the_field() {
        let cases = [
            (r#"{"token_paths": []}"#, "token_paths"),
            (r#"{"token_paths": [""]}"#, "token_paths[0]"),
            (r#"{"token_paths": ["/a", "b"]}"#, "token_paths[1]"),
            (r#"{"token_paths": ["/a?x=1"]}"#, "token_paths[0]"),
            (
                r#"{"token_paths": ["/a"], "public_prefixes": ["/"]}"#,
                "public_prefixes[0]",
            ),
            (
                r#"{"token_paths": ["/a"], "public_prefixes": [""]}"#,
                "public_prefixes[0]",
            ),
            (
                r#"{"token_paths": ["/a"], "strip_response_fields": ["access_token"]}"#,
                "strip_response_fields[0]",
            ),
            (
                r#"{"token_paths": ["/a"], "max_ttl_seconds": 0}"#,
                "max_ttl_seconds",
            ),
            (
                r#"{"token_paths": ["/a"], "store_slots": 0}"#,
                "store_slots",
            ),
            (
                r#"{"token_paths": ["/a"], "store_slots": 16777217}"#,
                "store_slots",
            ),
            (
                r#"{"token_paths": ["/a"], "slot_capacity": 0}"#,
                "slot_capacity",
            ),
            (
                r#"{"token_paths": ["/a"], "store_prefix": ""}"#,
                "store_prefix",
            ),
            (r#"{"token_paths": ["/a"], "realm": "a\"b"}"#, "realm"),
            (
                r#"{"token_paths": ["/a"], "max_token_response_bytes": 1}"#,
                "max_token_response_bytes",
            ),
        ];
        for (json, field) in cases {
            let err = parse(json).unwrap_err();
            assert!(err.to_string().starts_with(field), "{json}: {err}");
            assert_eq!(field_of(err), field, "{json}");
        }
    }

    #[test]
    fn parse_config_syntax_errors_name_the_field() {
        let err = parse(r#"{"token_paths": ["/a"], "store_slot": 3}"#).unwrap_err();
        assert!(
            err.to_string().contains("unknown field `store_slot`"),
            "{err}"
        );
        let err = parse(r#"{"public_prefixes": []}"#).unwrap_err();
        assert!(
            err.to_string().contains("missing field `token_paths`"),
            "{err}"
        );
        let err = parse(r#"{"token_paths": ["/a"], "full_jwt": "maybe"}"#).unwrap_err();
        assert!(err.to_string().contains("maybe"), "{err}");
        assert_eq!(parse("  ").unwrap_err(), ConfigError::Missing);
    }

    #[test]
    fn positional_arrays_are_not_configuration() {
        // Found by fuzz target config: `[["/"]]` was accepted, serde filling the fields by
        // position, so the meaning of such a configuration moved whenever a field was added.
        assert!(matches!(
            parse(r#"[["/t"], ["/health/"]]"#),
            Err(ConfigError::Syntax { .. })
        ));
        let nested = [
            (r#""verify": [null, "idp"]"#, "verify"),
            (
                r#""claims_to_headers": [["sub", "x-user-id"]]"#,
                "claims_to_headers[0]",
            ),
            (r#""introspection": [["/i"], []]"#, "introspection"),
            (r#""etcd": ["etcd"]"#, "etcd"),
            (
                r#""introspection": {"paths": ["/i"], "clients": [["c", "00"]]}"#,
                "introspection.clients[0]",
            ),
        ];
        for (member, field) in nested {
            let err = parse(&format!(r#"{{"token_paths": ["/t"], {member}}}"#)).unwrap_err();
            assert_eq!(field_of(err), field, "{member}");
        }
    }

    #[test]
    fn parse_etcd_defaults_and_limits() {
        let c = parse(r#"{"token_paths": ["/a"], "etcd": {"cluster": "etcd"}}"#).unwrap();
        let etcd = c.etcd.as_ref().unwrap();
        assert_eq!(
            (
                etcd.authority.as_str(),
                etcd.key_prefix.as_str(),
                etcd.timeout_ms,
                etcd.poll_ms,
                etcd.lease_bucket_seconds
            ),
            ("etcd", "split-token/", 3_000, 500, 60)
        );
        // Envoy retries a failed attempt on another member; the headers are made once.
        assert_eq!(
            etcd.retry_headers,
            [
                (
                    "x-envoy-retry-on",
                    "5xx,reset,connect-failure,refused-stream".to_owned()
                ),
                ("x-envoy-max-retries", "10".to_owned()),
                ("x-envoy-upstream-rq-per-try-timeout-ms", "500".to_owned()),
            ]
        );
        let once =
            parse(r#"{"token_paths": ["/a"], "etcd": {"cluster": "e", "retries": 0}}"#).unwrap();
        assert_eq!(once.etcd.map(|e| e.retry_headers), Some(vec![]));
        // Without its own, an attempt may take the whole of a short timeout.
        let short =
            parse(r#"{"token_paths": ["/a"], "etcd": {"cluster": "e", "timeout_ms": 300}}"#)
                .unwrap();
        assert_eq!(short.etcd.map(|e| e.per_try_timeout_ms), Some(300));
        // Shared data of the etcd tier sits under the store's prefix.
        assert_eq!(
            (etcd.recent_prefix.as_str(), etcd.poller_key.as_str()),
            (
                "split-token/etcd-recent/",
                "split-token/etcd-poller/split-token/"
            )
        );
        // Another replica may revoke any token, so caches must watch the epoch.
        assert!(c.revocation_enabled());
        assert!(!parse(r#"{"token_paths": ["/a"]}"#)
            .unwrap()
            .revocation_enabled());
        let cases = [
            (r#"{"cluster": ""}"#, "etcd.cluster"),
            (r#"{"cluster": "e", "authority": "a b"}"#, "etcd.authority"),
            (r#"{"cluster": "e", "key_prefix": ""}"#, "etcd.key_prefix"),
            (r#"{"cluster": "e", "timeout_ms": 10}"#, "etcd.timeout_ms"),
            (
                r#"{"cluster": "e", "timeout_ms": 400, "per_try_timeout_ms": 401}"#,
                "etcd.per_try_timeout_ms",
            ),
            (
                r#"{"cluster": "e", "per_try_timeout_ms": 5}"#,
                "etcd.per_try_timeout_ms",
            ),
            (r#"{"cluster": "e", "retries": 21}"#, "etcd.retries"),
            (r#"{"cluster": "e", "poll_ms": 60001}"#, "etcd.poll_ms"),
            (
                r#"{"cluster": "e", "lease_bucket_seconds": 0}"#,
                "etcd.lease_bucket_seconds",
            ),
            (
                r#"{"cluster": "e", "max_pending_lookups": 0}"#,
                "etcd.max_pending_lookups",
            ),
        ];
        for (etcd, field) in cases {
            let err = parse(&format!(r#"{{"token_paths": ["/a"], "etcd": {etcd}}}"#)).unwrap_err();
            assert_eq!(field_of(err), field, "{etcd}");
        }
        let err = parse(r#"{"token_paths": ["/a"], "etcd": {}}"#).unwrap_err();
        assert!(err.to_string().contains("cluster"), "{err}");
    }

    #[test]
    fn parse_verify_and_claims() {
        let c = parse(
            r#"{"token_paths": ["/a"], "forward_jwt": false,
                "claims_to_headers": [{"claim": "realm_access.roles", "header": "X-User-Roles"}],
                "verify": {"jwks_cluster": "idp", "issuer": "https://idp", "audiences": ["api"]}}"#,
        )
        .unwrap();
        assert!(!c.forward_jwt);
        assert_eq!(c.claims_to_headers[0].header, "x-user-roles");
        let namespaced = parse(
            r#"{"token_paths": ["/a"], "claims_to_headers": [{"claim": ["https://x.io/roles"], "header": "x-r"}]}"#,
        )
        .unwrap();
        assert_eq!(
            namespaced.claims_to_headers[0].claim.to_string(),
            "https://x.io/roles"
        );
        let v = c.verify.unwrap();
        assert!(matches!(
            &v.source,
            KeySource::Remote { cluster, path: None, authority } if cluster == "idp" && authority == "idp"
        ));
        assert_eq!(v.policy.algorithms, DEFAULT_ALGORITHMS);
        assert_eq!(v.policy.issuer.as_deref(), Some("https://idp"));
        let inline = parse(
            r#"{"token_paths": ["/a"], "verify": {"algorithms": ["HS256"],
                "jwks": {"keys": [{"kty": "oct", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQ"}]}}}"#,
        )
        .unwrap();
        assert!(matches!(
            inline.verify.unwrap().source,
            KeySource::Inline(_)
        ));
        assert!(parse(r#"{"token_paths": ["/a"]}"#).unwrap().forward_jwt);
    }

    #[test]
    fn route_ignores_query_and_matches_token_paths_exactly() {
        let c =
            parse(r#"{"token_paths": ["/auth/token"], "public_prefixes": ["/public/"]}"#).unwrap();
        assert_eq!(c.route(b"/auth/token"), Route::TokenEndpoint);
        assert_eq!(c.route(b"/auth/token?x=1"), Route::TokenEndpoint);
        assert_eq!(c.route(b"/auth/token#f"), Route::TokenEndpoint);
        assert_eq!(c.route(b"/auth/token/"), Route::Protected);
        assert_eq!(c.route(b"/auth/tokens"), Route::Protected);
        assert_eq!(c.route(b"/public/x?y"), Route::Public);
        assert_eq!(c.route(b"/public"), Route::Protected);
        assert_eq!(c.route(b"/api"), Route::Protected);
    }
}
