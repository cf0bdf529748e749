//! Stage 2 of a token's life, the token response: the IdP's answer is split ([`response`]) and
//! the JWT verified ([`crate::token::verify`]) against the IdP's keys, fetched through Envoy
//! ([`keys`]).
pub mod keys;
pub mod response;
