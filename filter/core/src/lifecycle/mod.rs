//! Stage 5 of a token's life, after it was issued: revocation and logout ([`revoke`]), and
//! introspection for resource servers that only hold a signature ([`introspect`]).
pub mod introspect;
pub mod revoke;
