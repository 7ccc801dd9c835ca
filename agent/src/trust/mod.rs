//! Who may do what, and the record of it: identities and TLS
//! configurations ([`identity`]), operator-signed tickets and the replay
//! cache ([`authz`]), Cedar policies ([`policy`]), the signed audit log
//! ([`audit`]) and a file-based PKI for a quick start ([`pki`]).

pub mod audit;
pub mod authz;
pub mod identity;
pub mod pki;
pub mod policy;
