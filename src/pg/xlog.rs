//! The messages carried inside CopyData during physical streaming replication, without I/O:
//! XLogData ('w') and PrimaryKeepalive ('k') from the server, StandbyStatusUpdate ('r') from us.
//!
//! Reference: PostgreSQL docs, "Streaming Replication Protocol", START_REPLICATION; walsender.c
//! (`XLogSendPhysical`, `WalSndKeepalive`, `ProcessStandbyReplyMessage`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};

use super::error::{Error, Result};
use super::message::Reader;
use crate::wal::Lsn;

/// Seconds from the Unix epoch to the PostgreSQL epoch, 2000-01-01 00:00:00 UTC.
const PG_EPOCH_UNIX_SECS: u64 = 946_684_800;

/// A PostgreSQL `TimestampTz` on the wire: microseconds since 2000-01-01 00:00:00 UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PgTimestamp(pub i64);

impl PgTimestamp {
    pub fn now() -> PgTimestamp {
        PgTimestamp::from_system_time(SystemTime::now())
    }

    pub fn from_system_time(t: SystemTime) -> PgTimestamp {
        let pg_epoch = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_UNIX_SECS);
        match t.duration_since(pg_epoch) {
            Ok(d) => PgTimestamp(i64::try_from(d.as_micros()).unwrap_or(i64::MAX)),
            Err(e) => PgTimestamp(-i64::try_from(e.duration().as_micros()).unwrap_or(i64::MAX)),
        }
    }

    pub fn to_system_time(self) -> SystemTime {
        let pg_epoch = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_UNIX_SECS);
        if self.0 >= 0 {
            pg_epoch + Duration::from_micros(self.0 as u64)
        } else {
            pg_epoch - Duration::from_micros(self.0.unsigned_abs())
        }
    }
}

/// A message the server sends inside the CopyBoth stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerCopyMessage {
    /// WAL bytes starting at `wal_start`. `wal_end` is the server's current end of WAL, which
    /// may be far beyond `wal_start + data.len()`.
    XLogData {
        wal_start: Lsn,
        wal_end: Lsn,
        server_time: PgTimestamp,
        data: Bytes,
    },
    /// PrimaryKeepalive. When `reply_requested`, the server disconnects us after
    /// `wal_sender_timeout` unless we send a StandbyStatusUpdate soon.
    Keepalive {
        wal_end: Lsn,
        server_time: PgTimestamp,
        reply_requested: bool,
    },
}

/// Decodes the payload of one CopyData message received during START_REPLICATION.
pub fn decode_server_copy(payload: Bytes) -> Result<ServerCopyMessage> {
    let mut r = Reader::new(payload, "replication CopyData");
    match r.u8()? {
        b'w' => {
            let wal_start = Lsn(r.u64()?);
            let wal_end = Lsn(r.u64()?);
            let server_time = PgTimestamp(r.i64()?);
            let data = r.rest();
            // Reject data that would run past the end of the LSN space: the caller computes
            // `wal_start + len` and must be able to trust it.
            if wal_start.checked_add(data.len() as u64).is_none() {
                return Err(Error::protocol(
                    "XLogData",
                    format!("{} bytes at {wal_start} overflow the LSN space", data.len()),
                ));
            }
            Ok(ServerCopyMessage::XLogData {
                wal_start,
                wal_end,
                server_time,
                data,
            })
        }
        b'k' => {
            let wal_end = Lsn(r.u64()?);
            let server_time = PgTimestamp(r.i64()?);
            let reply = r.u8()?;
            r.expect_end()?;
            Ok(ServerCopyMessage::Keepalive {
                wal_end,
                server_time,
                reply_requested: reply != 0,
            })
        }
        other => Err(Error::protocol(
            "replication CopyData",
            format!("unknown message type {:?} (0x{other:02x})", other as char),
        )),
    }
}

/// StandbyStatusUpdate ('r'): what we have written, flushed durably, and applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandbyStatusUpdate {
    pub write: Lsn,
    pub flush: Lsn,
    pub apply: Lsn,
    pub client_time: PgTimestamp,
    pub reply_requested: bool,
}

impl StandbyStatusUpdate {
    pub const LEN: usize = 1 + 8 * 4 + 1;

    /// Appends the CopyData payload (not the CopyData frame) to `buf`.
    pub fn encode(&self, buf: &mut BytesMut) {
        buf.reserve(Self::LEN);
        buf.put_u8(b'r');
        buf.put_u64(self.write.0);
        buf.put_u64(self.flush.0);
        buf.put_u64(self.apply.0);
        buf.put_i64(self.client_time.0);
        buf.put_u8(u8::from(self.reply_requested));
    }

    /// Decodes a payload produced by [`StandbyStatusUpdate::encode`]; used by tests and tools.
    pub fn decode(payload: Bytes) -> Result<StandbyStatusUpdate> {
        let mut r = Reader::new(payload, "StandbyStatusUpdate");
        if r.u8()? != b'r' {
            return Err(Error::protocol(
                "StandbyStatusUpdate",
                "type byte is not 'r'",
            ));
        }
        let s = StandbyStatusUpdate {
            write: Lsn(r.u64()?),
            flush: Lsn(r.u64()?),
            apply: Lsn(r.u64()?),
            client_time: PgTimestamp(r.i64()?),
            reply_requested: r.u8()? != 0,
        };
        r.expect_end()?;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xlog_data_from_doc_layout() {
        let mut p = vec![b'w'];
        p.extend_from_slice(&0x0000_0001_0300_0000u64.to_be_bytes());
        p.extend_from_slice(&0x0000_0001_0400_0000u64.to_be_bytes());
        p.extend_from_slice(&1_000_000i64.to_be_bytes());
        p.extend_from_slice(b"WAL!");
        let m = decode_server_copy(Bytes::from(p)).expect("valid");
        assert_eq!(
            m,
            ServerCopyMessage::XLogData {
                wal_start: "1/3000000".parse().expect("lsn"),
                wal_end: "1/4000000".parse().expect("lsn"),
                server_time: PgTimestamp(1_000_000),
                data: Bytes::from_static(b"WAL!"),
            }
        );
    }

    #[test]
    fn keepalive() {
        let mut p = vec![b'k'];
        p.extend_from_slice(&0x0300_0060u64.to_be_bytes());
        p.extend_from_slice(&(-5i64).to_be_bytes());
        p.push(1);
        let m = decode_server_copy(Bytes::from(p)).expect("valid");
        assert_eq!(
            m,
            ServerCopyMessage::Keepalive {
                wal_end: Lsn(0x0300_0060),
                server_time: PgTimestamp(-5),
                reply_requested: true
            }
        );
    }

    #[test]
    fn malformed_copy_messages() {
        for p in [
            &b""[..],
            b"w",
            b"w\0\0\0\0\0\0\0\0",
            b"k\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
            b"k\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\x01extra",
            b"x",
        ] {
            assert!(
                decode_server_copy(Bytes::copy_from_slice(p)).is_err(),
                "{p:?}"
            );
        }
        let mut p = vec![b'w'];
        p.extend_from_slice(&u64::MAX.to_be_bytes());
        p.extend_from_slice(&[0; 16]);
        p.push(0);
        assert!(
            decode_server_copy(Bytes::from(p)).is_err(),
            "overflowing LSN"
        );
    }

    #[test]
    fn status_update_round_trip_and_layout() {
        let s = StandbyStatusUpdate {
            write: Lsn(0x10),
            flush: Lsn(0x8),
            apply: Lsn(0),
            client_time: PgTimestamp(42),
            reply_requested: false,
        };
        let mut buf = BytesMut::new();
        s.encode(&mut buf);
        assert_eq!(buf.len(), StandbyStatusUpdate::LEN);
        assert_eq!(buf[0], b'r');
        assert_eq!(&buf[1..9], &0x10u64.to_be_bytes());
        assert_eq!(buf[33], 0);
        assert_eq!(StandbyStatusUpdate::decode(buf.freeze()).expect("valid"), s);
    }

    #[test]
    fn timestamps() {
        let epoch = UNIX_EPOCH + Duration::from_secs(PG_EPOCH_UNIX_SECS);
        assert_eq!(PgTimestamp::from_system_time(epoch), PgTimestamp(0));
        let t = epoch + Duration::from_micros(1_500_000);
        assert_eq!(PgTimestamp::from_system_time(t), PgTimestamp(1_500_000));
        assert_eq!(PgTimestamp(1_500_000).to_system_time(), t);
        assert_eq!(
            PgTimestamp(-1).to_system_time(),
            epoch - Duration::from_micros(1)
        );
        assert!(PgTimestamp::now().0 > 800_000_000_000_000);
    }
}
