//! How `pitr stream` fails, and how the server's refusals are recognised.

use std::path::PathBuf;

use crate::error::{Classify, Code};
use crate::pg::{self, sqlstate};
use crate::repo::RepoError;
use crate::wal::{HistoryError, Lsn, TimelineId};

use super::segment::SegmentError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    #[error(transparent)]
    Pg(#[from] pg::Error),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error("replication slot {slot:?} does not exist on the server")]
    MissingSlot { slot: String },
    #[error("the server is a standby; `pitr stream` follows a primary")]
    Standby,
    #[error("the server runs with wal_level = minimal, which does not allow streaming")]
    WalLevelMinimal,
    #[error(
        "the server no longer has the WAL at {from} on timeline {tli} ({server_message}); \
         WAL from {from} {} is lost to the repository, so restores cannot continue past it",
        match .until { Some(u) => format!("to {u} (the slot's restart_lsn)"), None => "on".to_string() }
    )]
    WalRemoved {
        tli: TimelineId,
        from: Lsn,
        /// Where the server's WAL resumes, when known (the slot's restart_lsn).
        until: Option<Lsn>,
        server_message: String,
    },
    #[error(
        "the server's timeline forked from timeline {tli} at {fork}, before {start} where the \
         stream continues ({server_message})"
    )]
    TimelineForked {
        tli: TimelineId,
        start: Lsn,
        fork: Lsn,
        server_message: String,
    },
    #[error(
        "the repository ends at {start}, ahead of what the server has written ({server_message}); \
         is this repository from another server of the same cluster (a restored copy)?"
    )]
    RepositoryAhead { start: Lsn, server_message: String },
    #[error(
        "stopped with WAL not durable in the repository: received up to {received}, durable up to {durable} \
         (the replication slot keeps the rest on the server)"
    )]
    NotDurable { received: Lsn, durable: Lsn },
    #[error(
        "the server now has system identifier {found}, not {expected}: refusing to mix clusters"
    )]
    OtherServer { expected: u64, found: u64 },
    #[error(transparent)]
    Segment(#[from] SegmentError),
    #[error("the server's timeline history is invalid: {0}")]
    History(#[from] HistoryError),
    #[error("{}: {message}", .path.display())]
    BadMarker { path: PathBuf, message: String },
    #[error(
        "the repository at {location} has vanished: this cluster stored WAL into it before \
         (repository id {id}, recorded in {}), and its descriptor is gone; pitr does not \
         create a new one there, since WAL stored earlier would then read as never archived",
        .marker.display()
    )]
    Vanished {
        location: String,
        id: String,
        marker: PathBuf,
    },
    #[error(
        "the repository at {location} is not the one this cluster stored WAL into: it has \
         repository id {found}, {} records {recorded}; it was recreated, and the WAL \
         stored before is not in it",
        .marker.display()
    )]
    Replaced {
        location: String,
        found: String,
        recorded: String,
        marker: PathBuf,
    },
    #[error("the streaming pipeline stopped unexpectedly")]
    PipelineClosed,
    #[error("a streaming task panicked: {0}")]
    TaskPanicked(String),
}

impl Classify for StreamError {
    fn code(&self) -> Code {
        match self {
            StreamError::Pg(e) => e.code(),
            StreamError::Repo(e) => e.code(),
            StreamError::MissingSlot { .. }
            | StreamError::Standby
            | StreamError::WalLevelMinimal => Code::Postgres,
            // The server's history is the server's to fix, not a bug of pitr.
            StreamError::History(_) => Code::Postgres,
            StreamError::WalRemoved { .. } => Code::WalGap,
            StreamError::RepositoryAhead { .. }
            | StreamError::OtherServer { .. }
            | StreamError::Replaced { .. } => Code::Conflict,
            // Handled by restarting from the repository; reaches the user only as a bug.
            StreamError::TimelineForked { .. } => Code::Internal,
            StreamError::BadMarker { .. } => Code::Input,
            StreamError::Vanished { .. } => Code::Storage,
            // Received WAL is still only on the server (the slot keeps it): storage did not
            // take it in time.
            StreamError::NotDurable { .. } => Code::Storage,
            StreamError::Segment(_)
            | StreamError::PipelineClosed
            | StreamError::TaskPanicked(_) => Code::Internal,
        }
    }

    fn hint(&self) -> Option<String> {
        let hint = match self {
            StreamError::Pg(e) => return e.hint(),
            StreamError::Repo(e) => return e.hint(),
            StreamError::MissingSlot { .. } => {
                "pass --create-slot to create it, or name an existing physical slot with --slot"
            }
            StreamError::Standby => {
                "connect to the primary (target_session_attrs=read-write), or pass --allow-standby"
            }
            StreamError::WalLevelMinimal => {
                "set wal_level = replica and max_wal_senders > 0, then restart PostgreSQL"
            }
            StreamError::WalRemoved { .. } => {
                "take a new base backup (`pitr backup`), then run `pitr stream --accept-gap` once to continue from the slot; \
                 keep the slot so that this cannot happen again"
            }
            StreamError::RepositoryAhead { .. } => "use a separate repository for this server",
            StreamError::BadMarker { .. } => {
                "a damaged pitr.repository may be deleted: archive-push and stream write it again"
            }
            StreamError::Vanished { location, marker, .. } => {
                return Some(format!(
                    "if the repository moved or a mount or bucket is missing, bring it back at {location} or point --repo at it; \
                     to start a new repository there on purpose, delete {} and take a new base backup at once",
                    marker.display()
                ))
            }
            StreamError::Replaced { marker, .. } => {
                return Some(format!(
                    "point --repo at the repository this cluster stored WAL into; to use the new one on purpose, \
                     delete {} and take a new base backup at once",
                    marker.display()
                ))
            }
            StreamError::NotDurable { .. } => {
                "start `pitr stream` again: it resumes from what is durable, and the slot kept the rest"
            }
            StreamError::OtherServer { .. }
            | StreamError::TimelineForked { .. }
            | StreamError::History(_)
            | StreamError::Segment(_)
            | StreamError::PipelineClosed
            | StreamError::TaskPanicked(_) => return None,
        };
        Some(hint.into())
    }
}

pub(crate) fn classify_connect_error(e: pg::Error) -> StreamError {
    StreamError::Pg(e)
}

/// Turns the server's refusals at START_REPLICATION (or while streaming) into errors that say
/// what is wrong; `None` for anything else.
///
/// Decided by SQLSTATE, never by the message alone: the server words its messages in its own
/// `lc_messages`, which a replication connection cannot override. Where PostgreSQL gives a
/// case no SQLSTATE of its own, the comment says so and what is matched instead.
pub(crate) fn classify_start_error(
    e: &pg::Error,
    slot: &str,
    tli: TimelineId,
    at: Lsn,
) -> Option<StreamError> {
    let pg::Error::Server {
        sqlstate: code,
        message,
        detail,
        ..
    } = e
    else {
        return None;
    };
    let wal_removed = || StreamError::WalRemoved {
        tli,
        from: at,
        until: None,
        server_message: message.clone(),
    };
    match code.as_str() {
        // ReplicationSlotAcquire: the slot is the only object START_REPLICATION names.
        sqlstate::UNDEFINED_OBJECT => return Some(StreamError::MissingSlot { slot: slot.into() }),
        // WalSndSegmentOpen: the segment to send is gone ("requested WAL segment ... has already
        // been removed", errcode_for_file_access() of ENOENT). The walsender opens no other file
        // while streaming.
        sqlstate::UNDEFINED_FILE => return Some(wal_removed()),
        _ => {}
    }
    // English text, as a fallback only, where the SQLSTATE does not tell:
    // - CheckXLogRemoved (the segment was removed while being read) uses
    //   errcode_for_file_access() with a stale errno, so its SQLSTATE is arbitrary (often XX000).
    //   Through a slot this race does not happen: the slot holds the WAL, and invalidating it
    //   terminates the walsender (57P01), so the reconnect meets the 58P01 case above.
    // - PostgreSQL 17+ refuses an invalidated slot with 55000, which also means "not a physical
    //   slot"; the reason is in the message or detail.
    let text = |needle: &str| {
        message.contains(needle) || detail.as_deref().is_some_and(|d| d.contains(needle))
    };
    if text("has already been removed") || text("can no longer") || text("has been invalidated") {
        return Some(wal_removed());
    }
    if let Some(fork) = forked_before(message, detail.as_deref(), at) {
        return Some(StreamError::TimelineForked {
            tli,
            start: at,
            fork,
            server_message: message.clone(),
        });
    }
    if is_start_ahead_of_flush(message, at) {
        return Some(StreamError::RepositoryAhead {
            start: at,
            server_message: message.clone(),
        });
    }
    None
}

/// "requested starting point %X/%X on timeline %u is not in this server's history", detail
/// "This server's history forked from timeline %u at %X/%X." (no errcode): the stream was
/// ahead of the server that was promoted. Read from the arguments, not the words: our start in
/// the message, and in the detail one earlier position, where the server's history forked.
fn forked_before(message: &str, detail: Option<&str>, start: Lsn) -> Option<Lsn> {
    let lsns = |text: &str| -> Vec<Lsn> {
        text.split(|c: char| !(c.is_ascii_hexdigit() || c == '/'))
            .filter(|w| w.contains('/'))
            .filter_map(|w| w.parse().ok())
            .collect()
    };
    match (lsns(message).as_slice(), lsns(detail?).as_slice()) {
        ([s], [fork]) if *s == start && *fork < start => Some(*fork),
        _ => None,
    }
}

/// "requested starting point %X/%X is ahead of the WAL flush position of this server %X/%X"
/// comes without an errcode (XX000). Rather than its words, read its two arguments, which no
/// translation changes: our start position first, then a lower flush position.
fn is_start_ahead_of_flush(message: &str, start: Lsn) -> bool {
    let lsns: Vec<Lsn> = message
        .split(|c: char| !(c.is_ascii_hexdigit() || c == '/'))
        .filter(|w| w.contains('/'))
        .filter_map(|w| w.parse().ok())
        .collect();
    matches!(lsns.as_slice(), [first, flush] if *first == start && *flush < start)
        || message.contains("ahead of the WAL flush position")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str, message: &str) -> pg::Error {
        pg::Error::Server {
            sqlstate: code.into(),
            severity: "ERROR".into(),
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    fn classify(code: &str, message: &str) -> Option<StreamError> {
        classify_start_error(&server(code, message), "pitr", 1, Lsn(0x300_0000))
    }

    /// The German wording of PostgreSQL 15 (postgres-15.mo): the same decision as in English.
    #[test]
    fn start_errors_are_classified_whatever_the_language() {
        for m in [
            "replication slot \"pitr\" does not exist",
            "Replikations-Slot »pitr« existiert nicht",
        ] {
            assert!(
                matches!(classify("42704", m), Some(StreamError::MissingSlot { .. })),
                "{m}"
            );
        }
        for m in [
            "requested WAL segment 000000010000000000000003 has already been removed",
            "das angeforderte WAL-Segment 000000010000000000000003 wurde schon entfernt",
        ] {
            assert!(
                matches!(classify("58P01", m), Some(StreamError::WalRemoved { .. })),
                "{m}"
            );
        }
        for m in [
            "requested starting point 0/3000000 is ahead of the WAL flush position of this server 0/2000060",
            "angeforderter Startpunkt 0/3000000 ist vor der WAL-Flush-Position dieses Servers 0/2000060",
        ] {
            assert!(
                matches!(classify("XX000", m), Some(StreamError::RepositoryAhead { .. })),
                "{m}"
            );
        }
        let m = "angeforderter Startpunkt 0/3000000 auf Zeitleiste 2 ist nicht in der History dieses Servers";
        assert!(classify("XX000", m).is_none());
        for (m, d) in [
            (
                "requested starting point 0/3000000 on timeline 1 is not in this server's history",
                "This server's history forked from timeline 1 at 0/2000158.",
            ),
            (
                m,
                "Die History dieses Servers zweigte von Zeitleiste 1 bei 0/2000158 ab.",
            ),
        ] {
            let e = pg::Error::Server {
                sqlstate: "XX000".into(),
                severity: "ERROR".into(),
                message: m.into(),
                detail: Some(d.into()),
                hint: None,
            };
            let c = classify_start_error(&e, "pitr", 1, Lsn(0x300_0000));
            assert!(
                matches!(
                    c,
                    Some(StreamError::TimelineForked {
                        fork: Lsn(0x200_0158),
                        ..
                    })
                ),
                "{m}: {c:?}"
            );
        }
        assert!(classify(
            "57P01",
            "terminating connection due to administrator command"
        )
        .is_none());
    }
}
