//! The one error type of the `pg` layer.
//!
//! Context travels as fields, not text, so that the jobs above can decide policy (retry, give up,
//! tell the operator how to fix pg_hba.conf) by matching on the variant or asking
//! [`Error::is_transient`] / [`Error::is_insufficient_privilege`], never by parsing messages.

use std::fmt;
use std::io;

use crate::error::{Classify, Code};

/// SQLSTATE codes we branch on (PostgreSQL `src/backend/utils/errcodes.txt`).
pub mod sqlstate {
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    pub const INVALID_AUTHORIZATION_SPECIFICATION: &str = "28000";
    pub const INVALID_PASSWORD: &str = "28P01";
    /// A file the server needs is missing; at START_REPLICATION or while streaming, the WAL
    /// segment the walsender opens (`WalSndSegmentOpen`: "requested WAL segment ... has already
    /// been removed", `errcode_for_file_access()` with ENOENT).
    pub const UNDEFINED_FILE: &str = "58P01";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const CRASH_SHUTDOWN: &str = "57P02";
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    pub const UNDEFINED_OBJECT: &str = "42704";
    pub const DUPLICATE_OBJECT: &str = "42710";
    pub const OBJECT_IN_USE: &str = "55006";
}

/// Errors from connecting to PostgreSQL and speaking the replication protocol.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The connection string, an environment variable or the password file is unusable.
    #[error("invalid connection settings: {message}")]
    Config { message: String },

    /// Could not open a connection to `host:port` (refused, unreachable, DNS failure).
    #[error("could not connect to {host} port {port}: {source}")]
    Connect {
        host: String,
        port: u16,
        #[source]
        source: io::Error,
    },

    /// `connect_timeout` expired while connecting or authenticating.
    #[error("timed out connecting to {host} port {port}")]
    Timeout { host: String, port: u16 },

    /// Reading from or writing to an established connection failed.
    #[error("I/O error on the connection to PostgreSQL ({context}): {source}")]
    Io {
        context: &'static str,
        #[source]
        source: io::Error,
    },

    /// The server closed the connection while we expected more messages.
    #[error("server closed the connection unexpectedly ({context})")]
    Closed { context: &'static str },

    /// TLS negotiation or certificate verification failed, or the server refused TLS that
    /// `sslmode` requires.
    #[error("TLS error with {host}: {message}")]
    Tls { host: String, message: String },

    /// Authentication was refused (wrong password, no pg_hba.conf entry, unsupported method).
    #[error("authentication failed for user {user:?}: {message}")]
    Auth {
        user: String,
        /// The server's SQLSTATE when the refusal came as an ErrorResponse (28P01, 28000).
        sqlstate: Option<String>,
        message: String,
    },

    /// The server sent an ErrorResponse.
    #[error("{}", ServerDisplay(self))]
    Server {
        sqlstate: String,
        severity: String,
        message: String,
        detail: Option<String>,
        hint: Option<String>,
    },

    /// The server sent something the protocol does not allow at this point, or bytes that do
    /// not parse. The connection must not be used any more.
    #[error("protocol error ({context}): {message}")]
    Protocol {
        context: &'static str,
        message: String,
    },

    /// The server is older than the oldest major we support.
    #[error("PostgreSQL {version} is not supported: pitr needs PostgreSQL 13 or later")]
    UnsupportedServerVersion { version: String },

    /// The operation does not exist on this server version or in this client.
    #[error("not supported: {what}")]
    Unsupported { what: String },

    /// No host in the list matched `target_session_attrs`, or every host failed.
    #[error("could not connect to any host: {}", join_errors(errors))]
    AllHostsFailed { errors: Vec<Error> },

    /// The server was reachable but is not the kind of server `target_session_attrs` asks for.
    #[error("server {host} port {port} does not match target_session_attrs={wanted}")]
    WrongSessionAttrs {
        host: String,
        port: u16,
        wanted: &'static str,
    },
}

struct ServerDisplay<'a>(&'a Error);

impl fmt::Display for ServerDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Error::Server {
            sqlstate,
            severity,
            message,
            detail,
            hint,
        } = self.0
        {
            write!(f, "{severity}: {message} (SQLSTATE {sqlstate})")?;
            if let Some(d) = detail {
                write!(f, "; DETAIL: {d}")?;
            }
            if let Some(h) = hint {
                write!(f, "; HINT: {h}")?;
            }
        }
        Ok(())
    }
}

fn join_errors(errors: &[Error]) -> String {
    errors
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

impl Error {
    pub(crate) fn protocol(context: &'static str, message: impl Into<String>) -> Error {
        Error::Protocol {
            context,
            message: message.into(),
        }
    }

    pub(crate) fn config(message: impl Into<String>) -> Error {
        Error::Config {
            message: message.into(),
        }
    }

    pub(crate) fn io(context: &'static str, source: io::Error) -> Error {
        Error::Io { context, source }
    }

    /// The SQLSTATE sent by the server, when this error came from an ErrorResponse.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Error::Server { sqlstate, .. } => Some(sqlstate),
            Error::Auth {
                sqlstate: Some(s), ..
            } => Some(s),
            _ => None,
        }
    }

    /// The role lacks the REPLICATION attribute, or pg_hba.conf has no `replication` line for
    /// it. Both are fixed by the DBA, so retrying is pointless.
    pub fn is_insufficient_privilege(&self) -> bool {
        let msg = match self {
            Error::Server { message, .. } | Error::Auth { message, .. } => message.as_str(),
            _ => return false,
        };
        match self.sqlstate() {
            Some(sqlstate::INSUFFICIENT_PRIVILEGE) => true,
            // 28000 also means "role does not exist" or a failed peer/ident check. The file name
            // pg_hba.conf is never translated; "replication" is the English fallback.
            Some(sqlstate::INVALID_AUTHORIZATION_SPECIFICATION) => {
                msg.contains("pg_hba.conf") || msg.contains("replication")
            }
            _ => msg.contains("must be superuser or replication role"),
        }
    }

    /// `max_connections` / `max_wal_senders` reached (53300).
    pub fn is_too_many_connections(&self) -> bool {
        self.sqlstate() == Some(sqlstate::TOO_MANY_CONNECTIONS)
    }

    /// The server allows no replication connection at all (`max_wal_senders = 0`, which
    /// `wal_level = minimal` requires): raising nothing else helps, and retrying is pointless.
    ///
    /// PostgreSQL reports this with the same SQLSTATE as busy senders (53300, "number of requested
    /// standby connections exceeds max_wal_senders (currently %d)"). The parameter name is never
    /// translated and the limit is the message's only number, so this reads those two, whatever
    /// the server's lc_messages.
    pub fn is_no_wal_senders(&self) -> bool {
        let Error::Server { message, .. } = self else {
            return false;
        };
        let mut numbers = message
            .split(|c: char| !c.is_ascii_digit())
            .filter(|w| !w.is_empty());
        self.is_too_many_connections()
            && message.contains("max_wal_senders")
            && numbers.next() == Some("0")
            && numbers.next().is_none()
    }

    /// Whether trying again later may succeed without anyone changing configuration: network
    /// failures, the server shutting down or starting up, connection slots exhausted.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::Timeout { .. } | Error::Closed { .. } => true,
            Error::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::ConnectionRefused
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::TimedOut
                    | io::ErrorKind::NotConnected
            ),
            Error::Server { sqlstate: s, .. }
            | Error::Auth {
                sqlstate: Some(s), ..
            } => matches!(
                s.as_str(),
                sqlstate::ADMIN_SHUTDOWN
                    | sqlstate::CRASH_SHUTDOWN
                    | sqlstate::CANNOT_CONNECT_NOW
                    | sqlstate::TOO_MANY_CONNECTIONS
            ),
            Error::AllHostsFailed { errors } => errors.iter().any(Error::is_transient),
            // A standby may be promoted (or a primary demoted) later.
            Error::WrongSessionAttrs { .. } => true,
            _ => false,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Classify for Error {
    fn code(&self) -> Code {
        match self {
            // The connection string, a PG* variable or the password file: the user's input.
            Error::Config { .. } => Code::Input,
            Error::Connect { .. }
            | Error::Timeout { .. }
            | Error::Io { .. }
            | Error::Closed { .. }
            | Error::Tls { .. }
            | Error::Auth { .. }
            | Error::Server { .. }
            | Error::Protocol { .. }
            | Error::UnsupportedServerVersion { .. }
            | Error::Unsupported { .. }
            | Error::AllHostsFailed { .. }
            | Error::WrongSessionAttrs { .. } => Code::Postgres,
        }
    }

    /// The fix for the common causes, decided by SQLSTATE and variant, never by message text
    /// (the server's messages follow its lc_messages).
    fn hint(&self) -> Option<String> {
        let hint = match self {
            Error::AllHostsFailed { errors } => return errors.iter().find_map(Error::hint),
            // 28000 also covers "no pg_hba.conf entry": that one the DBA fixes, like a missing
            // REPLICATION attribute.
            Error::Auth { .. } if self.is_insufficient_privilege() => REPLICATION_HINT,
            Error::Auth { .. } => {
                "check the user and password (PGPASSWORD, ~/.pgpass or the connection string)"
            }
            Error::Server { .. } if self.is_insufficient_privilege() => REPLICATION_HINT,
            Error::Server { .. } if self.is_no_wal_senders() => {
                "replication needs wal_level = replica (or logical) and max_wal_senders > 0 on the server"
            }
            Error::Server { .. } if self.is_too_many_connections() => {
                "all WAL senders are busy: raise max_wal_senders or stop another replication client"
            }
            Error::UnsupportedServerVersion { .. } => "pitr supports PostgreSQL 13 and later",
            Error::Config { .. }
            | Error::Connect { .. }
            | Error::Timeout { .. }
            | Error::Io { .. }
            | Error::Closed { .. }
            | Error::Tls { .. }
            | Error::Server { .. }
            | Error::Protocol { .. }
            | Error::Unsupported { .. }
            | Error::WrongSessionAttrs { .. } => return None,
        };
        Some(hint.into())
    }
}

const REPLICATION_HINT: &str = "the role needs REPLICATION (ALTER ROLE name REPLICATION) and a pg_hba.conf line for `replication`";

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str, message: &str) -> Error {
        Error::Server {
            sqlstate: code.into(),
            severity: "FATAL".into(),
            message: message.into(),
            detail: None,
            hint: Some("fix it".into()),
        }
    }

    #[test]
    fn classification() {
        assert!(server(
            "57P01",
            "terminating connection due to administrator command"
        )
        .is_transient());
        assert!(server("57P03", "the database system is starting up").is_transient());
        assert!(server("53300", "sorry, too many clients already").is_too_many_connections());
        assert!(!server("42501", "permission denied").is_transient());
        assert!(server(
            "42501",
            "must be superuser or replication role to start walsender"
        )
        .is_insufficient_privilege());
        assert!(server(
            "28000",
            "no pg_hba.conf entry for replication connection from host \"127.0.0.1\""
        )
        .is_insufficient_privilege());
        let conn = Error::Connect {
            host: "h".into(),
            port: 1,
            source: io::Error::from(io::ErrorKind::ConnectionRefused),
        };
        assert!(conn.is_transient());
        assert!(Error::AllHostsFailed { errors: vec![conn] }.is_transient());
    }

    /// English and PostgreSQL 15's German (postgres-15.mo): the same code and hint.
    #[test]
    fn hints_follow_the_sqlstate_not_the_language() {
        let hint = |e: Error| e.hint().unwrap_or_default();
        for m in [
            "number of requested standby connections exceeds max_wal_senders (currently 0)",
            "Anzahl angeforderter Standby-Verbindungen überschreitet max_wal_senders (aktuell 0)",
        ] {
            assert!(server("53300", m).is_no_wal_senders(), "{m}");
            assert!(hint(server("53300", m)).contains("wal_level"), "{m}");
        }
        let busy =
            "Anzahl angeforderter Standby-Verbindungen überschreitet max_wal_senders (aktuell 10)";
        assert!(!server("53300", busy).is_no_wal_senders());
        assert!(hint(server("53300", busy)).contains("busy"));
        let auth = |code: &str, message: &str| Error::Auth {
            user: "u".into(),
            sqlstate: Some(code.into()),
            message: message.into(),
        };
        for m in [
            "password authentication failed for user \"u\"",
            "Passwort-Authentifizierung für Benutzer »u« fehlgeschlagen",
        ] {
            assert!(hint(auth("28P01", m)).contains("password"), "{m}");
            assert_eq!(auth("28P01", m).code(), Code::Postgres);
        }
        let no_hba = "kein pg_hba.conf-Eintrag für Replikationsverbindung von Host »127.0.0.1«, Benutzer »u«, keine Verschlüsselung";
        assert!(hint(auth("28000", no_hba)).contains("REPLICATION"));
        let no_role = "nur Superuser und Replikationsrollen können WAL-Sender starten";
        assert!(hint(server("42501", no_role)).contains("REPLICATION"));
        assert_eq!(Error::config("bad").code(), Code::Input);
    }

    #[test]
    fn server_display_has_all_parts() {
        let s = server("42501", "denied").to_string();
        assert_eq!(s, "FATAL: denied (SQLSTATE 42501); HINT: fix it");
    }
}
