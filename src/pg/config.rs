//! Connection settings the way DBAs already write them for libpq: `key=value` conninfo strings,
//! `postgres://` URLs (several hosts allowed), the `PG*` environment variables and `~/.pgpass`.
//!
//! Parsing is pure (the environment is passed in as a function) so that every rule is testable;
//! only [`ConnConfig::parse`] reads the real environment, and the password file is read at
//! connect time because its match depends on the host being tried.
//!
//! Reference: PostgreSQL docs, libpq "Connection Strings", "Parameter Key Words",
//! "Environment Variables", "The Password File".

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::auth::Password;
use super::error::{Error, Result};

pub const DEFAULT_PORT: u16 = 5432;
/// Debian's and most distributions' `DEFAULT_PGSOCKET_DIR` (upstream's default is /tmp).
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/postgresql";

/// Where to connect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    /// A host name or IP address, connected over TCP.
    Tcp(String),
    /// A directory holding the Unix socket `.s.PGSQL.<port>`.
    Unix(PathBuf),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Tcp(h) => f.write_str(h),
            Host::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

/// One entry of the host list, tried in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPort {
    pub host: Host,
    pub port: u16,
    /// `hostaddr`: the address to connect to instead of resolving `host`, which is then used
    /// only for TLS verification and `.pgpass` matching.
    pub hostaddr: Option<IpAddr>,
}

impl HostPort {
    /// The Unix socket path, for a Unix-socket host.
    pub fn socket_path(&self) -> Option<PathBuf> {
        match &self.host {
            Host::Unix(dir) => Some(dir.join(format!(".s.PGSQL.{}", self.port))),
            Host::Tcp(_) => None,
        }
    }
}

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    /// Try without TLS first; retry with TLS if the server refuses the plaintext connection.
    Allow,
    /// Try TLS first; continue in plaintext if the server does not support it.
    #[default]
    Prefer,
    /// TLS, certificate not verified (unless a root certificate file exists, as in libpq).
    Require,
    /// TLS, certificate chain verified against `sslrootcert`, host name not checked.
    VerifyCa,
    /// TLS, chain and host name verified.
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<SslMode> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => return Err(Error::config(format!("invalid sslmode value: {other:?}"))),
        })
    }
}

/// libpq's `target_session_attrs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TargetSessionAttrs {
    #[default]
    Any,
    ReadWrite,
    ReadOnly,
    Primary,
    Standby,
    /// A standby if any host is one, otherwise any server.
    PreferStandby,
}

impl TargetSessionAttrs {
    fn parse(s: &str) -> Result<TargetSessionAttrs> {
        Ok(match s {
            "any" => TargetSessionAttrs::Any,
            "read-write" => TargetSessionAttrs::ReadWrite,
            "read-only" => TargetSessionAttrs::ReadOnly,
            "primary" => TargetSessionAttrs::Primary,
            "standby" => TargetSessionAttrs::Standby,
            "prefer-standby" => TargetSessionAttrs::PreferStandby,
            other => {
                return Err(Error::config(format!(
                    "invalid target_session_attrs value: {other:?}"
                )))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TargetSessionAttrs::Any => "any",
            TargetSessionAttrs::ReadWrite => "read-write",
            TargetSessionAttrs::ReadOnly => "read-only",
            TargetSessionAttrs::Primary => "primary",
            TargetSessionAttrs::Standby => "standby",
            TargetSessionAttrs::PreferStandby => "prefer-standby",
        }
    }
}

/// Parsed connection settings: conninfo, then `PG*` environment, then defaults.
#[derive(Clone, Debug)]
pub struct ConnConfig {
    /// Tried in order; never empty.
    pub hosts: Vec<HostPort>,
    pub user: String,
    /// From the conninfo or PGPASSWORD. When `None`, the password file is consulted per host.
    pub password: Option<Password>,
    /// Only used to match `.pgpass` lines: a physical replication connection has no database.
    pub dbname: Option<String>,
    pub application_name: Option<String>,
    /// `None` waits forever (libpq's 0).
    pub connect_timeout: Option<Duration>,
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
    pub target_session_attrs: TargetSessionAttrs,
    /// `passfile` / PGPASSFILE, default `~/.pgpass`.
    pub passfile: Option<PathBuf>,
    /// `options`: command-line options sent to the server at startup (e.g. `-c wal_sender_timeout=0`).
    pub options: Option<String>,
}

/// Keywords we understand. Others are refused, as libpq does, so a typo is not silently ignored.
const KEYWORDS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "user",
    "password",
    "dbname",
    "application_name",
    "fallback_application_name",
    "connect_timeout",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "target_session_attrs",
    "passfile",
    "options",
    "replication",
    // accepted and ignored: they tune behaviour we do not implement or do not need
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "sslsni",
    "sslcompression",
    "client_encoding",
    "channel_binding",
];

/// Environment variables and the keyword each one supplies.
const ENV_VARS: &[(&str, &str)] = &[
    ("PGHOST", "host"),
    ("PGHOSTADDR", "hostaddr"),
    ("PGPORT", "port"),
    ("PGUSER", "user"),
    ("PGPASSWORD", "password"),
    ("PGDATABASE", "dbname"),
    ("PGAPPNAME", "application_name"),
    ("PGCONNECT_TIMEOUT", "connect_timeout"),
    ("PGSSLMODE", "sslmode"),
    ("PGSSLROOTCERT", "sslrootcert"),
    ("PGSSLCERT", "sslcert"),
    ("PGSSLKEY", "sslkey"),
    ("PGTARGETSESSIONATTRS", "target_session_attrs"),
    ("PGPASSFILE", "passfile"),
    ("PGOPTIONS", "options"),
];

impl ConnConfig {
    /// The same settings for `host` alone, whatever role it has (`target_session_attrs=any`):
    /// for talking to each server of a multi-host conninfo in turn.
    pub fn only(&self, host: &HostPort) -> ConnConfig {
        ConnConfig {
            hosts: vec![host.clone()],
            target_session_attrs: TargetSessionAttrs::Any,
            ..self.clone()
        }
    }

    /// Parses a conninfo string (`host=db1 user=repl`) or URL (`postgres://repl@db1/`), filling
    /// gaps from the process environment and libpq's defaults. `""` takes everything from the
    /// environment.
    pub fn parse(conninfo: &str) -> Result<ConnConfig> {
        ConnConfig::parse_with_env(conninfo, |k| std::env::var(k).ok())
    }

    /// [`ConnConfig::parse`] with the environment supplied by the caller (for tests, and for
    /// callers that must not read the process environment).
    pub fn parse_with_env(
        conninfo: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<ConnConfig> {
        let mut kv = parse_conninfo(conninfo)?;
        for (var, key) in ENV_VARS {
            if !kv.contains_key(*key) {
                if let Some(v) = env(var).filter(|v| !v.is_empty()) {
                    kv.insert(key.to_string(), v);
                }
            }
        }
        ConnConfig::from_keywords(kv, &env)
    }

    fn from_keywords(
        mut kv: BTreeMap<String, String>,
        env: &impl Fn(&str) -> Option<String>,
    ) -> Result<ConnConfig> {
        if let Some(k) = kv.keys().find(|k| !KEYWORDS.contains(&k.as_str())) {
            return Err(Error::config(format!("invalid connection option {k:?}")));
        }
        if let Some(r) = kv.get("replication") {
            if !matches!(r.as_str(), "true" | "on" | "yes" | "1") {
                return Err(Error::config(format!(
                    "replication={r:?}: pitr always opens a physical replication connection"
                )));
            }
        }
        let mut take = |k: &str| kv.remove(k).filter(|v| !v.is_empty());

        let hosts = build_hosts(take("host"), take("hostaddr"), take("port"))?;
        let user = match take("user") {
            Some(u) => u,
            None => os_user_name(env).ok_or_else(|| {
                Error::config("no user given and the operating-system user name is unknown")
            })?,
        };
        let connect_timeout = match take("connect_timeout") {
            None => None,
            Some(s) => {
                let secs: i64 = s
                    .trim()
                    .parse()
                    .map_err(|_| Error::config(format!("invalid connect_timeout value: {s:?}")))?;
                // libpq: 0 or negative waits forever; 1 is raised to 2 seconds.
                (secs > 0).then(|| Duration::from_secs(secs.max(2) as u64))
            }
        };
        let sslmode = take("sslmode")
            .map(|s| SslMode::parse(&s))
            .transpose()?
            .unwrap_or_default();
        let target_session_attrs = take("target_session_attrs")
            .map(|s| TargetSessionAttrs::parse(&s))
            .transpose()?
            .unwrap_or_default();
        let application_name =
            take("application_name").or_else(|| take("fallback_application_name"));
        let passfile = take("passfile")
            .map(PathBuf::from)
            .or_else(|| env("HOME").map(|h| Path::new(&h).join(".pgpass")));
        let home_file =
            |name: &str| env("HOME").map(|h| Path::new(&h).join(".postgresql").join(name));
        Ok(ConnConfig {
            hosts,
            user,
            password: take("password").map(Password::new),
            dbname: take("dbname"),
            application_name,
            connect_timeout,
            sslmode,
            sslrootcert: take("sslrootcert")
                .map(PathBuf::from)
                .or_else(|| home_file("root.crt")),
            sslcert: take("sslcert")
                .map(PathBuf::from)
                .or_else(|| home_file("postgresql.crt")),
            sslkey: take("sslkey")
                .map(PathBuf::from)
                .or_else(|| home_file("postgresql.key")),
            target_session_attrs,
            passfile,
            options: take("options"),
        })
    }

    /// Sets `application_name`, shown in `pg_stat_replication`.
    pub fn application_name(mut self, name: impl Into<String>) -> ConnConfig {
        self.application_name = Some(name.into());
        self
    }

    /// Sets the password (overrides the environment and the password file).
    pub fn password(mut self, password: Password) -> ConnConfig {
        self.password = Some(password);
        self
    }

    /// The password to use for `hp`: the configured one, else the first matching line of the
    /// password file. A password file readable by group or others is ignored with a warning,
    /// as libpq does, because it would leak the secrets it holds.
    pub fn password_for(&self, hp: &HostPort) -> Option<Password> {
        if let Some(p) = &self.password {
            return Some(p.clone());
        }
        let path = self.passfile.as_ref()?;
        let contents = read_passfile(path)?;
        let host = match &hp.host {
            Host::Unix(dir) if dir == Path::new(DEFAULT_SOCKET_DIR) => "localhost".to_string(),
            other => other.to_string(),
        };
        // pg_basebackup and pg_receivewal match the "replication" database.
        let db = self.dbname.as_deref().unwrap_or("replication");
        pgpass_lookup(&contents, &host, hp.port, db, &self.user).map(Password::new)
    }
}

fn read_passfile(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() {
        tracing::warn!(path = %path.display(), "password file is not a plain file; ignored");
        return None;
    }
    if meta.mode() & 0o077 != 0 {
        tracing::warn!(
            path = %path.display(),
            "password file has group or world access; permissions should be u=rw (0600) or less; ignored"
        );
        return None;
    }
    match std::fs::read_to_string(path) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read password file");
            None
        }
    }
}

/// The password from the first `.pgpass` line matching the connection, per libpq: fields
/// `hostname:port:database:username:password`, `*` matches anything in the first four, `\`
/// escapes `:` and `\`, lines starting with `#` are comments.
pub fn pgpass_lookup(
    contents: &str,
    host: &str,
    port: u16,
    db: &str,
    user: &str,
) -> Option<String> {
    let port = port.to_string();
    for line in contents.lines() {
        let line = line.trim_end_matches('\r');
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let fields = split_pgpass_line(line);
        if fields.len() < 5 {
            continue;
        }
        let matches = |f: &(String, bool), want: &str| (f.0 == "*" && !f.1) || f.0 == want;
        if matches(&fields[0], host)
            && matches(&fields[1], &port)
            && matches(&fields[2], db)
            && matches(&fields[3], user)
        {
            // Everything after the fourth separator is the password, colons included.
            let pw = fields[4..]
                .iter()
                .map(|f| f.0.as_str())
                .collect::<Vec<_>>()
                .join(":");
            return Some(pw);
        }
    }
    None
}

/// Splits on unescaped ':'; each field with a flag saying whether it contained an escape (an
/// escaped `\*` is a literal star, not a wildcard).
fn split_pgpass_line(line: &str) -> Vec<(String, bool)> {
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut escaped_any = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                    escaped_any = true;
                }
            }
            ':' if fields.len() < 4 => {
                fields.push((std::mem::take(&mut cur), escaped_any));
                escaped_any = false;
            }
            c => cur.push(c),
        }
    }
    fields.push((cur, escaped_any));
    fields
}

fn build_hosts(
    host: Option<String>,
    hostaddr: Option<String>,
    port: Option<String>,
) -> Result<Vec<HostPort>> {
    let host_list: Vec<String> = host
        .map(|h| h.split(',').map(|s| s.trim().to_string()).collect())
        .unwrap_or_default();
    let addr_list: Vec<Option<IpAddr>> = match hostaddr {
        None => Vec::new(),
        Some(a) => a
            .split(',')
            .map(|s| {
                let s = s.trim();
                if s.is_empty() {
                    Ok(None)
                } else {
                    s.parse()
                        .map(Some)
                        .map_err(|_| Error::config(format!("invalid hostaddr {s:?}")))
                }
            })
            .collect::<Result<_>>()?,
    };
    if !host_list.is_empty() && !addr_list.is_empty() && host_list.len() != addr_list.len() {
        return Err(Error::config(format!(
            "could not match {} host names to {} hostaddr values",
            host_list.len(),
            addr_list.len()
        )));
    }
    // (host, hostaddr) pairs; an empty host entry means the default.
    let mut entries: Vec<(Option<Host>, Option<IpAddr>)> = Vec::new();
    let n = host_list.len().max(addr_list.len());
    for i in 0..n {
        let h = host_list.get(i).filter(|h| !h.is_empty()).map(|h| {
            if h.starts_with('/') {
                Host::Unix(PathBuf::from(h))
            } else {
                Host::Tcp(h.clone())
            }
        });
        let a = addr_list.get(i).copied().flatten();
        let h = match (h, a) {
            (Some(h), _) => Some(h),
            (None, Some(a)) => Some(Host::Tcp(a.to_string())),
            (None, None) => None,
        };
        entries.push((h, a));
    }
    let ports: Vec<Option<u16>> = match port {
        None => Vec::new(),
        Some(p) => p
            .split(',')
            .map(|s| {
                let s = s.trim();
                if s.is_empty() {
                    return Ok(None);
                }
                match s.parse::<u16>() {
                    Ok(p) if p > 0 => Ok(Some(p)),
                    _ => Err(Error::config(format!("invalid port number: {s:?}"))),
                }
            })
            .collect::<Result<_>>()?,
    };
    let host_count = entries.len().max(1);
    if ports.len() > 1 && ports.len() != host_count {
        return Err(Error::config(format!(
            "could not match {} port numbers to {} hosts",
            ports.len(),
            host_count
        )));
    }
    let port_for = |i: usize| {
        let p = if ports.len() == 1 {
            ports[0]
        } else {
            ports.get(i).copied().flatten()
        };
        p.unwrap_or(DEFAULT_PORT)
    };
    let mut out = Vec::new();
    if entries.is_empty() {
        entries.push((None, None));
    }
    for (i, (h, addr)) in entries.into_iter().enumerate() {
        let port = port_for(i);
        match h {
            Some(host) => out.push(HostPort {
                host,
                port,
                hostaddr: addr,
            }),
            // libpq's default: the local socket directory. We then also try localhost over
            // TCP so that a server without a socket in the default directory is still found.
            None => {
                out.push(HostPort {
                    host: Host::Unix(PathBuf::from(DEFAULT_SOCKET_DIR)),
                    port,
                    hostaddr: None,
                });
                out.push(HostPort {
                    host: Host::Tcp("localhost".into()),
                    port,
                    hostaddr: None,
                });
            }
        }
    }
    Ok(out)
}

/// The operating-system user name, libpq's default for `user`: the passwd entry of our uid,
/// else `$USER`.
fn os_user_name(env: &impl Fn(&str) -> Option<String>) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    // /proc/self is owned by our effective uid; this avoids unsafe libc calls.
    if let Ok(meta) = std::fs::metadata("/proc/self") {
        let uid = meta.uid().to_string();
        if let Ok(passwd) = std::fs::read_to_string("/etc/passwd") {
            for line in passwd.lines() {
                let mut f = line.split(':');
                if let (Some(name), Some(_), Some(id)) = (f.next(), f.next(), f.next()) {
                    if id == uid && !name.is_empty() {
                        return Some(name.to_string());
                    }
                }
            }
        }
    }
    env("USER")
        .or_else(|| env("LOGNAME"))
        .filter(|u| !u.is_empty())
}

/// Splits a conninfo string or URL into keyword → value.
pub fn parse_conninfo(s: &str) -> Result<BTreeMap<String, String>> {
    if let Some(rest) = s
        .strip_prefix("postgresql://")
        .or_else(|| s.strip_prefix("postgres://"))
    {
        parse_url(rest)
    } else {
        parse_key_values(s)
    }
}

fn parse_key_values(s: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut it = s.chars().peekable();
    loop {
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        if it.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = it.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        if it.next() != Some('=') {
            return Err(Error::config(format!(
                "missing \"=\" after {key:?} in connection info string"
            )));
        }
        while it.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if it.next_if_eq(&'\'').is_some() {
            loop {
                match it.next() {
                    None => {
                        return Err(Error::config(
                            "unterminated quoted string in connection info string",
                        ))
                    }
                    Some('\\') => match it.next() {
                        Some(c) => value.push(c),
                        None => {
                            return Err(Error::config(
                                "unterminated quoted string in connection info string",
                            ))
                        }
                    },
                    Some('\'') => break,
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = it.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some(n) = it.next() {
                        value.push(n);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        out.insert(key, value);
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| Error::config(format!("invalid percent-encoded token in {s:?}")))?;
            if hex == 0 {
                return Err(Error::config(format!(
                    "forbidden value %00 in percent-encoded value {s:?}"
                )));
            }
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| Error::config(format!("{s:?} is not valid UTF-8")))
}

/// `[user[:password]@][host[:port][,...]][/dbname][?key=value&...]` (after the scheme).
fn parse_url(s: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let (before_query, query) = match s.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (s, None),
    };
    let (netloc, path) = match before_query.split_once('/') {
        Some((n, p)) => (n, Some(p)),
        None => (before_query, None),
    };
    let hostspec = match netloc.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                out.insert("user".into(), percent_decode(user)?);
            }
            if let Some(p) = password {
                out.insert("password".into(), percent_decode(p)?);
            }
            hosts
        }
        None => netloc,
    };
    if !hostspec.is_empty() {
        let mut hosts = Vec::new();
        let mut ports = Vec::new();
        for spec in hostspec.split(',') {
            let (h, p) = if let Some(rest) = spec.strip_prefix('[') {
                let (h, after) = rest.split_once(']').ok_or_else(|| {
                    Error::config(format!("missing \"]\" in IPv6 host address {spec:?}"))
                })?;
                let p = match after {
                    "" => "",
                    a => a.strip_prefix(':').ok_or_else(|| {
                        Error::config(format!("unexpected {a:?} after IPv6 host address"))
                    })?,
                };
                (h.to_string(), p)
            } else {
                match spec.split_once(':') {
                    Some((h, p)) => (percent_decode(h)?, p),
                    None => (percent_decode(spec)?, ""),
                }
            };
            hosts.push(h);
            ports.push(percent_decode(p)?);
        }
        out.insert("host".into(), hosts.join(","));
        if ports.iter().any(|p| !p.is_empty()) {
            out.insert("port".into(), ports.join(","));
        }
    }
    if let Some(p) = path.filter(|p| !p.is_empty()) {
        out.insert("dbname".into(), percent_decode(p)?);
    }
    if let Some(q) = query {
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| {
                Error::config(format!(
                    "missing key/value separator \"=\" in URI query {pair:?}"
                ))
            })?;
            let k = percent_decode(k)?;
            let v = percent_decode(v)?;
            // libpq's JDBC-compatible alias.
            if k == "ssl" {
                if v == "true" {
                    out.insert("sslmode".into(), "require".into());
                    continue;
                }
                return Err(Error::config(format!("invalid ssl value {v:?} in URI")));
            }
            out.insert(k, v);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_none(_: &str) -> Option<String> {
        None
    }

    fn parse(s: &str) -> ConnConfig {
        ConnConfig::parse_with_env(s, |k| (k == "USER").then(|| "fallback".to_string()))
            .unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    fn tcp(h: &str, port: u16) -> HostPort {
        HostPort {
            host: Host::Tcp(h.into()),
            port,
            hostaddr: None,
        }
    }

    #[test]
    fn key_value_strings() {
        let kv = parse_conninfo(r"host=db1  port = 5433 user='r e p\'l' password=a\ b dbname=''")
            .expect("valid");
        assert_eq!(kv["host"], "db1");
        assert_eq!(kv["port"], "5433");
        assert_eq!(kv["user"], "r e p'l");
        assert_eq!(kv["password"], "a b");
        assert_eq!(kv["dbname"], "");
        for bad in ["host", "host db", "user='unterminated", "user='x\\"] {
            assert!(parse_conninfo(bad).is_err(), "{bad:?}");
        }
        assert!(parse_conninfo("   ").expect("empty").is_empty());
    }

    #[test]
    fn urls() {
        let kv = parse_conninfo(
            "postgresql://us%40er:p%3Ass@host1:123,host2,[::1]:5434/mydb?sslmode=verify-full&application_name=pitr",
        )
        .expect("valid");
        assert_eq!(kv["user"], "us@er");
        assert_eq!(kv["password"], "p:ss");
        assert_eq!(kv["host"], "host1,host2,::1");
        assert_eq!(kv["port"], "123,,5434");
        assert_eq!(kv["dbname"], "mydb");
        assert_eq!(kv["sslmode"], "verify-full");
        assert_eq!(kv["application_name"], "pitr");

        let kv = parse_conninfo("postgres://%2Fvar%2Frun%2Fpostgresql:5433").expect("socket");
        assert_eq!(kv["host"], "/var/run/postgresql");
        let kv = parse_conninfo("postgres:///?host=/tmp&ssl=true").expect("query host");
        assert_eq!(kv["host"], "/tmp");
        assert_eq!(kv["sslmode"], "require");
        assert!(parse_conninfo("postgresql://").expect("empty").is_empty());

        for bad in [
            "postgres://h/db?noequals",
            "postgres://[::1/db",
            "postgres://h/%zz",
            "postgres://h/%00",
            "postgres://[::1]x/db",
        ] {
            assert!(parse_conninfo(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hosts_and_ports() {
        let c = parse("host=a,b port=5432,5433");
        assert_eq!(c.hosts, vec![tcp("a", 5432), tcp("b", 5433)]);
        let c = parse("host=a,b port=6000");
        assert_eq!(c.hosts, vec![tcp("a", 6000), tcp("b", 6000)]);
        let c = parse("postgres://a:1,b/x");
        assert_eq!(c.hosts, vec![tcp("a", 1), tcp("b", DEFAULT_PORT)]);
        let c = parse("host=/tmp/sock port=5999");
        assert_eq!(
            c.hosts[0].socket_path(),
            Some(PathBuf::from("/tmp/sock/.s.PGSQL.5999"))
        );
        let c = parse("");
        assert_eq!(c.hosts[0].host, Host::Unix(DEFAULT_SOCKET_DIR.into()));
        assert_eq!(c.hosts[1], tcp("localhost", DEFAULT_PORT));
        let c = parse("hostaddr=127.0.0.1");
        assert_eq!(c.hosts[0].host, Host::Tcp("127.0.0.1".into()));
        assert_eq!(c.hosts[0].hostaddr, Some("127.0.0.1".parse().expect("ip")));
        for bad in [
            "host=a,b,c port=1,2",
            "port=0",
            "port=70000",
            "port=x",
            "host=a,b hostaddr=127.0.0.1",
            "hostaddr=not-an-ip",
        ] {
            assert!(
                ConnConfig::parse_with_env(bad, env_none).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn keywords_and_env() {
        let env = |k: &str| {
            match k {
                "PGHOST" => Some("envhost"),
                "PGPORT" => Some("6543"),
                "PGUSER" => Some("envuser"),
                "PGPASSWORD" => Some("envpw"),
                "PGSSLMODE" => Some("require"),
                "PGAPPNAME" => Some("envapp"),
                "PGCONNECT_TIMEOUT" => Some("1"),
                "PGTARGETSESSIONATTRS" => Some("standby"),
                "HOME" => Some("/home/x"),
                _ => None,
            }
            .map(String::from)
        };
        let c = ConnConfig::parse_with_env("user=explicit", env).expect("valid");
        assert_eq!(c.hosts, vec![tcp("envhost", 6543)]);
        assert_eq!(c.user, "explicit", "conninfo beats the environment");
        assert_eq!(c.password.as_ref().map(|p| p.expose()), Some("envpw"));
        assert_eq!(c.sslmode, SslMode::Require);
        assert_eq!(c.application_name.as_deref(), Some("envapp"));
        assert_eq!(
            c.connect_timeout,
            Some(Duration::from_secs(2)),
            "libpq minimum is 2 s"
        );
        assert_eq!(c.target_session_attrs, TargetSessionAttrs::Standby);
        assert_eq!(c.passfile, Some(PathBuf::from("/home/x/.pgpass")));
        assert_eq!(
            c.sslrootcert,
            Some(PathBuf::from("/home/x/.postgresql/root.crt"))
        );
        let c = c.application_name("pitr-stream");
        assert_eq!(c.application_name.as_deref(), Some("pitr-stream"));
        assert!(
            !format!("{c:?}").contains("envpw"),
            "password must not be in Debug"
        );

        let c = parse("connect_timeout=0 sslmode=verify-ca target_session_attrs=read-write");
        assert_eq!(c.connect_timeout, None);
        assert_eq!(c.sslmode, SslMode::VerifyCa);
        assert_eq!(c.target_session_attrs, TargetSessionAttrs::ReadWrite);
        for bad in [
            "sslmode=sometimes",
            "target_session_attrs=leader",
            "connect_timeout=soon",
            "bogus=1",
            "replication=database",
        ] {
            assert!(
                ConnConfig::parse_with_env(bad, env_none).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn pgpass_rules() {
        let file = "\
# comment
db1:5432:*:repl:first
*:*:replication:repl:second\\:with\\\\colon:and more
\\*:*:*:star:literal
*:*:*:*:catchall
";
        assert_eq!(
            pgpass_lookup(file, "db1", 5432, "replication", "repl").as_deref(),
            Some("first")
        );
        assert_eq!(
            pgpass_lookup(file, "db2", 5432, "replication", "repl").as_deref(),
            Some("second:with\\colon:and more")
        );
        assert_eq!(
            pgpass_lookup(file, "*", 1, "x", "star").as_deref(),
            Some("literal")
        );
        assert_eq!(
            pgpass_lookup(file, "db9", 1, "x", "star").as_deref(),
            Some("catchall"),
            "an escaped star is not a wildcard"
        );
        assert_eq!(
            pgpass_lookup("a:b", "a", 1, "d", "u"),
            None,
            "short lines are skipped"
        );
        assert_eq!(pgpass_lookup("", "a", 1, "d", "u"), None);
    }

    #[test]
    fn passfile_permissions_are_checked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pgpass");
        std::fs::write(&path, "localhost:5432:*:repl:secret\n").expect("write");
        let mut c = parse("user=repl host=localhost");
        c.passfile = Some(path.clone());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert_eq!(
            c.password_for(&c.hosts[0]),
            None,
            "world-readable file ignored"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(
            c.password_for(&c.hosts[0])
                .map(|p| p.expose().to_string())
                .as_deref(),
            Some("secret")
        );
        // The default socket directory matches "localhost".
        let sock = HostPort {
            host: Host::Unix(DEFAULT_SOCKET_DIR.into()),
            port: 5432,
            hostaddr: None,
        };
        assert!(c.password_for(&sock).is_some());
    }
}
