//! Error classes: what the runtime must do about an error.

/// Every error switchback reports is one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// A connection dropped, a server restarted, a timeout: reconnect and retry with
    /// backoff. No data is wrong.
    Transient,
    /// The data or the configuration is wrong (missing privilege, unsupported type,
    /// schema drift, invalidated slot): stop, name the table and the fix, keep the
    /// queue as it is. Retrying would not help.
    Definite,
}

/// Implemented by the error types of every crate.
pub trait Classify {
    fn class(&self) -> ErrorClass;
    fn is_transient(&self) -> bool {
        self.class() == ErrorClass::Transient
    }
}
