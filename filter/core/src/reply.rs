//! The one place where decisions become HTTP answers (RFC 6750 §3 for API requests).

use crate::config::Config;
use crate::issue::keys::FetchError;
use crate::issue::response::SplitError;
use crate::request::Rejection;
use crate::stats::Counter;
use crate::store::StoreError;
use crate::token::verify::VerifyError;

/// A response the filter sends itself instead of forwarding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply<'a> {
    pub status: u32,
    /// `WWW-Authenticate`, for 401 and 400 answers to API requests.
    pub www_authenticate: Option<&'a str>,
    /// A small JSON object; never contains token material.
    pub body: String,
}

impl LocalReply<'_> {
    /// Headers every local reply carries.
    pub const HEADERS: [(&'static str, &'static str); 2] = [
        ("content-type", "application/json"),
        ("cache-control", "no-store"),
    ];
}

fn json(error: Option<&str>, description: &str) -> String {
    let mut body = serde_json::Map::new();
    if let Some(error) = error {
        body.insert("error".into(), error.into());
    }
    body.insert("error_description".into(), description.into());
    serde_json::Value::Object(body).to_string()
}

impl Rejection {
    /// The answer to a rejected API request.
    pub fn reply(self, config: &Config) -> LocalReply<'_> {
        let invalid_token = |description: &str| LocalReply {
            status: 401,
            www_authenticate: Some(&config.challenge_invalid_token),
            body: json(Some("invalid_token"), description),
        };
        match self {
            // RFC 6750 §3.1: no error code when the request carried no credentials for us.
            Self::MissingCredentials => LocalReply {
                status: 401,
                www_authenticate: Some(&config.challenge),
                body: json(None, "a bearer token is required"),
            },
            Self::MultipleAuthorization => LocalReply {
                status: 400,
                www_authenticate: Some(&config.challenge_invalid_request),
                body: json(
                    Some("invalid_request"),
                    "more than one Authorization header",
                ),
            },
            Self::Malformed => invalid_token("the access token is malformed"),
            Self::FullJwt => {
                invalid_token("send the access token issued by this gateway, not a full JWT")
            }
            Self::Unknown => invalid_token("the access token is unknown"),
            Self::Expired => invalid_token("the access token expired"),
            Self::StoreUnavailable => LocalReply {
                status: 503,
                www_authenticate: None,
                body: json(
                    Some("temporarily_unavailable"),
                    "the token store cannot be read",
                ),
            },
            // RFC 9449 §7.1: DPoP errors carry a DPoP challenge.
            Self::MissingDpopProof => LocalReply {
                status: 401,
                www_authenticate: Some(&config.challenge_dpop_invalid_proof),
                body: json(
                    Some("invalid_dpop_proof"),
                    "the DPoP scheme needs exactly one proof in a DPoP header",
                ),
            },
            Self::DpopBoundAsBearer => LocalReply {
                status: 401,
                www_authenticate: Some(&config.challenge_dpop_invalid_token),
                body: json(
                    Some("invalid_token"),
                    "this token is bound to a key: present it with the DPoP scheme and a proof",
                ),
            },
            Self::DpopUncheckable => LocalReply {
                status: 401,
                www_authenticate: Some(&config.challenge_dpop_invalid_token),
                body: json(
                    Some("invalid_token"),
                    "this gateway forwards no JWT, so it cannot pass on a DPoP-bound token",
                ),
            },
            Self::DpopNotBound => LocalReply {
                status: 401,
                www_authenticate: Some(&config.challenge_dpop_invalid_token),
                body: json(
                    Some("invalid_token"),
                    "this token is not bound to a key: present it with the Bearer scheme",
                ),
            },
        }
    }

    /// The counter a rejection moves.
    pub fn counter(self) -> Counter {
        match self {
            Self::MissingCredentials => Counter::RejectedMissing,
            Self::MultipleAuthorization => Counter::RejectedMultiple,
            Self::Malformed => Counter::RejectedMalformed,
            Self::FullJwt => Counter::RejectedFullJwt,
            Self::Unknown => Counter::RejectedUnknown,
            Self::Expired => Counter::RejectedExpired,
            Self::StoreUnavailable => Counter::RejectedStoreUnavailable,
            Self::MissingDpopProof => Counter::RejectedMissingDpopProof,
            Self::DpopBoundAsBearer | Self::DpopNotBound | Self::DpopUncheckable => {
                Counter::RejectedDpopBinding
            }
        }
    }
}

/// The answer to a revocation the gateway settles itself: RFC 7009 §2.2's `200` with an empty
/// body, the same whether or not the token existed.
pub fn revocation_done() -> LocalReply<'static> {
    LocalReply {
        status: 200,
        www_authenticate: None,
        body: String::new(),
    }
}

/// The answer to a revocation request that cannot be handled.
pub fn revocation_failure(failure: &crate::lifecycle::revoke::Failure) -> LocalReply<'static> {
    match failure {
        crate::lifecycle::revoke::Failure::Request(e) => LocalReply {
            status: 400,
            www_authenticate: None,
            body: json(Some("invalid_request"), &e.to_string()),
        },
        crate::lifecycle::revoke::Failure::Store(_) => LocalReply {
            status: 503,
            www_authenticate: None,
            body: json(
                Some("temporarily_unavailable"),
                "the token store cannot be changed",
            ),
        },
    }
}

/// The 503 when etcd, the store every replica shares, cannot be reached: the client may retry.
pub fn shared_store_unavailable() -> LocalReply<'static> {
    LocalReply {
        status: 503,
        www_authenticate: None,
        body: json(
            Some("temporarily_unavailable"),
            "the token store shared by the gateway's replicas is unreachable",
        ),
    }
}

/// The answer to an introspection request (RFC 7662).
pub fn introspection_reply<'c>(
    config: &'c Config,
    outcome: &crate::lifecycle::introspect::Introspection,
) -> LocalReply<'c> {
    use crate::lifecycle::introspect::Introspection;
    match outcome {
        Introspection::Unauthorized => LocalReply {
            status: 401,
            www_authenticate: Some(&config.challenge_basic),
            body: json(
                Some("invalid_client"),
                "introspection needs the credentials of a configured client (HTTP Basic)",
            ),
        },
        Introspection::Invalid(e) => LocalReply {
            status: 400,
            www_authenticate: None,
            body: json(Some("invalid_request"), &e.to_string()),
        },
        Introspection::Answer(body) => LocalReply {
            status: 200,
            www_authenticate: None,
            body: body.clone(),
        },
    }
}

/// Why a token response failed closed.
#[derive(Debug)]
pub enum IssueFailure<'a> {
    Split(&'a SplitError),
    Store(&'a StoreError),
    /// The token did not verify against the IdP's keys.
    Verify(&'a VerifyError),
    /// No keys could be loaded to verify it.
    Keys(&'a FetchError),
    /// The token could not be written to etcd, so other replicas would not know it.
    Etcd(&'a crate::replicas::etcd::EtcdError),
}

/// The 502 a client gets instead of a token the gateway could not split or store, or the 503
/// when the shared store (etcd) is unreachable and a retry may work.
pub fn issue_failure(failure: IssueFailure<'_>) -> LocalReply<'static> {
    if let IssueFailure::Etcd(_) = failure {
        return shared_store_unavailable();
    }
    let description = match failure {
        IssueFailure::Split(e) => format!("the gateway could not split the token response: {e}"),
        IssueFailure::Store(_) => "the gateway could not store the token".to_owned(),
        IssueFailure::Verify(e) => format!("the issued token failed verification: {e}"),
        IssueFailure::Keys(_) => "the gateway could not load the signing keys".to_owned(),
        IssueFailure::Etcd(_) => String::new(),
    };
    LocalReply {
        status: 502,
        www_authenticate: None,
        body: json(Some("server_error"), &description),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::from_json(br#"{"token_paths": ["/t"], "realm": "api"}"#).unwrap()
    }

    #[test]
    fn missing_credentials_challenge_has_no_error_code() {
        let c = config();
        let r = Rejection::MissingCredentials.reply(&c);
        assert_eq!(r.status, 401);
        assert_eq!(r.www_authenticate, Some("Bearer realm=\"api\""));
        let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert!(body.get("error").is_none());
    }

    #[test]
    fn statuses_and_codes_follow_rfc6750() {
        let c = config();
        let cases = [
            (Rejection::MultipleAuthorization, 400, "invalid_request"),
            (Rejection::Malformed, 401, "invalid_token"),
            (Rejection::FullJwt, 401, "invalid_token"),
            (Rejection::Unknown, 401, "invalid_token"),
            (Rejection::Expired, 401, "invalid_token"),
        ];
        for (rejection, status, code) in cases {
            let r = rejection.reply(&c);
            assert_eq!(r.status, status, "{rejection:?}");
            assert_eq!(
                r.www_authenticate.unwrap(),
                format!("Bearer realm=\"api\", error=\"{code}\"")
            );
            let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
            assert_eq!(body["error"], code);
        }
        let r = Rejection::StoreUnavailable.reply(&c);
        assert_eq!((r.status, r.www_authenticate), (503, None));
    }

    #[test]
    fn an_unreachable_etcd_is_a_503_the_client_may_retry() {
        let e = crate::replicas::etcd::EtcdError::NoAnswer { call: "put" };
        for r in [
            issue_failure(IssueFailure::Etcd(&e)),
            shared_store_unavailable(),
        ] {
            assert_eq!((r.status, r.www_authenticate), (503, None));
            let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
            assert_eq!(body["error"], "temporarily_unavailable");
        }
    }

    #[test]
    fn issue_failures_are_oauth_shaped_502s() {
        let r = issue_failure(IssueFailure::Split(&SplitError::NoAccessToken));
        assert_eq!(r.status, 502);
        let body: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(body["error"], "server_error");
        assert!(body["error_description"]
            .as_str()
            .unwrap()
            .contains("no access_token"));
    }
}
