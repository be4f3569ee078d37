//! A pipelining SQL connection for apply: named statements are parsed once, then
//! each row change is a Bind + Execute with text-format parameters (or, for
//! multi-row statements, binary `text[]` arrays of text values), and a whole
//! batch ends with a single Sync. The server then answers a batch with one flush
//! instead of one per statement (tokio-postgres sends a Sync after every query).
//!
//! A batch is sent without waiting for the previous one's outcomes, so the client
//! prepares the next batch while the server executes this one. After an error the
//! server skips the rest of the batch up to the Sync; the error says which entry
//! failed.

use bytes::{BufMut, BytesMut};

use crate::error::{PgError, ServerError};
use crate::replication::{parse_error_fields, FrameReader, FrameWriter, ReplicationClient};

/// One entry of a batch.
pub enum Entry<'a> {
    /// Execute a named prepared statement (None = NULL). With `binary`, every
    /// parameter is sent in binary format (see [`binary_text_array`]); otherwise
    /// in text format.
    Prepared {
        name: &'a str,
        params: &'a [Option<Vec<u8>>],
        binary: bool,
    },
    /// Parse, bind and execute an SQL text without parameters (unnamed statement).
    Sql(&'a str),
}

/// The outcome of one entry: the affected-row count of its command tag and the
/// first column of the last row it returned (text).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Outcome {
    pub rows: u64,
    pub returned: Option<String>,
}

/// A batch failed at entry `index` (None: while parsing a new statement).
#[derive(Debug)]
pub struct BatchError {
    pub index: Option<usize>,
    pub error: PgError,
}

impl BatchError {
    /// The SQLSTATE of a server error.
    pub fn code(&self) -> Option<&str> {
        match &self.error {
            PgError::Server { error, .. } => Some(error.code.as_str()),
            _ => None,
        }
    }
}

pub struct PipelineConn {
    reader: FrameReader,
    writer: FrameWriter,
    endpoint: String,
    /// Transaction status of the last ReadyForQuery: I idle, T in transaction, E failed.
    pub txn_status: u8,
    /// Parses expected in each batch sent and not read yet, oldest first.
    unread: std::collections::VecDeque<usize>,
}

fn cstr(out: &mut BytesMut, s: &str) {
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

fn message(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let at = out.len();
    out.put_i32(0);
    body(out);
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_parse(out: &mut BytesMut, name: &str, sql: &str) {
    message(out, b'P', |b| {
        cstr(b, name);
        cstr(b, sql);
        b.put_i16(0);
    });
}

/// A one-dimensional `text[]` in the binary format of `array_send` / `array_recv`,
/// holding `values` (None = a NULL element). The member still parses each element
/// as text: only the array around them skips the text-literal syntax (no quoting
/// on this side, no `array_in` on the member).
pub fn binary_text_array(values: &[Option<&[u8]>]) -> Vec<u8> {
    const TEXT_OID: i32 = 25;
    let n = values.len();
    let bytes: usize = values.iter().map(|v| 4 + v.map_or(0, <[u8]>::len)).sum();
    let mut out = Vec::with_capacity(20 + bytes);
    let has_null = values.iter().any(Option::is_none);
    out.extend_from_slice(&i32::from(n > 0).to_be_bytes()); // dimensions
    out.extend_from_slice(&i32::from(has_null).to_be_bytes());
    out.extend_from_slice(&TEXT_OID.to_be_bytes());
    if n > 0 {
        out.extend_from_slice(&(n as i32).to_be_bytes()); // length of the dimension
        out.extend_from_slice(&1i32.to_be_bytes()); // its lower bound
    }
    for v in values {
        match v {
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            Some(v) => {
                out.extend_from_slice(&(v.len() as i32).to_be_bytes());
                out.extend_from_slice(v);
            }
        }
    }
    out
}

fn put_bind_execute(out: &mut BytesMut, name: &str, params: &[Option<Vec<u8>>], binary: bool) {
    message(out, b'B', |b| {
        cstr(b, "");
        cstr(b, name);
        if binary {
            b.put_i16(1); // one format code for every parameter:
            b.put_i16(1); // binary
        } else {
            b.put_i16(0); // all parameters in text format
        }
        b.put_i16(params.len() as i16);
        for p in params {
            match p {
                None => b.put_i32(-1),
                Some(v) => {
                    b.put_i32(v.len() as i32);
                    b.put_slice(v);
                }
            }
        }
        b.put_i16(0); // all results in text format
    });
    message(out, b'E', |b| {
        cstr(b, "");
        b.put_i32(0);
    });
}

fn tag_rows(tag: &[u8]) -> u64 {
    let tag = tag.strip_suffix(&[0]).unwrap_or(tag);
    std::str::from_utf8(tag)
        .ok()
        .and_then(|t| t.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn first_column(body: &[u8]) -> Option<String> {
    // DataRow: Int16 count, then Int32 length + bytes per column.
    let count = i16::from_be_bytes(body.get(0..2)?.try_into().ok()?);
    if count < 1 {
        return None;
    }
    let len = i32::from_be_bytes(body.get(2..6)?.try_into().ok()?);
    if len < 0 {
        return None;
    }
    let v = body.get(6..6 + len as usize)?;
    Some(String::from_utf8_lossy(v).into_owned())
}

impl PipelineConn {
    /// Opens a normal (non-replication) connection with pinned output settings.
    pub async fn connect(
        cfg: &tokio_postgres::Config,
        application_name: &str,
    ) -> Result<PipelineConn, PgError> {
        let c = ReplicationClient::connect_with(cfg, application_name, false).await?;
        Ok(PipelineConn {
            reader: c.reader,
            writer: c.writer,
            endpoint: c.endpoint,
            txn_status: b'I',
            unread: Default::default(),
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Runs SQL with the simple query protocol; returns the rows of the last result.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, PgError> {
        let (rows, status) =
            crate::replication::simple_query(&mut self.reader, &mut self.writer, sql).await?;
        self.txn_status = status;
        Ok(rows)
    }

    fn server_error(&self, error: ServerError) -> PgError {
        PgError::Server {
            endpoint: self.endpoint.clone(),
            error,
        }
    }

    /// Sends `parses` (new named statements), then every entry, then one Sync,
    /// without reading anything: the outcomes are read later with [`receive`](Self::receive),
    /// in the order the batches were sent. Keep the unread responses small (a few
    /// batches of a few hundred entries): a server blocked on a full socket stops
    /// reading, and a client blocked writing would then wait for ever.
    pub async fn send(
        &mut self,
        parses: &[(&str, &str)],
        entries: &[Entry<'_>],
    ) -> Result<(), PgError> {
        let mut out = BytesMut::with_capacity(64 * 1024);
        for (name, sql) in parses {
            put_parse(&mut out, name, sql);
        }
        for e in entries {
            match e {
                Entry::Prepared {
                    name,
                    params,
                    binary,
                } => put_bind_execute(&mut out, name, params, *binary),
                Entry::Sql(sql) => {
                    put_parse(&mut out, "", sql);
                    put_bind_execute(&mut out, "", &[], false);
                }
            }
        }
        message(&mut out, b'S', |_| {});
        self.writer.send(&out).await?;
        self.unread.push_back(parses.len());
        Ok(())
    }

    /// Batches sent whose outcomes were not read yet.
    pub fn unread(&self) -> usize {
        self.unread.len()
    }

    /// Reads the outcomes of the oldest unread batch, up to its ReadyForQuery.
    pub async fn receive(&mut self) -> Result<Vec<Outcome>, BatchError> {
        let expected_parses = self.unread.pop_front().unwrap_or(0);
        let mut outcomes = Vec::new();
        let mut parsed = 0usize;
        let mut returned: Option<String> = None;
        let mut failure: Option<(Option<usize>, ServerError)> = None;
        loop {
            let msg = self
                .reader
                .read()
                .await
                .map_err(|error| BatchError { index: None, error })?;
            match msg.tag {
                b'1' => {
                    if parsed < expected_parses {
                        parsed += 1;
                    }
                }
                b'2' | b'n' | b'N' | b'S' | b's' => {}
                b'D' => returned = first_column(&msg.body),
                b'C' | b'I' => {
                    outcomes.push(Outcome {
                        rows: if msg.tag == b'C' {
                            tag_rows(&msg.body)
                        } else {
                            0
                        },
                        returned: returned.take(),
                    });
                }
                b'E' => {
                    let index = (parsed >= expected_parses).then_some(outcomes.len());
                    failure = Some((index, parse_error_fields(&msg.body)));
                }
                b'Z' => {
                    self.txn_status = msg.body.first().copied().unwrap_or(b'I');
                    return match failure {
                        Some((index, error)) => Err(BatchError {
                            index,
                            error: self.server_error(error),
                        }),
                        None => Ok(outcomes),
                    };
                }
                other => {
                    return Err(BatchError {
                        index: None,
                        error: PgError::Protocol {
                            endpoint: self.endpoint.clone(),
                            message: format!("unexpected message {:?} in a batch", other as char),
                        },
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_tags() {
        assert_eq!(tag_rows(b"INSERT 0 1\0"), 1);
        assert_eq!(tag_rows(b"UPDATE 0\0"), 0);
        assert_eq!(tag_rows(b"DELETE 12\0"), 12);
        assert_eq!(tag_rows(b"COMMIT\0"), 0);
    }

    #[test]
    fn first_column_of_data_row() {
        let mut b = BytesMut::new();
        b.put_i16(1);
        b.put_i32(1);
        b.put_u8(b't');
        assert_eq!(first_column(&b).as_deref(), Some("t"));
        let mut n = BytesMut::new();
        n.put_i16(1);
        n.put_i32(-1);
        assert_eq!(first_column(&n), None);
        assert_eq!(first_column(&[0, 1, 0]), None);
    }
}
