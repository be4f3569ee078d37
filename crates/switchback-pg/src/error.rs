//! Errors of PostgreSQL connections, classified by what the runtime must do.

use switchback_core::{Classify, ErrorClass};

/// A field set of an ErrorResponse from the server.
#[derive(Debug, Clone, Default)]
pub struct ServerError {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)?;
        if let Some(d) = &self.detail {
            write!(f, "; detail: {d}")?;
        }
        if let Some(h) = &self.hint {
            write!(f, "; hint: {h}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        endpoint: String,
        source: std::io::Error,
    },
    #[error("connection to {endpoint} lost: {source}")]
    Io {
        endpoint: String,
        source: std::io::Error,
    },
    #[error("{endpoint}: {error}")]
    Server {
        endpoint: String,
        error: ServerError,
    },
    #[error("{endpoint}: {source}")]
    Sql {
        endpoint: String,
        source: tokio_postgres::Error,
    },
    #[error("{endpoint}: protocol error: {message}")]
    Protocol { endpoint: String, message: String },
    /// A problem of the setup that the operator must fix; the message says how.
    #[error("{0}")]
    Setup(String),
    #[error("{endpoint}: {message}")]
    Auth { endpoint: String, message: String },
}

/// SQLSTATE classes that mean "try again later".
pub fn transient_sqlstate(code: &str) -> bool {
    code.starts_with("08") // connection exception
        || code.starts_with("53") // insufficient resources
        || code.starts_with("57") // operator intervention: admin shutdown, crash shutdown, cannot connect now
        || code == "40001" // serialization failure
        || code == "40P01" // deadlock
        || code == "55006" // object in use (slot active for another PID: our old session)
}

impl Classify for PgError {
    fn class(&self) -> ErrorClass {
        match self {
            PgError::Connect { .. } | PgError::Io { .. } => ErrorClass::Transient,
            PgError::Server { error, .. } if transient_sqlstate(&error.code) => {
                ErrorClass::Transient
            }
            PgError::Sql { source, .. } => match source.code() {
                Some(c) if transient_sqlstate(c.code()) => ErrorClass::Transient,
                Some(_) => ErrorClass::Definite,
                // no SQLSTATE: the connection broke or closed
                None => ErrorClass::Transient,
            },
            _ => ErrorClass::Definite,
        }
    }
}

impl PgError {
    pub fn sql(endpoint: &str, source: tokio_postgres::Error) -> PgError {
        PgError::Sql {
            endpoint: endpoint.to_string(),
            source,
        }
    }

    /// The SQLSTATE, when the server sent one.
    pub fn code(&self) -> Option<String> {
        match self {
            PgError::Server { error, .. } => Some(error.code.clone()),
            PgError::Sql { source, .. } => source.code().map(|c| c.code().to_string()),
            _ => None,
        }
    }
}

/// Formats a tokio-postgres error with the server's detail and hint, which its
/// Display leaves out.
pub fn describe_sql_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} ({})", db.message(), db.code().code());
            if let Some(d) = db.detail() {
                s.push_str(&format!("; detail: {d}"));
            }
            if let Some(h) = db.hint() {
                s.push_str(&format!("; hint: {h}"));
            }
            s
        }
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(inner) = src {
                s.push_str(&format!(": {inner}"));
                src = inner.source();
            }
            s
        }
    }
}
