//! A walsender client: a replication connection (`replication=database`) that runs
//! replication commands and streams `START_REPLICATION ... LOGICAL` in CopyBoth mode.
//!
//! tokio-postgres has no CopyBoth mode, so this speaks the protocol itself, using
//! postgres-protocol for the frontend messages and SCRAM/MD5. Plain TCP or Unix
//! sockets (TLS is not supported yet: `sslmode=require` is refused).
//!
//! Output settings are pinned in the startup packet as PostgreSQL's own walreceiver
//! does (`datestyle=ISO`, `intervalstyle=postgres`, `extra_float_digits=3`), so text
//! values are parsed identically by any member.

use std::collections::HashMap;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_postgres::config::{Host, SslMode};

use switchback_core::Lsn;

use crate::error::{PgError, ServerError};

type Reader = Box<dyn AsyncRead + Send + Unpin>;
type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// One backend message: tag and body.
pub(crate) struct BackendMessage {
    pub(crate) tag: u8,
    pub(crate) body: Bytes,
}

/// Reads backend messages from its own buffer: a message's body is split off the
/// buffer without a copy, and every await point is cancel-safe.
pub struct FrameReader {
    inner: Reader,
    buf: BytesMut,
    /// The TCP socket whose `SO_RCVLOWAT` is raised while streaming (see
    /// [`FrameReader::batch_reads`]); `None` for Unix sockets.
    tcp: Option<LowWater>,
    pub(crate) endpoint: String,
}

/// Writes frontend messages.
pub struct FrameWriter {
    inner: Writer,
    pub(crate) endpoint: String,
}

/// Bytes read at most per read call (the buffer grows by this much when full).
const READ_CHUNK: usize = 256 * 1024;

/// How many bytes must be queued on the socket before a streaming read wakes up
/// (`SO_RCVLOWAT`), and how a read that finds fewer decides whether to wait on.
///
/// A walsender sends each pgoutput message on its own. A reader that wakes for
/// each one costs the walsender a wake-up per message (on one host, also the
/// receive path) and costs itself a read call per message. Waking per 64 KiB
/// instead cuts both.
///
/// A streaming read waits [`BATCH_TICK`] at a time. When a tick ends without the
/// 64 KiB, the bytes queued on the socket (`FIONREAD`) tell what to do: while at
/// least [`BATCH_FLOWING`] more arrived during the tick, the stream is flowing
/// (a backlog drains) and the read waits another tick, for [`BATCH_MAX_WAIT`] at
/// most; otherwise the stream is quiet and the read takes what is there. A quiet
/// stream so adds at most one tick of latency to a change, a flowing one at
/// most [`BATCH_MAX_WAIT`].
const BATCH_BYTES: i32 = 64 * 1024;
const BATCH_TICK: Duration = Duration::from_millis(1);
const BATCH_FLOWING: i32 = BATCH_BYTES / 16;
const BATCH_MAX_WAIT: Duration = Duration::from_millis(8);

/// A TCP socket's receive low-water mark, as last set.
struct LowWater {
    #[cfg(unix)]
    fd: std::os::fd::RawFd,
    /// Streaming: reads wait for [`BATCH_BYTES`] (see [`FrameReader::batch_reads`]).
    streaming: bool,
    /// The `SO_RCVLOWAT` now in effect.
    lowat: i32,
}

impl LowWater {
    fn new(#[cfg(unix)] fd: std::os::fd::RawFd) -> LowWater {
        LowWater {
            #[cfg(unix)]
            fd,
            streaming: false,
            lowat: 1,
        }
    }

    /// Sets `SO_RCVLOWAT`; Linux signals readability at once if enough is queued.
    /// A failure only costs the batching, so it is logged, not returned.
    fn set(&mut self, lowat: i32) {
        if self.lowat == lowat {
            return;
        }
        self.lowat = lowat;
        #[cfg(unix)]
        {
            let v: libc::c_int = lowat;
            // SAFETY: `fd` is the open socket owned by the reader's stream half (it
            // lives as long as this reader); the option value is a c_int of the
            // size passed.
            let r = unsafe {
                libc::setsockopt(
                    self.fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVLOWAT,
                    (&v as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if r != 0 {
                tracing::debug!(error = %std::io::Error::last_os_error(), "SO_RCVLOWAT not set");
            }
        }
    }

    /// Bytes queued on the socket and not read yet (0 if unknown).
    fn queued(&self) -> i32 {
        #[cfg(unix)]
        {
            let mut n: libc::c_int = 0;
            // SAFETY: as in `set`; FIONREAD writes one c_int.
            let r = unsafe { libc::ioctl(self.fd, libc::FIONREAD, &mut n as *mut libc::c_int) };
            if r == 0 {
                return n;
            }
        }
        0
    }
}

impl FrameReader {
    fn new(inner: Reader, tcp: Option<LowWater>, endpoint: String) -> FrameReader {
        FrameReader {
            inner,
            buf: BytesMut::with_capacity(READ_CHUNK),
            tcp,
            endpoint,
        }
    }

    /// Streaming mode: reads wait for [`BATCH_BYTES`] while the stream flows.
    pub fn batch_reads(&mut self) {
        if let Some(t) = self.tcp.as_mut() {
            t.streaming = true;
        }
    }

    /// The next message if the buffer holds all of it; `Err` carries the tag and
    /// length of a message whose length is invalid.
    fn parse(&mut self) -> Result<Option<BackendMessage>, (u8, i32)> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let tag = self.buf[0];
        let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        if !(4..=1 << 30).contains(&len) {
            return Err((tag, len));
        }
        let total = 1 + len as usize;
        if self.buf.len() < total {
            self.buf.reserve(total - self.buf.len());
            return Ok(None);
        }
        let mut msg = self.buf.split_to(total);
        msg.advance(5);
        Ok(Some(BackendMessage {
            tag,
            body: msg.freeze(),
        }))
    }

    pub(crate) async fn read(&mut self) -> Result<BackendMessage, PgError> {
        loop {
            match self.parse() {
                Ok(Some(m)) => return Ok(m),
                Ok(None) => self.fill().await?,
                Err((tag, len)) => {
                    return Err(PgError::Protocol {
                        endpoint: self.endpoint.clone(),
                        message: format!("message {:?} with invalid length {len}", tag as char),
                    })
                }
            }
        }
    }

    /// Reads more bytes into the buffer (cancel-safe: `read_buf` keeps nothing
    /// half-read).
    async fn fill(&mut self) -> Result<(), PgError> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        let r = match self.tcp.as_mut() {
            Some(t) if t.streaming => {
                t.set(BATCH_BYTES);
                let mut waited = Duration::ZERO;
                let mut seen = 0;
                loop {
                    match tokio::time::timeout(BATCH_TICK, self.inner.read_buf(&mut self.buf)).await
                    {
                        Ok(r) => break r,
                        Err(_) => {
                            waited += BATCH_TICK;
                            let queued = t.queued();
                            if queued - seen >= BATCH_FLOWING && waited < BATCH_MAX_WAIT {
                                seen = queued;
                                continue;
                            }
                            // Quiet (or waited long enough): take what is there.
                            t.set(1);
                            break self.inner.read_buf(&mut self.buf).await;
                        }
                    }
                }
            }
            _ => self.inner.read_buf(&mut self.buf).await,
        };
        match r {
            Ok(0) => Err(PgError::Io {
                endpoint: self.endpoint.clone(),
                source: std::io::ErrorKind::UnexpectedEof.into(),
            }),
            Ok(_) => Ok(()),
            Err(source) => Err(PgError::Io {
                endpoint: self.endpoint.clone(),
                source,
            }),
        }
    }
}

impl FrameWriter {
    pub(crate) async fn send(&mut self, buf: &[u8]) -> Result<(), PgError> {
        let io = |source| PgError::Io {
            endpoint: self.endpoint.clone(),
            source,
        };
        self.inner.write_all(buf).await.map_err(io)?;
        self.inner.flush().await.map_err(io)
    }

    /// Sends a Standby Status Update ('r').
    pub async fn send_status(
        &mut self,
        written: Lsn,
        flushed: Lsn,
        applied: Lsn,
        reply_requested: bool,
    ) -> Result<(), PgError> {
        let mut payload = BytesMut::with_capacity(34);
        payload.put_u8(b'r');
        payload.put_u64(written.0);
        payload.put_u64(flushed.0);
        payload.put_u64(applied.0);
        payload.put_i64(switchback_core::time::now_pg());
        payload.put_u8(u8::from(reply_requested));
        let mut out = BytesMut::new();
        frontend::CopyData::new(&payload[..])
            .map_err(|e| PgError::Protocol {
                endpoint: self.endpoint.clone(),
                message: e.to_string(),
            })?
            .write(&mut out);
        self.send(&out).await
    }

    /// Ends the stream (CopyDone) and the connection (Terminate).
    pub async fn close(&mut self) -> Result<(), PgError> {
        let mut out = BytesMut::new();
        frontend::copy_done(&mut out);
        frontend::terminate(&mut out);
        self.send(&out).await
    }
}

pub(crate) fn parse_error_fields(mut body: &[u8]) -> ServerError {
    let mut e = ServerError::default();
    while let Some((&field, rest)) = body.split_first() {
        if field == 0 {
            break;
        }
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        let value = String::from_utf8_lossy(&rest[..end]).into_owned();
        match field {
            b'S' => e.severity = value,
            b'C' => e.code = value,
            b'M' => e.message = value,
            b'D' => e.detail = Some(value),
            b'H' => e.hint = Some(value),
            _ => {}
        }
        body = rest.get(end + 1..).unwrap_or(&[]);
    }
    e
}

/// Result of IDENTIFY_SYSTEM.
#[derive(Debug, Clone)]
pub struct SystemInfo {
    pub system_id: String,
    pub timeline: u32,
    pub xlog_pos: Lsn,
    pub dbname: Option<String>,
}

/// Result of CREATE_REPLICATION_SLOT.
#[derive(Debug, Clone)]
pub struct CreatedSlot {
    pub name: String,
    pub consistent_point: Lsn,
    pub snapshot_name: Option<String>,
}

/// A replication connection before streaming.
pub struct ReplicationClient {
    pub(crate) reader: FrameReader,
    pub(crate) writer: FrameWriter,
    pub(crate) endpoint: String,
    /// ParameterStatus values reported by the server (server_version, ...).
    pub parameters: HashMap<String, String>,
}

/// Describes where a connection goes, for messages (never the password).
pub fn endpoint_name(cfg: &tokio_postgres::Config) -> String {
    let host = match cfg.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let db = cfg.get_dbname().or(cfg.get_user()).unwrap_or("postgres");
    format!("{host}:{port}/{db}")
}

impl ReplicationClient {
    /// Opens a logical replication connection (`replication=database`).
    pub async fn connect(
        cfg: &tokio_postgres::Config,
        application_name: &str,
    ) -> Result<ReplicationClient, PgError> {
        Self::connect_with(cfg, application_name, true).await
    }

    /// Opens a connection, as a walsender (`replication`) or a normal backend.
    pub(crate) async fn connect_with(
        cfg: &tokio_postgres::Config,
        application_name: &str,
        replication: bool,
    ) -> Result<ReplicationClient, PgError> {
        let endpoint = endpoint_name(cfg);
        if cfg.get_ssl_mode() == SslMode::Require {
            return Err(PgError::Setup(format!(
                "{endpoint}: sslmode=require is not supported by switchback's replication client yet; \
                 use sslmode=disable or prefer on a trusted network"
            )));
        }
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        let connect_timeout = cfg
            .get_connect_timeout()
            .copied()
            .unwrap_or(Duration::from_secs(10));
        let conn_err = |source| PgError::Connect {
            endpoint: endpoint.clone(),
            source,
        };
        let (reader, writer, tcp): (Reader, Writer, Option<LowWater>) = match cfg
            .get_hosts()
            .first()
        {
            #[cfg(unix)]
            Some(Host::Unix(dir)) => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                let s =
                    tokio::time::timeout(connect_timeout, tokio::net::UnixStream::connect(path))
                        .await
                        .map_err(|_| conn_err(std::io::ErrorKind::TimedOut.into()))?
                        .map_err(conn_err)?;
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w), None)
            }
            host => {
                let host = match host {
                    Some(Host::Tcp(h)) => h.clone(),
                    _ => "localhost".to_string(),
                };
                let s = tokio::time::timeout(
                    connect_timeout,
                    tokio::net::TcpStream::connect((host.as_str(), port)),
                )
                .await
                .map_err(|_| conn_err(std::io::ErrorKind::TimedOut.into()))?
                .map_err(conn_err)?;
                s.set_nodelay(true).ok();
                let tcp = LowWater::new(
                    #[cfg(unix)]
                    std::os::fd::AsRawFd::as_raw_fd(&s),
                );
                let (r, w) = s.into_split();
                (Box::new(r), Box::new(w), Some(tcp))
            }
        };
        let mut client = ReplicationClient {
            reader: FrameReader::new(reader, tcp, endpoint.clone()),
            writer: FrameWriter {
                inner: writer,
                endpoint: endpoint.clone(),
            },
            endpoint,
            parameters: HashMap::new(),
        };
        client.startup(cfg, application_name, replication).await?;
        Ok(client)
    }

    fn protocol(&self, message: impl Into<String>) -> PgError {
        PgError::Protocol {
            endpoint: self.endpoint.clone(),
            message: message.into(),
        }
    }

    fn server_error(&self, body: &[u8]) -> PgError {
        PgError::Server {
            endpoint: self.endpoint.clone(),
            error: parse_error_fields(body),
        }
    }

    async fn startup(
        &mut self,
        cfg: &tokio_postgres::Config,
        application_name: &str,
        replication: bool,
    ) -> Result<(), PgError> {
        let user = cfg
            .get_user()
            .map(str::to_string)
            .or_else(|| std::env::var("USER").ok())
            .unwrap_or_else(|| "postgres".into());
        let dbname = cfg.get_dbname().unwrap_or(&user).to_string();
        let mut params = vec![
            ("user", user.as_str()),
            ("database", dbname.as_str()),
            ("application_name", application_name),
            ("client_encoding", "UTF8"),
            ("datestyle", "ISO"),
            ("intervalstyle", "postgres"),
            ("extra_float_digits", "3"),
        ];
        if let Some(options) = cfg.get_options() {
            params.push(("options", options));
        }
        if replication {
            params.push(("replication", "database"));
        }
        let mut buf = BytesMut::new();
        frontend::startup_message(params.iter().copied(), &mut buf)
            .map_err(|e| self.protocol(e.to_string()))?;
        self.writer.send(&buf).await?;

        let password = cfg.get_password().map(<[u8]>::to_vec);
        let mut scram: Option<ScramSha256> = None;
        loop {
            let msg = self.reader.read().await?;
            match msg.tag {
                b'R' => {
                    let mut body = msg.body.clone();
                    if body.len() < 4 {
                        return Err(self.protocol("short authentication message"));
                    }
                    let code = body.get_i32();
                    let need_pw = || {
                        PgError::Auth {
                        endpoint: self.endpoint.clone(),
                        message: "the server asks for a password and none is configured \
                                  (put it in the URL, SWITCHBACK_HUB_PASSWORD / SWITCHBACK_MEMBER_PASSWORD, or password_file)"
                            .into(),
                    }
                    };
                    let mut out = BytesMut::new();
                    match code {
                        0 => {}
                        3 => {
                            let pw = password.as_ref().ok_or_else(need_pw)?;
                            frontend::password_message(pw, &mut out)
                                .map_err(|e| self.protocol(e.to_string()))?;
                            self.writer.send(&out).await?;
                        }
                        5 => {
                            let pw = password.as_ref().ok_or_else(need_pw)?;
                            if body.len() < 4 {
                                return Err(self.protocol("short MD5 salt"));
                            }
                            let salt = [body[0], body[1], body[2], body[3]];
                            let hash = postgres_protocol::authentication::md5_hash(
                                user.as_bytes(),
                                pw,
                                salt,
                            );
                            frontend::password_message(hash.as_bytes(), &mut out)
                                .map_err(|e| self.protocol(e.to_string()))?;
                            self.writer.send(&out).await?;
                        }
                        10 => {
                            let pw = password.as_ref().ok_or_else(need_pw)?;
                            let mechs: Vec<&[u8]> =
                                body.split(|&b| b == 0).filter(|m| !m.is_empty()).collect();
                            if !mechs.contains(&&b"SCRAM-SHA-256"[..]) {
                                return Err(PgError::Auth {
                                    endpoint: self.endpoint.clone(),
                                    message: "the server offers no SASL mechanism switchback supports (SCRAM-SHA-256)".into(),
                                });
                            }
                            let s = ScramSha256::new(pw, ChannelBinding::unsupported());
                            frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut out)
                                .map_err(|e| self.protocol(e.to_string()))?;
                            self.writer.send(&out).await?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram
                                .as_mut()
                                .ok_or_else(|| self.protocol("SASL continue without start"))?;
                            s.update(&body).map_err(|e| PgError::Auth {
                                endpoint: self.endpoint.clone(),
                                message: e.to_string(),
                            })?;
                            frontend::sasl_response(s.message(), &mut out)
                                .map_err(|e| self.protocol(e.to_string()))?;
                            self.writer.send(&out).await?;
                        }
                        12 => {
                            let s = scram
                                .as_mut()
                                .ok_or_else(|| self.protocol("SASL final without start"))?;
                            s.finish(&body).map_err(|e| PgError::Auth {
                                endpoint: self.endpoint.clone(),
                                message: e.to_string(),
                            })?;
                        }
                        other => {
                            return Err(PgError::Auth {
                                endpoint: self.endpoint.clone(),
                                message: format!("unsupported authentication method {other} (use scram-sha-256, md5, password or trust)"),
                            })
                        }
                    }
                }
                b'S' => {
                    let mut parts = msg.body.split(|&b| b == 0);
                    if let (Some(k), Some(v)) = (parts.next(), parts.next()) {
                        self.parameters.insert(
                            String::from_utf8_lossy(k).into_owned(),
                            String::from_utf8_lossy(v).into_owned(),
                        );
                    }
                }
                b'K' | b'N' => {}
                b'Z' => return Ok(()),
                b'E' => return Err(self.server_error(&msg.body)),
                other => {
                    return Err(self.protocol(format!(
                        "unexpected message {:?} during startup",
                        other as char
                    )))
                }
            }
        }
    }

    /// Runs a replication or SQL command with the simple query protocol and returns
    /// the rows of its (last) result as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, PgError> {
        simple_query(&mut self.reader, &mut self.writer, sql)
            .await
            .map(|(rows, _)| rows)
    }

    pub async fn identify_system(&mut self) -> Result<SystemInfo, PgError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows
            .first()
            .ok_or_else(|| self.protocol("IDENTIFY_SYSTEM returned no row"))?;
        let get = |i: usize| row.get(i).cloned().flatten();
        Ok(SystemInfo {
            system_id: get(0).unwrap_or_default(),
            timeline: get(1).and_then(|t| t.parse().ok()).unwrap_or(0),
            xlog_pos: get(2)
                .and_then(|l| l.parse().ok())
                .ok_or_else(|| self.protocol("IDENTIFY_SYSTEM returned no xlogpos"))?,
            dbname: get(3),
        })
    }

    /// `CREATE_REPLICATION_SLOT name LOGICAL pgoutput`, exporting a snapshot when
    /// asked (the snapshot lives until this connection runs another command).
    pub async fn create_logical_slot(
        &mut self,
        name: &str,
        export_snapshot: bool,
    ) -> Result<CreatedSlot, PgError> {
        let snap = if export_snapshot {
            "EXPORT_SNAPSHOT"
        } else {
            "NOEXPORT_SNAPSHOT"
        };
        let sql = format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput {snap}",
            switchback_core::quote_ident(name)
        );
        let rows = self.simple_query(&sql).await?;
        let row = rows
            .first()
            .ok_or_else(|| self.protocol("CREATE_REPLICATION_SLOT returned no row"))?;
        let get = |i: usize| row.get(i).cloned().flatten();
        Ok(CreatedSlot {
            name: get(0).unwrap_or_else(|| name.to_string()),
            consistent_point: get(1).and_then(|l| l.parse().ok()).ok_or_else(|| {
                self.protocol("CREATE_REPLICATION_SLOT returned no consistent_point")
            })?,
            snapshot_name: get(2),
        })
    }

    /// Starts logical streaming. `options` are pgoutput options, already quoted
    /// values (for example `("proto_version", "'2'")`).
    pub async fn start_replication(
        mut self,
        slot: &str,
        start: Lsn,
        options: &[(&str, String)],
    ) -> Result<(FrameReader, FrameWriter), PgError> {
        let opts = options
            .iter()
            .map(|(k, v)| format!("{} {v}", switchback_core::quote_ident(k)))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {start} ({opts})",
            switchback_core::quote_ident(slot)
        );
        let mut buf = BytesMut::new();
        frontend::query(&sql, &mut buf).map_err(|e| self.protocol(e.to_string()))?;
        self.writer.send(&buf).await?;
        loop {
            let msg = self.reader.read().await?;
            match msg.tag {
                b'W' => return Ok((self.reader, self.writer)),
                b'N' | b'S' => {}
                b'E' => {
                    let err = self.server_error(&msg.body);
                    return Err(err);
                }
                other => {
                    return Err(self.protocol(format!(
                        "unexpected message {:?} after START_REPLICATION",
                        other as char
                    )))
                }
            }
        }
    }
}

/// The simple query protocol on a connection: sends `sql`, returns the rows of
/// the last result as text and the transaction status of ReadyForQuery.
pub(crate) async fn simple_query(
    reader: &mut FrameReader,
    writer: &mut FrameWriter,
    sql: &str,
) -> Result<(Vec<Vec<Option<String>>>, u8), PgError> {
    let endpoint = reader.endpoint.clone();
    let protocol = |message: String| PgError::Protocol {
        endpoint: endpoint.clone(),
        message,
    };
    let mut buf = BytesMut::new();
    frontend::query(sql, &mut buf).map_err(|e| protocol(e.to_string()))?;
    writer.send(&buf).await?;
    let mut rows = Vec::new();
    let mut error = None;
    loop {
        let msg = reader.read().await?;
        match msg.tag {
            b'T' => rows.clear(),
            b'D' => rows.push(data_row(&msg.body).ok_or_else(|| protocol("short DataRow".into()))?),
            b'C' | b'I' | b'N' | b'S' => {}
            b'E' => {
                error = Some(PgError::Server {
                    endpoint: reader.endpoint.clone(),
                    error: parse_error_fields(&msg.body),
                })
            }
            b'Z' => {
                let status = msg.body.first().copied().unwrap_or(b'I');
                return match error {
                    Some(e) => Err(e),
                    None => Ok((rows, status)),
                };
            }
            other => {
                return Err(protocol(format!(
                    "unexpected message {:?} in query result",
                    other as char
                )))
            }
        }
    }
}

/// Decodes a DataRow body into text values (None for NULL).
fn data_row(body: &[u8]) -> Option<Vec<Option<String>>> {
    let mut b = body;
    if b.len() < 2 {
        return None;
    }
    let n = i16::from_be_bytes([b[0], b[1]]);
    b = &b[2..];
    let mut row = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        if b.len() < 4 {
            return None;
        }
        let len = i32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        b = &b[4..];
        if len < 0 {
            row.push(None);
        } else {
            let len = len as usize;
            if b.len() < len {
                return None;
            }
            row.push(Some(String::from_utf8_lossy(&b[..len]).into_owned()));
            b = &b[len..];
        }
    }
    Some(row)
}

/// What the stream delivers.
#[derive(Debug)]
pub enum StreamEvent {
    /// A CopyData payload (XLogData or keepalive, to be decoded by the caller).
    Data(Bytes),
    /// The server ended the stream (CopyDone).
    End,
}

impl FrameReader {
    /// Reads the next CopyData payload of a started stream.
    pub async fn next(&mut self) -> Result<StreamEvent, PgError> {
        loop {
            let msg = self.read().await?;
            match msg.tag {
                b'd' => return Ok(StreamEvent::Data(msg.body)),
                b'c' | b'C' | b'Z' => return Ok(StreamEvent::End),
                b'N' | b'S' => {}
                b'E' => {
                    return Err(PgError::Server {
                        endpoint: self.endpoint.clone(),
                        error: parse_error_fields(&msg.body),
                    })
                }
                other => {
                    return Err(PgError::Protocol {
                        endpoint: self.endpoint.clone(),
                        message: format!("unexpected message {:?} in stream", other as char),
                    })
                }
            }
        }
    }
}
