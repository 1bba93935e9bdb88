//! Decoding of the few record bodies pitr cares about: transaction ends (RM_XACT_ID: commit and
//! abort, prepared or not, with their timestamps) and XLOG control records (RM_XLOG_ID: restore
//! points, checkpoints, switch, backup end, end of recovery, overwritten contrecord).
//!
//! Layouts from xact.h, xlog.h and pg_control.h. Timestamps stay PostgreSQL `TimestampTz`
//! (i64 microseconds since 2000-01-01 UTC) here; [`pg_timestamp_to_utc`] converts.

use chrono::{DateTime, Utc};

use super::record::{Record, RM_XACT_ID, RM_XLOG_ID, XLR_RMGR_INFO_MASK};
use super::{Lsn, TimelineId};

// RM_XACT_ID opcodes (xl_info & XLOG_XACT_OPMASK).
pub const XLOG_XACT_COMMIT: u8 = 0x00;
pub const XLOG_XACT_PREPARE: u8 = 0x10;
pub const XLOG_XACT_ABORT: u8 = 0x20;
pub const XLOG_XACT_COMMIT_PREPARED: u8 = 0x30;
pub const XLOG_XACT_ABORT_PREPARED: u8 = 0x40;
pub const XLOG_XACT_OPMASK: u8 = 0x70;
/// The record has an `xl_xact_xinfo` after `xact_time`.
pub const XLOG_XACT_HAS_INFO: u8 = 0x80;

// xl_xact_xinfo.xinfo bits, in the order their sub-records follow.
const XACT_XINFO_HAS_DBINFO: u32 = 1 << 0;
const XACT_XINFO_HAS_SUBXACTS: u32 = 1 << 1;
const XACT_XINFO_HAS_RELFILENODES: u32 = 1 << 2;
const XACT_XINFO_HAS_INVALS: u32 = 1 << 3;
const XACT_XINFO_HAS_TWOPHASE: u32 = 1 << 4;
/// 15+.
const XACT_XINFO_HAS_DROPPED_STATS: u32 = 1 << 8;

// RM_XLOG_ID record types (xl_info & XLR_RMGR_INFO_MASK), pg_control.h.
pub const XLOG_CHECKPOINT_SHUTDOWN: u8 = 0x00;
pub const XLOG_CHECKPOINT_ONLINE: u8 = 0x10;
pub const XLOG_SWITCH: u8 = 0x40;
pub const XLOG_BACKUP_END: u8 = 0x50;
pub const XLOG_RESTORE_POINT: u8 = 0x70;
pub const XLOG_END_OF_RECOVERY: u8 = 0x90;
/// 14+ (and back-patched minors): written where a torn record was abandoned.
pub const XLOG_OVERWRITE_CONTRECORD: u8 = 0xD0;
/// `MAXFNAMELEN`: size of `xl_restore_point.rp_name`.
const MAXFNAMELEN: usize = 64;

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01 00:00:00 UTC).
pub const POSTGRES_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// Converts a `TimestampTz` to UTC; `None` for values chrono cannot represent (±infinity).
pub fn pg_timestamp_to_utc(ts: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_micros(ts.checked_add(POSTGRES_EPOCH_UNIX_MICROS)?)
}

/// Converts UTC to a `TimestampTz`.
pub fn utc_to_pg_timestamp(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros() - POSTGRES_EPOCH_UNIX_MICROS
}

/// Which way a transaction ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum XactKind {
    Commit,
    Abort,
    CommitPrepared,
    AbortPrepared,
}

impl XactKind {
    pub fn is_commit(self) -> bool {
        matches!(self, XactKind::Commit | XactKind::CommitPrepared)
    }
}

/// A record of interest to recovery targets, decoded from its main data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WalEvent {
    /// Transaction end. `xid` is the record's `xl_xid`, or for prepared transactions the
    /// original transaction's xid (`xl_xact_twophase`), as pg_waldump shows it.
    XactEnd {
        kind: XactKind,
        xid: u32,
        xact_time: i64,
    },
    /// `pg_create_restore_point(name)`.
    RestorePoint {
        name: String,
        rp_time: i64,
    },
    /// A checkpoint; `redo` is where replay starting from it begins.
    Checkpoint {
        shutdown: bool,
        redo: Lsn,
        tli: TimelineId,
        prev_tli: TimelineId,
    },
    Switch,
    /// End of an online base backup that started at `start`.
    BackupEnd {
        start: Lsn,
    },
    EndOfRecovery {
        end_time: i64,
        tli: TimelineId,
        prev_tli: TimelineId,
    },
    /// `overwritten` was a torn record abandoned at crash recovery.
    OverwriteContrecord {
        overwritten: Lsn,
        overwrite_time: i64,
    },
}

fn i64_at(b: &[u8], at: usize) -> Option<i64> {
    Some(i64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Whether [`decode_event`] can return an event for a record with this `xl_rmid` and `xl_info`:
/// the records whose bytes it reads. Lets a reader leave the bytes of the others alone.
pub fn may_be_event(rmid: u8, info: u8) -> bool {
    match rmid {
        RM_XACT_ID => matches!(
            info & XLOG_XACT_OPMASK,
            XLOG_XACT_COMMIT
                | XLOG_XACT_ABORT
                | XLOG_XACT_COMMIT_PREPARED
                | XLOG_XACT_ABORT_PREPARED
        ),
        RM_XLOG_ID => matches!(
            info & XLR_RMGR_INFO_MASK,
            XLOG_CHECKPOINT_SHUTDOWN
                | XLOG_CHECKPOINT_ONLINE
                | XLOG_SWITCH
                | XLOG_BACKUP_END
                | XLOG_RESTORE_POINT
                | XLOG_END_OF_RECOVERY
                | XLOG_OVERWRITE_CONTRECORD
        ),
        _ => false,
    }
}

/// Decodes `record` if it is one of the kinds in [`WalEvent`]. Returns `None` for other records
/// and for bodies too short for their type (the CRC already vouched for the bytes, so a short
/// body means a format we do not know, not corruption).
pub fn decode_event(record: &Record<'_>) -> Option<WalEvent> {
    let d = record.main_data;
    match record.xl_rmid {
        RM_XACT_ID => decode_xact(record),
        RM_XLOG_ID => match record.rmgr_info() {
            info @ (XLOG_CHECKPOINT_SHUTDOWN | XLOG_CHECKPOINT_ONLINE) => {
                // CheckPoint: redo u64 @0, ThisTimeLineID u32 @8, PrevTimeLineID u32 @12, ...
                Some(WalEvent::Checkpoint {
                    shutdown: info == XLOG_CHECKPOINT_SHUTDOWN,
                    redo: Lsn(u64_at(d, 0)?),
                    tli: u32_at(d, 8)?,
                    prev_tli: u32_at(d, 12)?,
                })
            }
            XLOG_SWITCH => Some(WalEvent::Switch),
            XLOG_BACKUP_END => Some(WalEvent::BackupEnd {
                start: Lsn(u64_at(d, 0)?),
            }),
            XLOG_RESTORE_POINT => {
                // xl_restore_point: rp_time i64 @0, rp_name char[64] @8 (NUL-terminated)
                let rp_time = i64_at(d, 0)?;
                let name = d.get(8..(8 + MAXFNAMELEN).min(d.len()))?;
                let name = name.split(|&b| b == 0).next().unwrap_or(&[]);
                Some(WalEvent::RestorePoint {
                    name: String::from_utf8_lossy(name).into_owned(),
                    rp_time,
                })
            }
            XLOG_END_OF_RECOVERY => Some(WalEvent::EndOfRecovery {
                end_time: i64_at(d, 0)?,
                tli: u32_at(d, 8)?,
                prev_tli: u32_at(d, 12)?,
            }),
            XLOG_OVERWRITE_CONTRECORD => Some(WalEvent::OverwriteContrecord {
                overwritten: Lsn(u64_at(d, 0)?),
                overwrite_time: i64_at(d, 8)?,
            }),
            _ => None,
        },
        _ => None,
    }
}

fn decode_xact(record: &Record<'_>) -> Option<WalEvent> {
    let kind = match record.xl_info & XLOG_XACT_OPMASK {
        XLOG_XACT_COMMIT => XactKind::Commit,
        XLOG_XACT_ABORT => XactKind::Abort,
        XLOG_XACT_COMMIT_PREPARED => XactKind::CommitPrepared,
        XLOG_XACT_ABORT_PREPARED => XactKind::AbortPrepared,
        _ => return None,
    };
    let d = record.main_data;
    // xl_xact_commit / xl_xact_abort both start with TimestampTz xact_time.
    let xact_time = i64_at(d, 0)?;
    let xid = if matches!(kind, XactKind::CommitPrepared | XactKind::AbortPrepared) {
        twophase_xid(record.xl_info, d, kind.is_commit(), record.major).unwrap_or(record.xl_xid)
    } else {
        record.xl_xid
    };
    Some(WalEvent::XactEnd {
        kind,
        xid,
        xact_time,
    })
}

/// Walks the optional sub-records of a commit/abort body (`ParseCommitRecord` /
/// `ParseAbortRecord`) to the `xl_xact_twophase` xid. Sizes: dbinfo 8; subxacts 4 + 4n; rel
/// locators 4 + 12n; dropped stats (15+) 4 + 12n, 16n in 18 where objid became 64-bit; invals
/// (commit only) 4 + 16n.
fn twophase_xid(info: u8, d: &[u8], commit: bool, major: u32) -> Option<u32> {
    if info & XLOG_XACT_HAS_INFO == 0 {
        return None;
    }
    let xinfo = u32_at(d, 8)?;
    if xinfo & XACT_XINFO_HAS_TWOPHASE == 0 {
        return None;
    }
    let mut at: usize = 12;
    let counted = |at: &mut usize, item: usize| -> Option<()> {
        let n = usize::try_from(u32_at(d, *at)?).ok()?;
        *at = at.checked_add(4)?.checked_add(n.checked_mul(item)?)?;
        Some(())
    };
    if xinfo & XACT_XINFO_HAS_DBINFO != 0 {
        at += 8;
    }
    if xinfo & XACT_XINFO_HAS_SUBXACTS != 0 {
        counted(&mut at, 4)?;
    }
    if xinfo & XACT_XINFO_HAS_RELFILENODES != 0 {
        counted(&mut at, 12)?;
    }
    if major >= 15 && xinfo & XACT_XINFO_HAS_DROPPED_STATS != 0 {
        counted(&mut at, if major >= 18 { 16 } else { 12 })?;
    }
    if commit && xinfo & XACT_XINFO_HAS_INVALS != 0 {
        counted(&mut at, 16)?;
    }
    u32_at(d, at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record<'a>(rmid: u8, info: u8, xid: u32, main: &'a [u8], major: u32) -> Record<'a> {
        Record {
            lsn: Lsn(0x100),
            end_lsn: Lsn(0x200),
            xl_tot_len: 0,
            xl_xid: xid,
            xl_prev: Lsn(0),
            xl_info: info,
            xl_rmid: rmid,
            xl_crc: 0,
            main_data: main,
            record_origin: None,
            toplevel_xid: None,
            block_count: 0,
            major,
            raw: &[],
        }
    }

    #[test]
    fn may_be_event_is_exactly_what_decode_event_decodes() {
        let body: Vec<u8> = (0..200u8).collect(); // long enough for every event's body
        for rmid in 0..=255u8 {
            for info in 0..=255u8 {
                let decoded = decode_event(&record(rmid, info, 1, &body, 15)).is_some();
                assert_eq!(
                    may_be_event(rmid, info),
                    decoded,
                    "rmid {rmid} info {info:#x}"
                );
            }
        }
    }

    #[test]
    fn timestamps_convert_from_the_2000_epoch() {
        assert_eq!(
            pg_timestamp_to_utc(0).unwrap().to_rfc3339(),
            "2000-01-01T00:00:00+00:00"
        );
        let t = pg_timestamp_to_utc(1_500_000).unwrap();
        assert_eq!(utc_to_pg_timestamp(t), 1_500_000);
        assert!(pg_timestamp_to_utc(i64::MAX).is_none());
    }

    #[test]
    fn decodes_commit_abort_and_prepared() {
        let ts = 123_456_789i64.to_le_bytes();
        let e = decode_event(&record(RM_XACT_ID, XLOG_XACT_COMMIT, 725, &ts, 15));
        assert_eq!(
            e,
            Some(WalEvent::XactEnd {
                kind: XactKind::Commit,
                xid: 725,
                xact_time: 123_456_789
            })
        );
        let e = decode_event(&record(RM_XACT_ID, XLOG_XACT_ABORT, 726, &ts, 15));
        assert!(matches!(
            e,
            Some(WalEvent::XactEnd {
                kind: XactKind::Abort,
                xid: 726,
                ..
            })
        ));
        // COMMIT_PREPARED with xinfo: dbinfo, 1 subxact, 2 invals, twophase xid 731
        let mut body = ts.to_vec();
        body.extend_from_slice(
            &(XACT_XINFO_HAS_DBINFO
                | XACT_XINFO_HAS_SUBXACTS
                | XACT_XINFO_HAS_INVALS
                | XACT_XINFO_HAS_TWOPHASE)
                .to_le_bytes(),
        );
        body.extend_from_slice(&[0; 8]);
        body.extend_from_slice(&1u32.to_le_bytes());
        body.extend_from_slice(&[0; 4]);
        body.extend_from_slice(&2u32.to_le_bytes());
        body.extend_from_slice(&[0; 32]);
        body.extend_from_slice(&731u32.to_le_bytes());
        let info = XLOG_XACT_COMMIT_PREPARED | XLOG_XACT_HAS_INFO;
        let e = decode_event(&record(RM_XACT_ID, info, 0, &body, 15));
        assert!(matches!(
            e,
            Some(WalEvent::XactEnd {
                kind: XactKind::CommitPrepared,
                xid: 731,
                ..
            })
        ));
        // For an abort the invals are not there, so the same bytes point elsewhere: no panic.
        let info = XLOG_XACT_ABORT_PREPARED | XLOG_XACT_HAS_INFO;
        assert!(decode_event(&record(RM_XACT_ID, info, 0, &body, 15)).is_some());
        // Too short: not decodable, not a panic.
        assert_eq!(
            decode_event(&record(RM_XACT_ID, XLOG_XACT_COMMIT, 1, &[1, 2], 15)),
            None
        );
        assert_eq!(
            decode_event(&record(RM_XACT_ID, XLOG_XACT_PREPARE, 1, &ts, 15)),
            None
        );
    }

    #[test]
    fn decodes_xlog_records() {
        let mut rp = 77i64.to_le_bytes().to_vec();
        let mut name = [0u8; 64];
        name[..3].copy_from_slice(b"rp1");
        rp.extend_from_slice(&name);
        let e = decode_event(&record(RM_XLOG_ID, XLOG_RESTORE_POINT, 0, &rp, 15));
        assert_eq!(
            e,
            Some(WalEvent::RestorePoint {
                name: "rp1".into(),
                rp_time: 77
            })
        );
        let mut ck = 0x72CA00u64.to_le_bytes().to_vec();
        ck.extend_from_slice(&1u32.to_le_bytes());
        ck.extend_from_slice(&1u32.to_le_bytes());
        ck.extend_from_slice(&[0; 64]);
        let e = decode_event(&record(RM_XLOG_ID, XLOG_CHECKPOINT_ONLINE, 0, &ck, 15));
        assert_eq!(
            e,
            Some(WalEvent::Checkpoint {
                shutdown: false,
                redo: Lsn(0x72CA00),
                tli: 1,
                prev_tli: 1
            })
        );
        assert_eq!(
            decode_event(&record(RM_XLOG_ID, XLOG_SWITCH, 0, &[], 15)),
            Some(WalEvent::Switch)
        );
        let e = decode_event(&record(
            RM_XLOG_ID,
            XLOG_BACKUP_END,
            0,
            &5u64.to_le_bytes(),
            15,
        ));
        assert_eq!(e, Some(WalEvent::BackupEnd { start: Lsn(5) }));
        assert_eq!(decode_event(&record(RM_XLOG_ID, 0x20, 0, &[], 15)), None); // NOOP
        assert_eq!(
            decode_event(&record(RM_XLOG_ID, XLOG_RESTORE_POINT, 0, &[0; 4], 15)),
            None
        );
    }
}
