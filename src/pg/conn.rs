//! The socket: TCP or Unix, optional TLS, startup and authentication, message read/write and
//! simple queries. The only file in `pg` that does I/O.
//!
//! Cancellation: [`Connection::read_message`] and [`Connection::flush`] keep all state in the
//! connection's buffers (bytes read but not yet parsed stay in `rbuf`, bytes queued but not yet
//! written stay in `wbuf`), so dropping either future at an `.await` loses nothing and leaves the
//! byte stream intact. Callers build cancellation-safe operations out of them.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::Arc;

use bytes::BytesMut;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::auth::{tls_server_end_point, AuthProgress, Authenticator};
use super::config::{ConnConfig, Host, HostPort, SslMode};
use super::error::{Error, Result};
use super::message::{encode, parse_backend, BackendMessage};

/// Read buffer growth step. WAL arrives in CopyData messages of up to 128 KiB
/// (walsender's MAX_SEND_SIZE), so reads of this size keep syscalls few.
const READ_CHUNK: usize = 128 * 1024;

trait Socket: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Socket for T {}

/// One result set of a simple query: column names and text values (`None` = NULL).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResultSet {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Option<String>>>,
    /// The CommandComplete tag, e.g. `SELECT` or `CREATE_REPLICATION_SLOT`.
    pub tag: String,
}

/// A result set with values as raw bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawResultSet {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Option<bytes::Bytes>>>,
    pub tag: String,
}

/// An authenticated connection in walsender (physical replication) mode.
pub struct Connection {
    stream: Box<dyn Socket>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    params: HashMap<String, String>,
    host: HostPort,
    tls: bool,
    process_id: i32,
    sasl_mechanism: Option<&'static str>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("host", &self.host)
            .field("tls", &self.tls)
            .field("process_id", &self.process_id)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Opens, secures and authenticates one connection to `hp`, within `connect_timeout`.
    pub async fn connect(cfg: &ConnConfig, hp: &HostPort) -> Result<Connection> {
        Connection::connect_mode(cfg, hp, true).await
    }

    /// Like [`Connection::connect`], but an ordinary backend on `cfg.dbname` (default: the
    /// user's name) that runs SQL: `pitr check` needs `pg_switch_wal()` and the catalogs.
    pub async fn connect_sql(cfg: &ConnConfig, hp: &HostPort) -> Result<Connection> {
        Connection::connect_mode(cfg, hp, false).await
    }

    async fn connect_mode(cfg: &ConnConfig, hp: &HostPort, repl: bool) -> Result<Connection> {
        let attempt = async {
            match cfg.sslmode {
                // "allow": plaintext first, TLS only if the server turns plaintext down.
                SslMode::Allow => match Connection::connect_once(cfg, hp, false, repl).await {
                    Err(e @ (Error::Server { .. } | Error::Auth { .. }))
                        if matches!(hp.host, Host::Tcp(_)) =>
                    {
                        tracing::debug!(error = %e, "plaintext refused; retrying with TLS (sslmode=allow)");
                        Connection::connect_once(cfg, hp, true, repl).await
                    }
                    other => other,
                },
                SslMode::Disable => Connection::connect_once(cfg, hp, false, repl).await,
                _ => Connection::connect_once(cfg, hp, true, repl).await,
            }
        };
        match cfg.connect_timeout {
            None => attempt.await,
            Some(t) => tokio::time::timeout(t, attempt).await.unwrap_or_else(|_| {
                Err(Error::Timeout {
                    host: hp.host.to_string(),
                    port: hp.port,
                })
            }),
        }
    }

    async fn connect_once(
        cfg: &ConnConfig,
        hp: &HostPort,
        try_tls: bool,
        repl: bool,
    ) -> Result<Connection> {
        let connect_err = |source: io::Error| Error::Connect {
            host: hp.host.to_string(),
            port: hp.port,
            source,
        };
        let (stream, tls, end_point): (Box<dyn Socket>, bool, Option<Option<Vec<u8>>>) =
            match &hp.host {
                // libpq never uses TLS over a Unix socket: the kernel already protects it.
                Host::Unix(_) => {
                    let path = hp.socket_path().unwrap_or_default();
                    let s = UnixStream::connect(&path).await.map_err(|e| {
                        connect_err(io::Error::new(
                            e.kind(),
                            format!("{e} (socket {})", path.display()),
                        ))
                    })?;
                    (Box::new(s), false, None)
                }
                Host::Tcp(name) => {
                    let tcp = connect_tcp(name, hp).await.map_err(connect_err)?;
                    let _ = tcp.set_nodelay(true);
                    if try_tls {
                        match negotiate_tls(cfg, name, tcp).await? {
                            Negotiated::Tls(s, ep) => (s, true, Some(ep)),
                            Negotiated::Plain(s) => (Box::new(s), false, None),
                        }
                    } else {
                        (Box::new(tcp), false, None)
                    }
                }
            };
        let mut conn = Connection {
            stream,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: BytesMut::new(),
            params: HashMap::new(),
            host: hp.clone(),
            tls,
            process_id: 0,
            sasl_mechanism: None,
        };
        conn.startup(cfg, hp, end_point, repl).await?;
        Ok(conn)
    }

    async fn startup(
        &mut self,
        cfg: &ConnConfig,
        hp: &HostPort,
        end_point: Option<Option<Vec<u8>>>,
        repl: bool,
    ) -> Result<()> {
        // replication=true: a physical walsender, which accepts replication commands and SHOW
        // only. The database parameter is meaningless there and is not sent.
        let mut params: Vec<(&str, &str)> = vec![("user", &cfg.user)];
        if repl {
            params.push(("replication", "true"));
        } else {
            params.push(("database", cfg.dbname.as_deref().unwrap_or(&cfg.user)));
        }
        if let Some(app) = &cfg.application_name {
            params.push(("application_name", app));
        }
        if let Some(o) = &cfg.options {
            params.push(("options", o));
        }
        encode::startup(&params, &mut self.wbuf)?;
        self.flush().await?;

        let mut auth = Authenticator::new(&cfg.user, cfg.password_for(hp), end_point);
        loop {
            match self.read_message().await? {
                BackendMessage::Authentication(req) => {
                    let progress = auth.step(req, &mut self.wbuf)?;
                    self.flush().await?;
                    if progress == AuthProgress::Done {
                        self.sasl_mechanism = auth.mechanism();
                        tracing::debug!(user = %cfg.user, sasl = self.sasl_mechanism, "authenticated");
                        break;
                    }
                }
                BackendMessage::ErrorResponse(f) => {
                    // Refusals during authentication (class 28) are Auth errors; the rest
                    // (too many connections, starting up) stay Server errors for retry policy.
                    if f.code.starts_with("28") {
                        return Err(Error::Auth {
                            user: cfg.user.clone(),
                            sqlstate: Some(f.code),
                            message: f.message,
                        });
                    }
                    return Err(f.into_error());
                }
                // We ask for protocol 3.0 and no _pq_ options, so a downgrade notice is harmless.
                BackendMessage::NegotiateProtocolVersion { .. } => {}
                other => return Err(unexpected("authentication", &other)),
            }
        }
        loop {
            match self.read_message().await? {
                BackendMessage::BackendKeyData { process_id, .. } => self.process_id = process_id,
                BackendMessage::ReadyForQuery { .. } => break,
                BackendMessage::ErrorResponse(f) => return Err(f.into_error()),
                other => return Err(unexpected("startup", &other)),
            }
        }
        tracing::debug!(
            host = %hp.host, port = hp.port, tls = self.tls,
            server_version = self.parameter("server_version").unwrap_or("?"),
            "connected"
        );
        Ok(())
    }

    /// A parameter the server reported with ParameterStatus (`server_version`,
    /// `in_hot_standby`, `integer_datetimes`, …).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }

    pub fn host(&self) -> &HostPort {
        &self.host
    }

    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The SASL mechanism used to log in (`SCRAM-SHA-256` or, over TLS with channel binding,
    /// `SCRAM-SHA-256-PLUS`); `None` for trust, password and md5.
    pub fn sasl_mechanism(&self) -> Option<&'static str> {
        self.sasl_mechanism
    }

    /// The backend's process id (`pg_stat_replication.pid`).
    pub fn process_id(&self) -> i32 {
        self.process_id
    }

    /// The write buffer: encode messages into it, then [`Connection::flush`].
    pub(crate) fn wbuf(&mut self) -> &mut BytesMut {
        &mut self.wbuf
    }

    /// Writes out everything queued in the write buffer.
    ///
    /// Cancellation-safe: `write_buf` advances the buffer by exactly what the kernel accepted,
    /// so a dropped flush leaves the unsent tail queued for the next one.
    pub async fn flush(&mut self) -> Result<()> {
        while !self.wbuf.is_empty() {
            let n = self
                .stream
                .write_buf(&mut self.wbuf)
                .await
                .map_err(|e| Error::io("write", e))?;
            if n == 0 {
                return Err(Error::io("write", io::ErrorKind::WriteZero.into()));
            }
        }
        self.stream.flush().await.map_err(|e| Error::io("flush", e))
    }

    /// Reads the next message, handling the asynchronous ones on the way: ParameterStatus is
    /// recorded and NoticeResponse is logged at debug level.
    ///
    /// Cancellation-safe: partial messages stay in the read buffer.
    pub async fn read_message(&mut self) -> Result<BackendMessage> {
        loop {
            if let Some(msg) = parse_backend(&mut self.rbuf)? {
                match msg {
                    BackendMessage::ParameterStatus { name, value } => {
                        self.params.insert(name, value);
                    }
                    BackendMessage::NoticeResponse(f) => {
                        tracing::debug!(severity = %f.severity, sqlstate = %f.code, detail = ?f.detail, "server notice: {}", f.message);
                    }
                    BackendMessage::Ignored { .. } => {}
                    m => return Ok(m),
                }
                continue;
            }
            if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
                self.rbuf.reserve(READ_CHUNK);
            }
            let n = self
                .stream
                .read_buf(&mut self.rbuf)
                .await
                .map_err(|e| Error::io("read", e))?;
            if n == 0 {
                return Err(Error::Closed {
                    context: if self.rbuf.is_empty() {
                        "between messages"
                    } else {
                        "in the middle of a message"
                    },
                });
            }
        }
    }

    /// Sends a query and collects its result sets until ReadyForQuery. On ErrorResponse the
    /// rest of the response is still drained, so the connection stays usable.
    ///
    /// Not cancellation-safe: dropping it mid-way leaves the response partly read; drop the
    /// connection too in that case.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<ResultSet>> {
        let raw = self.simple_query_raw(sql).await?;
        Ok(raw
            .into_iter()
            .map(|set| ResultSet {
                columns: set.columns,
                rows: set
                    .rows
                    .into_iter()
                    .map(|row| {
                        row.into_iter()
                            .map(|v| v.map(|b| String::from_utf8_lossy(&b).into_owned()))
                            .collect()
                    })
                    .collect(),
                tag: set.tag,
            })
            .collect())
    }

    /// [`Connection::simple_query`] with values as the raw bytes the server sent (for
    /// TIMELINE_HISTORY, whose content column is a file, not text).
    pub async fn simple_query_raw(&mut self, sql: &str) -> Result<Vec<RawResultSet>> {
        tracing::trace!(sql, "query");
        encode::query(sql, &mut self.wbuf)?;
        self.flush().await?;
        let mut sets = Vec::new();
        let mut current = RawResultSet::default();
        let mut error = None;
        loop {
            match self.read_message().await? {
                BackendMessage::RowDescription { columns } => {
                    current.columns = columns.into_iter().map(|c| c.name).collect();
                }
                BackendMessage::DataRow { values } => current.rows.push(values),
                BackendMessage::CommandComplete { tag } => {
                    current.tag = tag;
                    sets.push(std::mem::take(&mut current));
                }
                BackendMessage::EmptyQueryResponse => {}
                BackendMessage::ErrorResponse(f) => error = Some(f.into_error()),
                BackendMessage::ReadyForQuery { .. } => break,
                // A COPY we did not ask for: we cannot continue the conversation.
                other => return Err(unexpected("simple query response", &other)),
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(sets),
        }
    }

    /// Sends Terminate and closes the socket, ignoring errors: the server cleans up either way.
    pub async fn close(mut self) {
        encode::terminate(&mut self.wbuf);
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
    }
}

pub(crate) fn unexpected(context: &'static str, msg: &BackendMessage) -> Error {
    let name = match msg {
        BackendMessage::CopyData(d) => format!("CopyData ({} bytes)", d.len()),
        other => format!("{other:?}").chars().take(120).collect(),
    };
    Error::protocol(context, format!("unexpected message {name}"))
}

async fn connect_tcp(name: &str, hp: &HostPort) -> io::Result<TcpStream> {
    if let Some(addr) = hp.hostaddr {
        return TcpStream::connect((addr, hp.port)).await;
    }
    let mut last = io::Error::new(io::ErrorKind::NotFound, "host name resolved to no address");
    for addr in tokio::net::lookup_host((name, hp.port)).await? {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

enum Negotiated {
    Tls(Box<dyn Socket>, Option<Vec<u8>>),
    Plain(TcpStream),
}

/// SSLRequest, then a TLS handshake if the server answers 'S'.
async fn negotiate_tls(cfg: &ConnConfig, name: &str, mut tcp: TcpStream) -> Result<Negotiated> {
    let tls_err = |message: String| Error::Tls {
        host: name.to_string(),
        message,
    };
    let mut req = BytesMut::new();
    encode::ssl_request(&mut req);
    tcp.write_all(&req)
        .await
        .map_err(|e| Error::io("SSLRequest", e))?;
    // Read exactly one byte: anything the server sent after it before the handshake would be
    // unauthenticated plaintext (CVE-2021-23222), so it must not be buffered.
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer)
        .await
        .map_err(|e| Error::io("SSLRequest answer", e))?;
    match answer[0] {
        b'S' => {}
        b'N' => {
            if matches!(
                cfg.sslmode,
                SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
            ) {
                return Err(tls_err(format!(
                    "server does not support SSL, but sslmode={:?} requires it",
                    cfg.sslmode
                )));
            }
            return Ok(Negotiated::Plain(tcp));
        }
        // Pre-7.0 servers answer with an ErrorResponse; no server we support does.
        other => {
            return Err(Error::protocol(
                "SSLRequest",
                format!("unexpected answer byte 0x{other:02x}"),
            ))
        }
    }
    let config = tls_client_config(cfg).map_err(tls_err)?;
    let server_name = match name.parse::<std::net::IpAddr>() {
        Ok(ip) => ServerName::IpAddress(ip.into()),
        Err(_) => ServerName::try_from(name.to_string())
            .map_err(|e| tls_err(format!("invalid host name for TLS: {e}")))?,
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let stream = connector
        .connect(server_name, tcp)
        .await
        .map_err(|e| tls_err(format!("handshake failed: {e}")))?;
    let end_point = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| tls_server_end_point(c.as_ref()));
    Ok(Negotiated::Tls(Box::new(stream), end_point))
}

fn tls_client_config(cfg: &ConnConfig) -> std::result::Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;

    // libpq: with sslmode=require, an existing root certificate file upgrades to verify-ca.
    let root_file = cfg
        .sslrootcert
        .as_deref()
        .filter(|p| p == &Path::new("system") || p.exists());
    let verify = match cfg.sslmode {
        SslMode::VerifyFull => Some(true),
        SslMode::VerifyCa => Some(false),
        SslMode::Require if root_file.is_some() => Some(false),
        _ => None,
    };
    let verifier: Arc<dyn ServerCertVerifier> = match verify {
        None => Arc::new(NoVerification(provider.clone())),
        Some(check_name) => {
            let mut roots = rustls::RootCertStore::empty();
            let mut root_certs = Vec::new();
            match root_file {
                Some(p) if p == Path::new("system") => {
                    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
                }
                Some(p) => {
                    use rustls::pki_types::pem::PemObject;
                    for cert in CertificateDer::pem_file_iter(p).map_err(|e| {
                        format!("cannot read root certificate file {}: {e}", p.display())
                    })? {
                        let cert = cert.map_err(|e| {
                            format!("invalid root certificate file {}: {e}", p.display())
                        })?;
                        roots
                            .add(cert.clone())
                            .map_err(|e| format!("unusable root certificate: {e}"))?;
                        root_certs.push(cert);
                    }
                }
                None => {
                    return Err(format!(
                        "sslmode={:?} needs a root certificate: set sslrootcert (or \
                         sslrootcert=system to use the public CA roots)",
                        cfg.sslmode
                    ))
                }
            }
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .map_err(|e| e.to_string())?;
            Arc::new(RootVerifier {
                webpki,
                roots: root_certs,
                check_name,
            })
        }
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match (&cfg.sslcert, &cfg.sslkey) {
        (Some(cert), Some(key)) if cert.exists() => {
            use rustls::pki_types::pem::PemObject;
            let certs = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
                .map_err(|e| format!("cannot read client certificate {}: {e}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("cannot read client key {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("unusable client certificate: {e}"))?
        }
        _ => builder.with_no_client_auth(),
    };
    // PostgreSQL 17 checks the ALPN protocol name; older servers ignore it.
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(config)
}

/// sslmode=prefer/require without a root certificate: encrypt, but accept any certificate, as
/// libpq does. Handshake signatures are still checked so that the session keys are bound to the
/// presented certificate (which SCRAM-SHA-256-PLUS then binds to the password).
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// sslmode=verify-ca / verify-full: the chain must lead to a root in `sslrootcert`; the host
/// name is checked only for verify-full.
///
/// A server certificate that is itself listed in `sslrootcert` is trusted directly, as OpenSSL
/// (and so libpq) does: DBAs commonly copy a self-signed `server.crt` to `root.crt`, which
/// webpki alone refuses as "CA used as end entity".
#[derive(Debug)]
struct RootVerifier {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    roots: Vec<CertificateDer<'static>>,
    check_name: bool,
}

impl ServerCertVerifier for RootVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let result =
            self.webpki
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now);
        match result {
            Ok(v) => Ok(v),
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            Err(e) => {
                if !self.roots.iter().any(|r| r.as_ref() == end_entity.as_ref()) {
                    return Err(e);
                }
                if self.check_name {
                    let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
                    rustls::client::verify_server_name(&parsed, server_name)?;
                }
                Ok(ServerCertVerified::assertion())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// `server_version` ("15.8 (Debian 15.8-1.pgdg120+1)", "16beta1", "9.6.24") as
/// `server_version_num` (150008, 160000, 90624). ParameterStatus carries only the string.
pub fn parse_server_version(v: &str) -> Option<u32> {
    let v = v.trim();
    let mut parts = v.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next()?.parse().ok()?;
    let rest = &v[major.to_string().len()..];
    let minor_of = |s: &str| -> u32 {
        s.strip_prefix('.')
            .map(|s| {
                s.chars()
                    .take_while(|c| c.is_ascii_digit())
                    .collect::<String>()
            })
            .and_then(|d| d.parse().ok())
            .unwrap_or(0)
    };
    if major >= 10 {
        Some(major * 10000 + minor_of(rest))
    } else {
        let minor = minor_of(rest);
        let after_minor = rest
            .strip_prefix('.')
            .map(|s| s.trim_start_matches(|c: char| c.is_ascii_digit()))
            .unwrap_or("");
        Some(major * 10000 + minor * 100 + minor_of(after_minor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions() {
        for (s, n) in [
            ("15.8 (Debian 15.8-1.pgdg120+1)", 150008),
            ("17.0", 170000),
            ("16beta1", 160000),
            ("13.22", 130022),
            ("9.6.24", 90624),
            ("10.1", 100001),
            ("18devel", 180000),
        ] {
            assert_eq!(parse_server_version(s), Some(n), "{s}");
        }
        assert_eq!(parse_server_version("devel"), None);
        assert_eq!(parse_server_version(""), None);
    }
}
