//! The counters the filter exports. Envoy shows each as `wasmcustom.split_token.<name>`.

/// One exported counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    TokensSplit,
    SplitFailures,
    SplitResets,
    EarlyAnswers,
    TokenErrorsPassedThrough,
    LookupHit,
    FullJwtForwarded,
    RejectedMissing,
    RejectedMultiple,
    RejectedMalformed,
    RejectedFullJwt,
    RejectedUnknown,
    RejectedExpired,
    RejectedStoreUnavailable,
    StoreEvictions,
    StoreExpiredDropped,
    StoreCasRetries,
    StoreCorruptSlots,
    StoreWriteFailures,
    VerifyFailed,
    KeysFetched,
    KeyFetchFailures,
    ClaimsUnsafeDropped,
    RejectedMissingDpopProof,
    RejectedDpopBinding,
    Revoked,
    RevocationsUnknown,
    RevocationsForwarded,
    RevocationsInvalid,
    IntrospectionsActive,
    IntrospectionsInactive,
    IntrospectionsRefused,
    EtcdPublished,
    EtcdFetched,
    EtcdNotFound,
    EtcdRevocationsPublished,
    EtcdRevocationsApplied,
    EtcdFailures,
}

impl Counter {
    /// Every counter, in the order their metric ids are defined.
    pub const ALL: [Counter; 38] = [
        Counter::TokensSplit,
        Counter::SplitFailures,
        Counter::SplitResets,
        Counter::EarlyAnswers,
        Counter::TokenErrorsPassedThrough,
        Counter::LookupHit,
        Counter::FullJwtForwarded,
        Counter::RejectedMissing,
        Counter::RejectedMultiple,
        Counter::RejectedMalformed,
        Counter::RejectedFullJwt,
        Counter::RejectedUnknown,
        Counter::RejectedExpired,
        Counter::RejectedStoreUnavailable,
        Counter::StoreEvictions,
        Counter::StoreExpiredDropped,
        Counter::StoreCasRetries,
        Counter::StoreCorruptSlots,
        Counter::StoreWriteFailures,
        Counter::VerifyFailed,
        Counter::KeysFetched,
        Counter::KeyFetchFailures,
        Counter::ClaimsUnsafeDropped,
        Counter::RejectedMissingDpopProof,
        Counter::RejectedDpopBinding,
        Counter::Revoked,
        Counter::RevocationsUnknown,
        Counter::RevocationsForwarded,
        Counter::RevocationsInvalid,
        Counter::IntrospectionsActive,
        Counter::IntrospectionsInactive,
        Counter::IntrospectionsRefused,
        Counter::EtcdPublished,
        Counter::EtcdFetched,
        Counter::EtcdNotFound,
        Counter::EtcdRevocationsPublished,
        Counter::EtcdRevocationsApplied,
        Counter::EtcdFailures,
    ];

    /// The metric name as defined with the host.
    pub fn name(self) -> &'static str {
        match self {
            Self::TokensSplit => "split_token.tokens_split",
            Self::SplitFailures => "split_token.split_failures",
            Self::SplitResets => "split_token.split_resets",
            Self::EarlyAnswers => "split_token.early_answers",
            Self::TokenErrorsPassedThrough => "split_token.token_errors_passed_through",
            Self::LookupHit => "split_token.lookup_hit",
            Self::FullJwtForwarded => "split_token.full_jwt_forwarded",
            Self::RejectedMissing => "split_token.rejected.missing_token",
            Self::RejectedMultiple => "split_token.rejected.multiple_authorization",
            Self::RejectedMalformed => "split_token.rejected.malformed_token",
            Self::RejectedFullJwt => "split_token.rejected.full_jwt",
            Self::RejectedUnknown => "split_token.rejected.unknown_token",
            Self::RejectedExpired => "split_token.rejected.expired_token",
            Self::RejectedStoreUnavailable => "split_token.rejected.store_unavailable",
            Self::StoreEvictions => "split_token.store.evictions",
            Self::StoreExpiredDropped => "split_token.store.expired_dropped",
            Self::StoreCasRetries => "split_token.store.cas_retries",
            Self::StoreCorruptSlots => "split_token.store.corrupt_slots",
            Self::StoreWriteFailures => "split_token.store.write_failures",
            Self::VerifyFailed => "split_token.verify.failed",
            Self::KeysFetched => "split_token.keys.fetched",
            Self::KeyFetchFailures => "split_token.keys.fetch_failures",
            Self::ClaimsUnsafeDropped => "split_token.claims.unsafe_dropped",
            Self::RejectedMissingDpopProof => "split_token.rejected.missing_dpop_proof",
            Self::RejectedDpopBinding => "split_token.rejected.dpop_binding",
            Self::Revoked => "split_token.revoked",
            Self::RevocationsUnknown => "split_token.revocations.unknown",
            Self::RevocationsForwarded => "split_token.revocations.forwarded_unchanged",
            Self::RevocationsInvalid => "split_token.revocations.invalid",
            Self::IntrospectionsActive => "split_token.introspections.active",
            Self::IntrospectionsInactive => "split_token.introspections.inactive",
            Self::IntrospectionsRefused => "split_token.introspections.refused",
            Self::EtcdPublished => "split_token.etcd.published",
            Self::EtcdFetched => "split_token.etcd.fetched",
            Self::EtcdNotFound => "split_token.etcd.not_found",
            Self::EtcdRevocationsPublished => "split_token.etcd.revocations_published",
            Self::EtcdRevocationsApplied => "split_token.etcd.revocations_applied",
            Self::EtcdFailures => "split_token.etcd.failures",
        }
    }

    /// Position in [`Counter::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_in_index_order_with_unique_names() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(c.index(), i);
        }
        let mut names: Vec<_> = Counter::ALL.iter().map(|c| c.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Counter::ALL.len());
    }
}
