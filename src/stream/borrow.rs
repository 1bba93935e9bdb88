//! The rest of an old timeline, borrowed from another server of the conninfo.
//!
//! After a failover, a stream restarted behind the switch point asks the new primary for the
//! old timeline; when the new primary has removed that WAL (no slot kept it there), another
//! standby of the cluster may still hold it (its copy of the stream's slot, kept by
//! `standbys.rs`, or `wal_keep_size`). Such a standby serves a historic timeline exactly up to
//! its switch point and then ends it, as the primary would: the server cuts it, not us.
//!
//! Only a standby that already follows a later timeline and whose history puts the end of the
//! old timeline where the primary's history does is asked. A server still on the old timeline
//! (an old primary that kept running, a standby that has not followed the promotion) cannot
//! say where the timeline ended, and its WAL past the switch point is not the cluster's: it is
//! never used. The start of the new timeline may be gone from the new primary too (its copy of
//! the switch segment): a standby on the primary's timeline with the same history lends it one
//! segment at a time, the primary being asked again at each segment boundary. No slot is used
//! on the lender: the borrowed WAL goes through the pipeline like any other.

use super::error::StreamError;
use crate::pg::{ConnConfig, ReplicationConn, XLogStream};
use crate::wal::{parse_history, Lsn, TimelineId};

/// A stream borrowed from a standby: it ends by itself at the old timeline's switch point, or
/// must be left at `return_at` (a segment boundary of the primary's current timeline), where
/// the primary is asked again.
pub(super) struct Borrowed {
    pub stream: XLogStream,
    pub return_at: Option<Lsn>,
}

/// What the primary says of timeline `tli`.
enum PrimaryView {
    /// An old timeline, left at this switch point.
    Ended(Lsn),
    /// The primary's current timeline, with its history file (empty for timeline 1), which a
    /// lender's must equal.
    Current(Vec<u8>),
}

/// A physical stream of timeline `tli` from `start`, from a standby of `cfg` that has it and
/// agrees with the primary on the timeline; `None` when no server can lend it.
pub(super) async fn borrow_wal(
    cfg: &ConnConfig,
    system_id: u64,
    tli: TimelineId,
    start: Lsn,
    seg_size: u64,
) -> Option<Borrowed> {
    if cfg.hosts.len() < 2 {
        return None;
    }
    let view = match primary_view(cfg, system_id, tli).await {
        Ok(Some(v)) => v,
        Ok(None) => return None,
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the primary's timeline history");
            return None;
        }
    };
    for host in &cfg.hosts {
        let one = cfg.only(host);
        match lend(&one, system_id, tli, start, &view).await {
            Ok(Some(stream)) => {
                // On the current timeline, one segment at a time: the primary may have the next.
                let (switch, return_at) = match view {
                    PrimaryView::Ended(end) => (Some(end), None),
                    PrimaryView::Current(_) => (
                        None,
                        Some(Lsn::from_segno(start.segno(seg_size) + 1, seg_size)),
                    ),
                };
                tracing::warn!(host = %host.host, port = host.port, timeline = tli, %start, ?switch,
                    "the primary no longer has this WAL: streaming it from a standby");
                return Some(Borrowed { stream, return_at });
            }
            Ok(None) => {}
            Err(e) => {
                tracing::info!(host = %host.host, port = host.port, error = %e, "this server cannot lend the WAL")
            }
        }
    }
    None
}

/// The primary's view of `tli`; `None` when the primary is another cluster or behind `tli`.
async fn primary_view(
    cfg: &ConnConfig,
    system_id: u64,
    tli: TimelineId,
) -> Result<Option<PrimaryView>, StreamError> {
    let mut conn = ReplicationConn::connect(cfg).await?;
    let sys = conn.identify_system().await?;
    let view = if sys.system_id != system_id || sys.timeline < tli {
        None
    } else if sys.timeline == tli {
        Some(PrimaryView::Current(history_of(&mut conn, tli).await?))
    } else {
        history_end(&mut conn, sys.timeline, tli)
            .await?
            .map(PrimaryView::Ended)
    };
    conn.close().await;
    Ok(view)
}

async fn history_of(conn: &mut ReplicationConn, tli: TimelineId) -> Result<Vec<u8>, StreamError> {
    match tli > 1 {
        true => Ok(conn.timeline_history(tli).await?.1),
        false => Ok(vec![]),
    }
}

/// The switch point of `tli` in the history of timeline `current`.
async fn history_end(
    conn: &mut ReplicationConn,
    current: TimelineId,
    tli: TimelineId,
) -> Result<Option<Lsn>, StreamError> {
    let content = history_of(conn, current).await?;
    // A history that does not parse lends nothing: the end of the timeline would be a guess.
    let entries = parse_history(&content).unwrap_or_default();
    Ok(entries.iter().find(|e| e.tli == tli).map(|e| e.switchpoint))
}

/// Starts streaming `tli` from `start` on the one server of `cfg` when it is a standby of the
/// cluster that agrees with the primary: for an old timeline, on a later timeline whose history
/// ends `tli` where the primary's does; for the primary's current timeline, on that timeline,
/// with the same history.
async fn lend(
    cfg: &ConnConfig,
    system_id: u64,
    tli: TimelineId,
    start: Lsn,
    view: &PrimaryView,
) -> Result<Option<XLogStream>, StreamError> {
    let mut conn = ReplicationConn::connect(cfg).await?;
    let sys = conn.identify_system().await?;
    let mut fits = sys.system_id == system_id && conn.in_hot_standby().await?;
    fits = fits
        && match view {
            PrimaryView::Ended(end) => {
                sys.timeline > tli
                    && start < *end
                    && history_end(&mut conn, sys.timeline, tli).await? == Some(*end)
            }
            PrimaryView::Current(history) => {
                sys.timeline == tli && history_of(&mut conn, tli).await? == *history
            }
        };
    if !fits {
        conn.close().await;
        return Ok(None);
    }
    Ok(Some(conn.start_replication(None, start, Some(tli)).await?))
}
