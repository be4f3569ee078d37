//! PostgreSQL connections for switchback: the walsender replication client
//! ([`replication`]), hub setup — preflight, publication, slot — ([`hub`]) and
//! error classification ([`error`]).

pub mod error;
pub mod hub;
pub mod pipeline;
pub mod replication;

pub use error::PgError;
