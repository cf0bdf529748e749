//! Token types, named by how far they may be trusted.
//!
//! - [`CompactJws`]: text that parsed as `header.payload.signature` with a JSON header naming an
//!   algorithm. Its signature has *not* been checked.
//! - [`Signature`]: the third segment, which clients hold as their opaque access token. It is a
//!   bearer credential and is never stored or logged.
//! - [`StoreKey`]: SHA-256 of the signature text. It addresses the store and cannot be turned
//!   back into a credential.
//!
//! A `CompactJws` becomes trusted only through [`verify`], against the IdP's keys.

pub mod verify;

use jwt_compact::{ParseError, UntrustedToken};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::fmt;

/// Longest signature accepted from a client. An RSA-8192 signature is 1366 base64url characters.
pub const MAX_SIGNATURE_LEN: usize = 2048;

/// Why a token string is not a compact JWS the filter can split.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum JwsError {
    /// Not three dot-separated segments.
    Structure { segments: usize },
    /// jwt-compact refused the header or the encoding.
    Parse { reason: String },
    /// The payload is not a JSON object with usable registered claims.
    Claims { reason: String },
    /// The signature segment is empty, too long, or not base64url.
    Signature { len: usize },
}

impl fmt::Display for JwsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Structure { segments } => {
                write!(f, "access_token is not a compact JWS: {segments} segment(s), not 3")
            }
            Self::Parse { reason } => write!(f, "access_token is not a compact JWS: {reason}"),
            Self::Claims { reason } => write!(f, "access_token payload: {reason}"),
            Self::Signature { len } => write!(
                f,
                "access_token signature segment ({len} characters) is not 1 to {MAX_SIGNATURE_LEN} base64url characters"
            ),
        }
    }
}

impl std::error::Error for JwsError {}

/// The base64url alphabet (no padding), by byte.
// Evaluated by the compiler: an index out of range would fail the build, never a request.
#[allow(clippy::indexing_slicing)]
const BASE64URL: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        table[i] = b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
        i += 1;
    }
    table
};

/// Whether `s` is non-empty, bounded and made only of the base64url alphabet (no padding).
pub fn is_base64url(s: &[u8]) -> bool {
    !s.is_empty() && s.len() <= MAX_SIGNATURE_LEN && s.iter().all(|&b| in_base64url(b))
}

fn in_base64url(b: u8) -> bool {
    // A u8 indexes a 256-entry table: the bound check folds away.
    BASE64URL.get(usize::from(b)).copied().unwrap_or(false)
}

/// What a presented token is, told in one pass over it (API calls pay for it on every request;
/// a token with dots is split once more to check its parts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presented<'a> {
    /// Three dot-separated parts, each as [`is_base64url`] accepts: a full compact JWS.
    FullJwt,
    /// One such part: a signature.
    Signature(Signature<'a>),
    /// Anything else.
    Malformed,
}

/// The base64url alphabet by comparisons rather than [`BASE64URL`]: no early exit and no table
/// load, so the pass over a token in [`Presented::of`] compiles to SIMD compares.
fn in_alphabet(b: u8) -> bool {
    let lower = b | 0x20;
    (lower.wrapping_sub(b'a') < 26) | (b.wrapping_sub(b'0') < 10) | (b == b'-') | (b == b'_')
}

impl<'a> Presented<'a> {
    pub fn of(token: &'a [u8]) -> Self {
        // One branch-free pass the compiler vectorizes (a 342-character signature in about a
        // third of the time of a byte-at-a-time loop): any byte outside the alphabet and '.',
        // any dot. Only a token with dots is split again, to check its parts.
        let (mut bad, mut dotted) = (false, false);
        for &b in token {
            let dot = b == b'.';
            dotted |= dot;
            bad |= !(dot | in_alphabet(b));
        }
        let part_ok = |part: &[u8]| !part.is_empty() && part.len() <= MAX_SIGNATURE_LEN;
        if bad {
            Self::Malformed
        } else if !dotted {
            if !part_ok(token) {
                return Self::Malformed;
            }
            // Base64url is ASCII: the conversion cannot fail.
            std::str::from_utf8(token).map_or(Self::Malformed, |s| Self::Signature(Signature(s)))
        } else {
            let mut parts = token.split(|&b| b == b'.');
            let three = parts.by_ref().take(3).filter(|p| part_ok(p)).count() == 3;
            if three && parts.next().is_none() {
                Self::FullJwt
            } else {
                Self::Malformed
            }
        }
    }
}

/// A client's opaque token: the signature segment of a JWS. Only ever borrowed.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature<'a>(&'a str);

impl<'a> Signature<'a> {
    /// Accepts `s` when it looks like a base64url signature segment.
    pub fn parse(s: &'a [u8]) -> Option<Self> {
        if is_base64url(s) {
            std::str::from_utf8(s).ok().map(Signature)
        } else {
            None
        }
    }

    /// The signature text, for rebuilding the JWT.
    pub fn as_str(&self) -> &'a str {
        self.0
    }

    /// The key this signature's entry is stored under.
    pub fn store_key(&self) -> StoreKey {
        StoreKey(Sha256::digest(self.0.as_bytes()).into())
    }
}

/// Never print a credential, even by accident in a debug log.
impl fmt::Debug for Signature<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature(<{} chars>)", self.0.len())
    }
}

/// SHA-256 of a signature's text: the store's key. One-way by construction.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct StoreKey(pub [u8; 32]);

impl StoreKey {
    /// The slot this key lives in, for a store of `slots` slots.
    pub fn slot(&self, slots: u32) -> u32 {
        let mut head = [0u8; 8];
        head.copy_from_slice(&self.0[..8]);
        (u64::from_be_bytes(head) % u64::from(slots.max(1))) as u32
    }

    /// Lowercase hex, as `sha256sum` prints it: the key's name outside shared data (etcd).
    pub fn to_hex(&self) -> String {
        use fmt::Write;
        let mut out = String::with_capacity(64);
        for b in self.0 {
            let _ = write!(out, "{b:02x}");
        }
        out
    }

    /// Parses 64 hex digits (either case); anything else is `None`.
    pub fn from_hex(text: &str) -> Option<Self> {
        let hex = text.as_bytes();
        if hex.len() != 64 || !hex.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        let mut digest = [0u8; 32];
        for (out, pair) in digest.iter_mut().zip(hex.chunks(2)) {
            *out = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
        }
        Some(Self(digest))
    }
}

#[derive(Deserialize)]
struct NoCustomClaims {}

/// A compact JWS parsed from an IdP's response. Not verified.
pub struct CompactJws<'a> {
    text: &'a str,
    dot: usize,
    /// The `exp` claim in Unix seconds, when present.
    pub exp: Option<i64>,
    /// The `alg` header parameter.
    pub algorithm: String,
}

impl<'a> CompactJws<'a> {
    /// Parses `text` as `header.payload.signature` with jwt-compact and reads `exp`.
    pub fn parse(text: &'a str) -> Result<Self, JwsError> {
        let segments = text.split('.').count();
        if segments != 3 {
            return Err(JwsError::Structure { segments });
        }
        let dot = text.rfind('.').ok_or(JwsError::Structure { segments })?;
        let sig = text.get(dot + 1..).unwrap_or_default();
        if !is_base64url(sig.as_bytes()) {
            return Err(JwsError::Signature { len: sig.len() });
        }
        // Errors are described by kind only: serde messages may quote token content.
        let untrusted = UntrustedToken::new(text).map_err(|e| JwsError::Parse {
            reason: match e {
                ParseError::InvalidTokenStructure => "bad structure",
                ParseError::InvalidBase64Encoding => "a segment is not base64url",
                ParseError::MalformedHeader(_) => "header is not a JSON object with an alg",
                ParseError::UnsupportedContentType(_) => "unsupported cty header",
                _ => "unparseable",
            }
            .to_owned(),
        })?;
        let claims = untrusted
            .deserialize_claims_unchecked::<NoCustomClaims>()
            .map_err(|_| JwsError::Claims {
                reason: "not a JSON object with numeric exp/nbf/iat".to_owned(),
            })?;
        Ok(Self {
            text,
            dot,
            exp: claims.expiration.map(|t| t.timestamp()),
            algorithm: untrusted.algorithm().to_owned(),
        })
    }

    /// `header.payload`: what the store keeps.
    pub fn header_payload(&self) -> &'a str {
        self.text.get(..self.dot).unwrap_or_default()
    }

    /// The signature the client receives.
    pub fn signature(&self) -> Signature<'a> {
        Signature(self.text.get(self.dot + 1..).unwrap_or_default())
    }
}

impl fmt::Debug for CompactJws<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CompactJws")
            .field("algorithm", &self.algorithm)
            .field("exp", &self.exp)
            .finish_non_exhaustive()
    }
}

/// Describes a serde_json error by category and position only: its message could quote the body.
pub(crate) fn describe(e: &serde_json::Error) -> String {
    let what = match e.classify() {
        serde_json::error::Category::Io => "read error",
        serde_json::error::Category::Syntax => "syntax error",
        serde_json::error::Category::Data => "not an object",
        serde_json::error::Category::Eof => "truncated",
    };
    format!("{what} at line {} column {}", e.line(), e.column())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `{"alg":"RS256","typ":"JWT","kid":"k1"}` . `{"sub":"alice","exp":2000000000}` . fake sig
    pub const JWT: &str = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCIsImtpZCI6ImsxIn0.eyJzdWIiOiJhbGljZSIsImV4cCI6MjAwMDAwMDAwMH0.c2lnbmF0dXJlLWJ5dGVzLWZvci10ZXN0cw";

    #[test]
    fn presented_tokens_are_told_apart_in_one_pass() {
        let long = "a".repeat(MAX_SIGNATURE_LEN);
        let too_long = "a".repeat(MAX_SIGNATURE_LEN + 1);
        let sig = |s: &'static str| Presented::Signature(Signature(s));
        for (token, want) in [
            ("abc-_09AZ", sig("abc-_09AZ")),
            (JWT, Presented::FullJwt),
            ("a.b.c", Presented::FullJwt),
            ("", Presented::Malformed),
            ("a.b", Presented::Malformed),
            ("a.b.c.d", Presented::Malformed),
            ("a..c", Presented::Malformed),
            (".b.c", Presented::Malformed),
            ("a.b.", Presented::Malformed),
            ("a+b", Presented::Malformed),
            ("a=", Presented::Malformed),
            ("a.b\u{e9}.c", Presented::Malformed),
        ] {
            assert_eq!(Presented::of(token.as_bytes()), want, "{token:?}");
        }
        assert_eq!(
            Presented::of(long.as_bytes()),
            Presented::Signature(Signature(&long))
        );
        assert_eq!(Presented::of(too_long.as_bytes()), Presented::Malformed);
        let jwt_with_long_part = format!("a.{too_long}.c");
        assert_eq!(
            Presented::of(jwt_with_long_part.as_bytes()),
            Presented::Malformed,
            "every part is bounded, as is_base64url bounds it"
        );
    }

    /// The comparisons of the vectorized pass accept exactly the alphabet of `is_base64url`,
    /// and every byte is told apart as the table tells it, alone and inside a part.
    #[test]
    fn presented_alphabet_is_the_base64url_table() {
        for b in 0..=u8::MAX {
            assert_eq!(in_alphabet(b), in_base64url(b), "byte {b}");
            let alone = [b];
            let want = if in_base64url(b) {
                Presented::Signature(Signature(std::str::from_utf8(&alone).unwrap()))
            } else {
                Presented::Malformed
            };
            assert_eq!(Presented::of(&alone), want, "byte {b}");
            let jwt = [b'a', b'.', b, b'.', b'c'];
            let want = if in_base64url(b) {
                Presented::FullJwt
            } else {
                Presented::Malformed
            };
            assert_eq!(Presented::of(&jwt), want, "byte {b} in a part");
        }
    }

    #[test]
    fn parses_and_splits_byte_identically() {
        let jws = CompactJws::parse(JWT).unwrap();
        assert_eq!(jws.exp, Some(2_000_000_000));
        assert_eq!(jws.algorithm, "RS256");
        let rebuilt = format!("{}.{}", jws.header_payload(), jws.signature().as_str());
        assert_eq!(rebuilt, JWT);
    }

    #[test]
    fn rejects_wrong_segment_counts() {
        assert_eq!(
            CompactJws::parse("a.b").unwrap_err(),
            JwsError::Structure { segments: 2 }
        );
        assert!(matches!(
            CompactJws::parse(&format!("{JWT}.x")),
            Err(JwsError::Structure { segments: 4 })
        ));
        assert!(CompactJws::parse("opaque-token").is_err());
    }

    #[test]
    fn rejects_headers_without_alg_and_bad_payloads() {
        // header {"typ":"JWT"}
        let no_alg = "eyJ0eXAiOiJKV1QifQ.eyJzdWIiOiJhIn0.c2ln";
        assert!(matches!(
            CompactJws::parse(no_alg),
            Err(JwsError::Parse { .. })
        ));
        // payload "[1]"
        let array = "eyJhbGciOiJSUzI1NiJ9.WzFd.c2ln";
        assert!(matches!(
            CompactJws::parse(array),
            Err(JwsError::Claims { .. })
        ));
        let empty_sig = "eyJhbGciOiJSUzI1NiJ9.e30.";
        assert!(matches!(
            CompactJws::parse(empty_sig),
            Err(JwsError::Signature { len: 0 })
        ));
    }

    #[test]
    fn signature_accepts_only_base64url() {
        assert!(Signature::parse(b"abc-_09XYZ").is_some());
        for bad in [
            &b""[..],
            b"a.b",
            b"a b",
            b"a+b",
            b"a/b",
            b"ab=",
            "é".as_bytes(),
        ] {
            assert!(Signature::parse(bad).is_none(), "{bad:?}");
        }
        assert!(Signature::parse(&[b'a'; MAX_SIGNATURE_LEN]).is_some());
        assert!(Signature::parse(&[b'a'; MAX_SIGNATURE_LEN + 1]).is_none());
    }

    #[test]
    fn debug_never_prints_the_signature() {
        let s = Signature::parse(b"secret-signature").unwrap();
        assert!(!format!("{s:?}").contains("secret"));
        let jws = CompactJws::parse(JWT).unwrap();
        assert!(!format!("{jws:?}").contains("eyJ"));
    }

    #[test]
    fn store_key_is_sha256_of_the_signature_text() {
        let key = Signature::parse(b"abc").unwrap().store_key();
        // sha256("abc")
        assert_eq!(key.0[..4], [0xba, 0x78, 0x16, 0xbf]);
        assert!(key.slot(7) < 7);
        assert_eq!(key.slot(1), 0);
    }
}
