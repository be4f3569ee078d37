//! Core of switchback: the event model (committed transactions and their row
//! changes), LSNs, timestamps, error classes and the stored record format.
//! No I/O lives here.

pub mod error;
pub mod event;
pub mod json;
pub mod lsn;
pub mod metric;
pub mod record;
pub mod time;

pub use error::{Classify, ErrorClass};
pub use event::*;
pub use lsn::Lsn;
