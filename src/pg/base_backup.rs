//! BASE_BACKUP: the command for each server generation and the response turned into a flat
//! sequence of [`BackupEvent`]s, streamed chunk by chunk (no archive is ever held in memory).
//!
//! Two wire formats:
//! * PostgreSQL 15+ (`basebackup_copy.c`): result set (start LSN, TLI), result set (tablespaces),
//!   then ONE CopyOutResponse whose CopyData payloads start with a type byte: `n` new archive
//!   (name, tablespace location), `d` data, `p` progress (int64 bytes done), `m` manifest
//!   follows; then CopyDone and a result set (end LSN, TLI).
//! * PostgreSQL 13/14: the same two result sets, then one CopyOut per tablespace in the order of
//!   the tablespace list (the main data directory, with NULL oid, last), then one CopyOut with
//!   the manifest, then the end result set. CopyData payloads are raw bytes.
//!
//! Reference: PostgreSQL docs, "Streaming Replication Protocol", BASE_BACKUP (both versions).

use std::collections::VecDeque;

use bytes::Bytes;

use super::conn::unexpected;
use super::error::{Error, Result};
use super::message::{encode, BackendMessage, Reader};
use super::replication::ReplicationConn;
use crate::wal::{Lsn, TimelineId};

/// What to ask the server for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseBackupOptions {
    /// Shown in `pg_stat_progress_basebackup` and written into `backup_label`.
    pub label: String,
    /// Request an immediate checkpoint instead of a spread one.
    pub fast_checkpoint: bool,
    /// Ask for a backup manifest with CRC32C file checksums.
    pub manifest: bool,
    /// Wait until the WAL needed by the backup has been archived (`archive_command`) before
    /// reporting the end. Turn it off when WAL is streamed, not archived.
    pub wait_for_wal_archive: bool,
    /// Throttle in kB/s (the server accepts 32 to 1048576).
    pub max_rate_kb: Option<u32>,
    /// Ask the server to estimate tablespace sizes first (reported in `Start`).
    pub progress: bool,
    /// PostgreSQL 17+: an incremental backup on the manifest sent with
    /// [`ReplicationConn::upload_manifest`] just before (relation files come as
    /// `INCREMENTAL.<name>` with only the blocks changed since).
    pub incremental: bool,
}

impl Default for BaseBackupOptions {
    fn default() -> Self {
        BaseBackupOptions {
            label: "pitr base backup".into(),
            fast_checkpoint: false,
            manifest: true,
            wait_for_wal_archive: false,
            max_rate_kb: None,
            progress: true,
            incremental: false,
        }
    }
}

/// One row of the tablespace list sent before the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tablespace {
    /// `None` for the main data directory.
    pub oid: Option<u32>,
    /// Absolute path on the server; `None` for the main data directory.
    pub location: Option<String>,
    /// Estimated size in kB, only with `progress`.
    pub size_kb: Option<u64>,
}

/// The pieces of a base backup, in wire order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupEvent {
    /// The backup started at `start_lsn` (the checkpoint's redo point); WAL from here on is
    /// needed to restore it.
    Start {
        start_lsn: Lsn,
        timeline: TimelineId,
        tablespaces: Vec<Tablespace>,
    },
    /// A new tar archive begins; following `Data` events belong to it. `base.tar` is the main
    /// data directory; a tablespace archive carries `(oid, location)`.
    Archive {
        name: String,
        tablespace: Option<(u32, String)>,
    },
    /// Raw tar bytes of the current archive, as received.
    Data(Bytes),
    /// A chunk of the backup manifest (JSON), after all archives.
    Manifest(Bytes),
    /// Total bytes the server has sent so far (PostgreSQL 15+ only).
    Progress { bytes_done: u64 },
    /// The backup is complete and consistent once WAL up to `stop_lsn` is replayed.
    End { stop_lsn: Lsn, timeline: TimelineId },
}

/// Escapes a string literal for the replication command grammar (standard strings: only the
/// quote is special).
fn quote_literal(s: &str) -> Result<String> {
    if s.contains('\0') {
        return Err(Error::config("backup label contains a NUL byte"));
    }
    Ok(format!("'{}'", s.replace('\'', "''")))
}

/// The BASE_BACKUP command for a server of `version_num`.
pub fn base_backup_command(opts: &BaseBackupOptions, version_num: u32) -> Result<String> {
    let label = quote_literal(&opts.label)?;
    if version_num >= 150000 {
        let mut o = vec![format!("LABEL {label}")];
        if opts.progress {
            o.push("PROGRESS".into());
        }
        if opts.fast_checkpoint {
            o.push("CHECKPOINT 'fast'".into());
        }
        o.push(format!("WAIT {}", opts.wait_for_wal_archive));
        if let Some(r) = opts.max_rate_kb {
            o.push(format!("MAX_RATE {r}"));
        }
        o.push("TABLESPACE_MAP".into());
        if opts.manifest {
            o.push("MANIFEST 'yes'".into());
            o.push("MANIFEST_CHECKSUMS 'CRC32C'".into());
        }
        if opts.incremental {
            o.push("INCREMENTAL".into());
        }
        Ok(format!("BASE_BACKUP ({})", o.join(", ")))
    } else {
        // The pre-15 grammar: bare keywords, and waiting is the default (NOWAIT turns it off).
        let mut o = vec![format!("LABEL {label}")];
        if opts.progress {
            o.push("PROGRESS".into());
        }
        if opts.fast_checkpoint {
            o.push("FAST".into());
        }
        if !opts.wait_for_wal_archive {
            o.push("NOWAIT".into());
        }
        if let Some(r) = opts.max_rate_kb {
            o.push(format!("MAX_RATE {r}"));
        }
        o.push("TABLESPACE_MAP".into());
        if opts.manifest {
            o.push("MANIFEST 'yes'".into());
            o.push("MANIFEST_CHECKSUMS 'CRC32C'".into());
        }
        Ok(format!("BASE_BACKUP {}", o.join(" ")))
    }
}

/// Manifest bytes per CopyData message of UPLOAD_MANIFEST.
const MANIFEST_CHUNK: usize = 64 << 10;

impl ReplicationConn {
    /// PostgreSQL 17+ `UPLOAD_MANIFEST`: sends the prior backup's manifest, which the next
    /// `BASE_BACKUP (INCREMENTAL)` on this connection is taken against.
    pub async fn upload_manifest(&mut self, manifest: &[u8]) -> Result<()> {
        let conn = self.conn_mut();
        encode::query("UPLOAD_MANIFEST", conn.wbuf())?;
        conn.flush().await?;
        let mut error = None;
        loop {
            match conn.read_message().await? {
                BackendMessage::CopyInResponse => break,
                BackendMessage::ErrorResponse(f) => error = Some(f.into_error()),
                BackendMessage::ReadyForQuery { .. } => {
                    return Err(error.unwrap_or_else(|| {
                        Error::protocol("UPLOAD_MANIFEST", "the server did not start COPY")
                    }))
                }
                other => return Err(unexpected("UPLOAD_MANIFEST", &other)),
            }
        }
        for chunk in manifest.chunks(MANIFEST_CHUNK) {
            encode::copy_data(chunk, conn.wbuf())?;
            conn.flush().await?;
        }
        encode::copy_done(conn.wbuf());
        conn.flush().await?;
        loop {
            match conn.read_message().await? {
                BackendMessage::ErrorResponse(f) => error = Some(f.into_error()),
                BackendMessage::ReadyForQuery { .. } => break,
                _ => {}
            }
        }
        error.map_or(Ok(()), Err)
    }

    /// Starts BASE_BACKUP and returns the stream of its events.
    pub async fn base_backup(mut self, opts: BaseBackupOptions) -> Result<BaseBackupStream> {
        let new_format = self.server_version_num() >= 150000;
        let sql = base_backup_command(&opts, self.server_version_num())?;
        tracing::debug!(sql, "starting base backup");
        let conn = self.conn_mut();
        encode::query(&sql, conn.wbuf())?;
        conn.flush().await?;
        Ok(BaseBackupStream {
            conn: self,
            decoder: BackupDecoder::new(new_format, opts.manifest),
        })
    }
}

/// The response to BASE_BACKUP.
#[derive(Debug)]
pub struct BaseBackupStream {
    conn: ReplicationConn,
    decoder: BackupDecoder,
}

impl BaseBackupStream {
    /// The next event, or `None` after `End`.
    ///
    /// Cancellation-safe: each await is a buffered read, and the decoder state changes only
    /// after a whole message has been read.
    pub async fn next_event(&mut self) -> Result<Option<BackupEvent>> {
        loop {
            if let Some(ev) = self.decoder.pending.pop_front() {
                return Ok(Some(ev));
            }
            if self.decoder.done {
                return Ok(None);
            }
            let msg = self.conn.conn_mut().read_message().await?;
            self.decoder.on_message(msg)?;
        }
    }

    /// The connection, back in command mode, once `next_event` has returned `None`.
    pub fn into_conn(self) -> Result<ReplicationConn> {
        if self.decoder.done {
            Ok(self.conn)
        } else {
            Err(Error::protocol(
                "BaseBackupStream::into_conn",
                "the backup has not finished",
            ))
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopyTarget {
    /// In COPY, before the first 'n' (new format).
    Nothing,
    Archive,
    Manifest,
}

/// The BASE_BACKUP response as a pure state machine over backend messages.
#[derive(Debug)]
struct BackupDecoder {
    new_format: bool,
    manifest_expected: bool,
    /// Rows of the result set being received, if a RowDescription opened one.
    rows: Option<Vec<Vec<Option<Bytes>>>>,
    result_sets: usize,
    start: Option<(Lsn, TimelineId)>,
    tablespaces: Vec<Tablespace>,
    /// Old format: CopyOut operations seen so far.
    copies: usize,
    copy: Option<CopyTarget>,
    end: Option<(Lsn, TimelineId)>,
    pending: VecDeque<BackupEvent>,
    done: bool,
}

impl BackupDecoder {
    fn new(new_format: bool, manifest_expected: bool) -> BackupDecoder {
        BackupDecoder {
            new_format,
            manifest_expected,
            rows: None,
            result_sets: 0,
            start: None,
            tablespaces: Vec::new(),
            copies: 0,
            copy: None,
            end: None,
            pending: VecDeque::new(),
            done: false,
        }
    }

    fn on_message(&mut self, msg: BackendMessage) -> Result<()> {
        use BackendMessage as M;
        if self.copy.is_some() {
            return match msg {
                M::CopyData(payload) => self.on_copy_data(payload),
                M::CopyDone => {
                    self.copy = None;
                    Ok(())
                }
                M::ErrorResponse(f) => Err(f.into_error()),
                other => Err(unexpected("BASE_BACKUP COPY", &other)),
            };
        }
        match msg {
            M::RowDescription { .. } => {
                self.finish_result_set()?;
                self.rows = Some(Vec::new());
            }
            M::DataRow { values } => match &mut self.rows {
                Some(rows) => rows.push(values),
                None => {
                    return Err(Error::protocol(
                        "BASE_BACKUP",
                        "DataRow without RowDescription",
                    ))
                }
            },
            M::CommandComplete { .. } => self.finish_result_set()?,
            M::CopyOutResponse => {
                self.finish_result_set()?;
                if self.start.is_none() {
                    return Err(Error::protocol(
                        "BASE_BACKUP",
                        "COPY before the start position",
                    ));
                }
                self.copy = Some(if self.new_format {
                    CopyTarget::Nothing
                } else {
                    self.old_format_next_copy()?
                });
            }
            M::ReadyForQuery { .. } => {
                self.finish_result_set()?;
                let (stop_lsn, timeline) = self.end.ok_or_else(|| {
                    Error::protocol("BASE_BACKUP", "ended without reporting the end position")
                })?;
                self.pending
                    .push_back(BackupEvent::End { stop_lsn, timeline });
                self.done = true;
            }
            M::ErrorResponse(f) => return Err(f.into_error()),
            other => return Err(unexpected("BASE_BACKUP response", &other)),
        }
        Ok(())
    }

    /// Old format: which archive (or the manifest) the next CopyOut carries.
    fn old_format_next_copy(&mut self) -> Result<CopyTarget> {
        let i = self.copies;
        self.copies += 1;
        if let Some(ts) = self.tablespaces.get(i) {
            let ev = match (ts.oid, &ts.location) {
                (Some(oid), Some(loc)) => BackupEvent::Archive {
                    name: format!("{oid}.tar"),
                    tablespace: Some((oid, loc.clone())),
                },
                _ => BackupEvent::Archive {
                    name: "base.tar".into(),
                    tablespace: None,
                },
            };
            self.pending.push_back(ev);
            Ok(CopyTarget::Archive)
        } else if i == self.tablespaces.len() && self.manifest_expected {
            Ok(CopyTarget::Manifest)
        } else {
            Err(Error::protocol(
                "BASE_BACKUP",
                format!(
                    "COPY number {} but only {} tablespaces",
                    i + 1,
                    self.tablespaces.len()
                ),
            ))
        }
    }

    fn on_copy_data(&mut self, payload: Bytes) -> Result<()> {
        let target = self.copy.unwrap_or(CopyTarget::Nothing);
        if !self.new_format {
            let ev = match target {
                CopyTarget::Manifest => BackupEvent::Manifest(payload),
                _ => BackupEvent::Data(payload),
            };
            self.pending.push_back(ev);
            return Ok(());
        }
        let mut r = Reader::new(payload, "BASE_BACKUP CopyData");
        match r.u8()? {
            b'n' => {
                let name = r.cstr()?;
                let location = r.cstr()?;
                r.expect_end()?;
                if name.is_empty() || name.contains('/') {
                    return Err(Error::protocol(
                        "BASE_BACKUP new archive",
                        format!("unsafe archive name {name:?}"),
                    ));
                }
                let tablespace = if location.is_empty() {
                    None
                } else {
                    let oid = self
                        .tablespaces
                        .iter()
                        .find(|t| t.location.as_deref() == Some(location.as_str()))
                        .and_then(|t| t.oid)
                        .ok_or_else(|| {
                            Error::protocol(
                                "BASE_BACKUP new archive",
                                format!("archive {name} for unknown tablespace {location:?}"),
                            )
                        })?;
                    Some((oid, location))
                };
                self.copy = Some(CopyTarget::Archive);
                self.pending
                    .push_back(BackupEvent::Archive { name, tablespace });
            }
            b'd' => {
                let data = r.rest();
                let ev = match target {
                    CopyTarget::Archive => BackupEvent::Data(data),
                    CopyTarget::Manifest => BackupEvent::Manifest(data),
                    CopyTarget::Nothing => {
                        return Err(Error::protocol(
                            "BASE_BACKUP CopyData",
                            "data before any archive was announced",
                        ))
                    }
                };
                self.pending.push_back(ev);
            }
            b'p' => {
                let bytes_done = r.i64()?;
                r.expect_end()?;
                self.pending.push_back(BackupEvent::Progress {
                    bytes_done: u64::try_from(bytes_done).unwrap_or(0),
                });
            }
            b'm' => {
                r.expect_end()?;
                self.copy = Some(CopyTarget::Manifest);
            }
            other => {
                return Err(Error::protocol(
                    "BASE_BACKUP CopyData",
                    format!("unknown type byte {:?}", other as char),
                ))
            }
        }
        Ok(())
    }

    /// Interprets a completed result set by its position: start, tablespaces, end.
    fn finish_result_set(&mut self) -> Result<()> {
        let Some(rows) = self.rows.take() else {
            return Ok(());
        };
        let n = self.result_sets;
        self.result_sets += 1;
        match n {
            0 => self.start = Some(lsn_tli_row(&rows, "BASE_BACKUP start position")?),
            1 => {
                let mut tablespaces = Vec::with_capacity(rows.len());
                for row in &rows {
                    tablespaces.push(tablespace_row(row)?);
                }
                self.tablespaces = tablespaces.clone();
                let (start_lsn, timeline) = self.start.unwrap_or_default();
                self.pending.push_back(BackupEvent::Start {
                    start_lsn,
                    timeline,
                    tablespaces,
                });
            }
            2 => {
                if self.copy.is_some()
                    || (self.copies == 0 && !self.new_format && !self.tablespaces.is_empty())
                {
                    return Err(Error::protocol(
                        "BASE_BACKUP",
                        "end position before the data",
                    ));
                }
                self.end = Some(lsn_tli_row(&rows, "BASE_BACKUP end position")?);
            }
            _ => {
                return Err(Error::protocol(
                    "BASE_BACKUP",
                    "more result sets than the protocol defines",
                ))
            }
        }
        Ok(())
    }
}

fn text(v: &Option<Bytes>) -> Option<String> {
    v.as_ref().map(|b| String::from_utf8_lossy(b).into_owned())
}

fn lsn_tli_row(rows: &[Vec<Option<Bytes>>], what: &'static str) -> Result<(Lsn, TimelineId)> {
    let row = rows
        .first()
        .ok_or_else(|| Error::protocol(what, "empty result set"))?;
    let lsn = row
        .first()
        .and_then(text)
        .ok_or_else(|| Error::protocol(what, "no LSN"))?;
    let tli = row
        .get(1)
        .and_then(text)
        .ok_or_else(|| Error::protocol(what, "no timeline"))?;
    let lsn: Lsn = lsn
        .parse()
        .map_err(|_| Error::protocol(what, format!("bad LSN {lsn:?}")))?;
    let tli: TimelineId = tli
        .trim()
        .parse()
        .map_err(|_| Error::protocol(what, format!("bad timeline {tli:?}")))?;
    Ok((lsn, tli))
}

fn tablespace_row(row: &[Option<Bytes>]) -> Result<Tablespace> {
    const WHAT: &str = "BASE_BACKUP tablespace list";
    let num = |i: usize| -> Result<Option<u64>> {
        match row.get(i).and_then(text) {
            None => Ok(None),
            Some(s) => s
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| Error::protocol(WHAT, format!("bad number {s:?}"))),
        }
    };
    let oid = num(0)?
        .map(|o| u32::try_from(o).map_err(|_| Error::protocol(WHAT, "oid out of range")))
        .transpose()?;
    Ok(Tablespace {
        oid,
        location: row.get(1).and_then(text),
        size_kb: num(2)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> BaseBackupOptions {
        BaseBackupOptions {
            label: "it's pitr".into(),
            fast_checkpoint: true,
            manifest: true,
            wait_for_wal_archive: false,
            max_rate_kb: Some(1024),
            progress: true,
            incremental: false,
        }
    }

    #[test]
    fn commands_per_version() {
        assert_eq!(
            base_backup_command(&opts(), 150000).expect("ok"),
            "BASE_BACKUP (LABEL 'it''s pitr', PROGRESS, CHECKPOINT 'fast', WAIT false, \
             MAX_RATE 1024, TABLESPACE_MAP, MANIFEST 'yes', MANIFEST_CHECKSUMS 'CRC32C')"
        );
        assert_eq!(
            base_backup_command(&opts(), 140005).expect("ok"),
            "BASE_BACKUP LABEL 'it''s pitr' PROGRESS FAST NOWAIT MAX_RATE 1024 TABLESPACE_MAP \
             MANIFEST 'yes' MANIFEST_CHECKSUMS 'CRC32C'"
        );
        let plain = BaseBackupOptions {
            label: "x".into(),
            fast_checkpoint: false,
            manifest: false,
            wait_for_wal_archive: true,
            max_rate_kb: None,
            progress: false,
            incremental: false,
        };
        assert_eq!(
            base_backup_command(&plain, 130000).expect("ok"),
            "BASE_BACKUP LABEL 'x' TABLESPACE_MAP"
        );
        assert_eq!(
            base_backup_command(&plain, 160000).expect("ok"),
            "BASE_BACKUP (LABEL 'x', WAIT true, TABLESPACE_MAP)"
        );
        let nul = BaseBackupOptions {
            label: "a\0b".into(),
            ..plain
        };
        assert!(base_backup_command(&nul, 160000).is_err());
    }

    fn b(s: &str) -> Option<Bytes> {
        Some(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn result_set(rows: Vec<Vec<Option<Bytes>>>) -> Vec<BackendMessage> {
        let mut v = vec![BackendMessage::RowDescription { columns: vec![] }];
        v.extend(
            rows.into_iter()
                .map(|values| BackendMessage::DataRow { values }),
        );
        v.push(BackendMessage::CommandComplete {
            tag: "SELECT".into(),
        });
        v
    }

    fn copy_data(kind: u8, body: &[u8]) -> BackendMessage {
        let mut v = vec![kind];
        v.extend_from_slice(body);
        BackendMessage::CopyData(Bytes::from(v))
    }

    fn run(new_format: bool, msgs: Vec<BackendMessage>) -> Result<Vec<BackupEvent>> {
        let mut d = BackupDecoder::new(new_format, true);
        let mut out = Vec::new();
        for m in msgs {
            d.on_message(m)?;
            out.extend(d.pending.drain(..));
        }
        assert!(d.done, "decoder not done");
        Ok(out)
    }

    fn preamble() -> Vec<BackendMessage> {
        let mut m = result_set(vec![vec![b("0/2000028"), b("1")]]);
        m.extend(result_set(vec![
            vec![b("16384"), b("/srv/ts1"), b("10")],
            vec![None, None, b("30000")],
        ]));
        m
    }

    fn start_event() -> BackupEvent {
        BackupEvent::Start {
            start_lsn: Lsn(0x2000028),
            timeline: 1,
            tablespaces: vec![
                Tablespace {
                    oid: Some(16384),
                    location: Some("/srv/ts1".into()),
                    size_kb: Some(10),
                },
                Tablespace {
                    oid: None,
                    location: None,
                    size_kb: Some(30000),
                },
            ],
        }
    }

    #[test]
    fn new_format_stream() {
        let mut m = preamble();
        m.push(BackendMessage::CopyOutResponse);
        m.push(copy_data(b'n', b"16384.tar\0/srv/ts1\0"));
        m.push(copy_data(b'd', b"ts-bytes"));
        m.push(copy_data(b'p', &8i64.to_be_bytes()));
        m.push(copy_data(b'n', b"base.tar\0\0"));
        m.push(copy_data(b'd', b"tar1"));
        m.push(copy_data(b'd', b"tar2"));
        m.push(copy_data(b'm', b""));
        m.push(copy_data(
            b'd',
            b"{\"PostgreSQL-Backup-Manifest-Version\": 1}",
        ));
        m.push(BackendMessage::CopyDone);
        m.extend(result_set(vec![vec![b("0/2000100"), b("1")]]));
        m.push(BackendMessage::CommandComplete {
            tag: "BASE_BACKUP".into(),
        });
        m.push(BackendMessage::ReadyForQuery { status: b'I' });
        let ev = run(true, m).expect("valid");
        assert_eq!(
            ev,
            vec![
                start_event(),
                BackupEvent::Archive {
                    name: "16384.tar".into(),
                    tablespace: Some((16384, "/srv/ts1".into()))
                },
                BackupEvent::Data(Bytes::from_static(b"ts-bytes")),
                BackupEvent::Progress { bytes_done: 8 },
                BackupEvent::Archive {
                    name: "base.tar".into(),
                    tablespace: None
                },
                BackupEvent::Data(Bytes::from_static(b"tar1")),
                BackupEvent::Data(Bytes::from_static(b"tar2")),
                BackupEvent::Manifest(Bytes::from_static(
                    b"{\"PostgreSQL-Backup-Manifest-Version\": 1}"
                )),
                BackupEvent::End {
                    stop_lsn: Lsn(0x2000100),
                    timeline: 1
                },
            ]
        );
    }

    #[test]
    fn old_format_stream() {
        let mut m = preamble();
        for chunk in [&b"ts-bytes"[..], b"base-bytes", b"{}"] {
            m.push(BackendMessage::CopyOutResponse);
            m.push(BackendMessage::CopyData(Bytes::copy_from_slice(chunk)));
            m.push(BackendMessage::CopyDone);
        }
        m.extend(result_set(vec![vec![b("0/2000100"), b("1")]]));
        m.push(BackendMessage::ReadyForQuery { status: b'I' });
        let ev = run(false, m).expect("valid");
        assert_eq!(ev[0], start_event());
        assert_eq!(
            ev[1],
            BackupEvent::Archive {
                name: "16384.tar".into(),
                tablespace: Some((16384, "/srv/ts1".into()))
            }
        );
        assert_eq!(ev[2], BackupEvent::Data(Bytes::from_static(b"ts-bytes")));
        assert_eq!(
            ev[3],
            BackupEvent::Archive {
                name: "base.tar".into(),
                tablespace: None
            }
        );
        assert_eq!(ev[5], BackupEvent::Manifest(Bytes::from_static(b"{}")));
        assert_eq!(
            ev[6],
            BackupEvent::End {
                stop_lsn: Lsn(0x2000100),
                timeline: 1
            }
        );
    }

    /// Random message sequences: errors are fine, panics are not.
    #[test]
    fn random_sequences_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..5_000 {
            let mut d = BackupDecoder::new(rng.gen(), rng.gen());
            for _ in 0..rng.gen_range(1..20) {
                let msg = match rng.gen_range(0..7) {
                    0 => BackendMessage::RowDescription { columns: vec![] },
                    1 => BackendMessage::DataRow {
                        values: (0..rng.gen_range(0..4))
                            .map(|_| {
                                rng.gen_bool(0.8).then(|| {
                                    let choices: [&[u8]; 5] =
                                        [b"0/1", b"1", b"16384", b"/x", b"\xff"];
                                    Bytes::from_static(choices[rng.gen_range(0..5)])
                                })
                            })
                            .collect(),
                    },
                    2 => BackendMessage::CommandComplete {
                        tag: "SELECT".into(),
                    },
                    3 => BackendMessage::CopyOutResponse,
                    4 => {
                        let kinds = b"ndpmx";
                        let mut p = vec![kinds[rng.gen_range(0..kinds.len())]];
                        p.extend((0..rng.gen_range(0..12)).map(|_| rng.gen::<u8>()));
                        BackendMessage::CopyData(Bytes::from(p))
                    }
                    5 => BackendMessage::CopyDone,
                    _ => BackendMessage::ReadyForQuery { status: b'I' },
                };
                if d.on_message(msg).is_err() || d.done {
                    break;
                }
            }
        }
    }

    #[test]
    fn broken_streams_are_errors() {
        // Data before 'n'.
        let mut m = preamble();
        m.push(BackendMessage::CopyOutResponse);
        m.push(copy_data(b'd', b"x"));
        assert!(run(true, m).is_err());
        // Unknown tablespace location.
        let mut m = preamble();
        m.push(BackendMessage::CopyOutResponse);
        m.push(copy_data(b'n', b"1.tar\0/elsewhere\0"));
        assert!(run(true, m).is_err());
        // Path in the archive name.
        let mut m = preamble();
        m.push(BackendMessage::CopyOutResponse);
        m.push(copy_data(b'n', b"../x.tar\0\0"));
        assert!(run(true, m).is_err());
        // Ends without an end position.
        let mut m = preamble();
        m.push(BackendMessage::ReadyForQuery { status: b'I' });
        assert!(run(true, m).is_err());
        // Server error mid-copy.
        let mut m = preamble();
        m.push(BackendMessage::CopyOutResponse);
        m.push(BackendMessage::ErrorResponse(Default::default()));
        assert!(run(true, m).is_err());
        // Bad start LSN.
        let m = result_set(vec![vec![b("nope"), b("1")]]);
        assert!(run(true, m).is_err());
        // Too many CopyOuts in the old format.
        let mut m = preamble();
        for _ in 0..4 {
            m.push(BackendMessage::CopyOutResponse);
            m.push(BackendMessage::CopyDone);
        }
        assert!(run(false, m).is_err());
        // Truncated progress message.
        let mut m = preamble();
        m.push(BackendMessage::CopyOutResponse);
        m.push(copy_data(b'p', &[0, 1]));
        assert!(run(true, m).is_err());
    }
}
