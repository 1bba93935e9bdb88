//! Replication commands on a walsender connection: IDENTIFY_SYSTEM, SHOW, TIMELINE_HISTORY,
//! slots, and START_REPLICATION PHYSICAL with its CopyBoth stream ([`XLogStream`]).
//!
//! Reference: PostgreSQL docs, "Streaming Replication Protocol"; walsender.c
//! (`StartReplication`, `IdentifySystem`, `ReadReplicationSlot`).

use bytes::{Bytes, BytesMut};

use super::config::{ConnConfig, TargetSessionAttrs};
use super::conn::{parse_server_version, unexpected, Connection, RawResultSet, ResultSet};
use super::error::{Error, Result};
use super::message::{encode, BackendMessage};
use super::xlog::{decode_server_copy, PgTimestamp, ServerCopyMessage, StandbyStatusUpdate};
use crate::wal::{Lsn, TimelineId};

/// Oldest server major we support: 13 is the first with backup manifests.
pub const MIN_SERVER_VERSION_NUM: u32 = 130000;

/// Result of IDENTIFY_SYSTEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentifySystem {
    /// `pg_control`'s database system identifier; ties WAL and backups to one cluster.
    pub system_id: u64,
    pub timeline: TimelineId,
    /// Current WAL flush position (on a standby: replay position).
    pub xlogpos: Lsn,
    /// Always `None` on a physical replication connection.
    pub dbname: Option<String>,
}

/// Options for CREATE_REPLICATION_SLOT … PHYSICAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateSlotOptions {
    /// Dropped by the server when this connection ends.
    pub temporary: bool,
    /// Reserve WAL at once, so nothing after the current position is removed even before the
    /// first START_REPLICATION. pitr wants this for every slot it creates.
    pub reserve_wal: bool,
}

impl Default for CreateSlotOptions {
    fn default() -> Self {
        CreateSlotOptions {
            temporary: false,
            reserve_wal: true,
        }
    }
}

/// Result of CREATE_REPLICATION_SLOT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    pub name: String,
    /// What the server reports as `consistent_point`. For a physical slot this is the slot's
    /// `confirmed_flush`, which is always 0/0; use `restart_lsn` instead.
    pub consistent_point: Lsn,
    /// Where the slot retains WAL from, read back with READ_REPLICATION_SLOT on PostgreSQL 15+
    /// (`None` on older servers or when WAL was not reserved).
    pub restart_lsn: Option<Lsn>,
}

/// Result of READ_REPLICATION_SLOT for an existing physical slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationSlotInfo {
    pub restart_lsn: Option<Lsn>,
    pub restart_tli: Option<TimelineId>,
}

/// A message from [`XLogStream::next_message`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// WAL bytes `[wal_start, wal_start + data.len())`. Consecutive messages are contiguous
    /// (checked): the first starts at the position passed to START_REPLICATION.
    XLogData {
        wal_start: Lsn,
        wal_end: Lsn,
        server_time: PgTimestamp,
        data: Bytes,
    },
    /// PrimaryKeepalive. If `reply_requested`, call [`XLogStream::send_status_update`] soon
    /// or the server drops the connection after `wal_sender_timeout`.
    Keepalive {
        wal_end: Lsn,
        server_time: PgTimestamp,
        reply_requested: bool,
    },
    /// The requested timeline ended (the server was promoted, or we asked for a historic
    /// timeline). All WAL of the old timeline up to `next_timeline_start` has been delivered.
    /// The connection is back in command mode: call [`XLogStream::into_conn`] and START_REPLICATION
    /// again on `next_timeline` from `next_timeline_start`.
    EndOfTimeline {
        next_timeline: TimelineId,
        next_timeline_start: Lsn,
    },
}

/// A walsender connection in command mode.
#[derive(Debug)]
pub struct ReplicationConn {
    conn: Connection,
    server_version_num: u32,
}

impl ReplicationConn {
    /// Connects to the first host in `cfg.hosts` that accepts us and matches
    /// `target_session_attrs`, as libpq does.
    pub async fn connect(cfg: &ConnConfig) -> Result<ReplicationConn> {
        let passes: &[TargetSessionAttrs] = match cfg.target_session_attrs {
            // First look for a standby, then take anything.
            TargetSessionAttrs::PreferStandby => {
                &[TargetSessionAttrs::Standby, TargetSessionAttrs::Any]
            }
            _ => std::slice::from_ref(&cfg.target_session_attrs),
        };
        let mut errors = Vec::new();
        for &want in passes {
            for hp in &cfg.hosts {
                let conn = match Connection::connect(cfg, hp).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(host = %hp.host, port = hp.port, error = %e, "connection attempt failed");
                        // Wrong password or missing privileges will not get better on the
                        // next host of the same cluster, but libpq tries them all too.
                        errors.push(e);
                        continue;
                    }
                };
                let mut rc = match ReplicationConn::from_connection(conn) {
                    Ok(rc) => rc,
                    Err(e) => {
                        errors.push(e);
                        continue;
                    }
                };
                match rc.matches_session_attrs(want).await {
                    Ok(true) => return Ok(rc),
                    Ok(false) => {
                        errors.push(Error::WrongSessionAttrs {
                            host: hp.host.to_string(),
                            port: hp.port,
                            wanted: cfg.target_session_attrs.as_str(),
                        });
                        rc.close().await;
                    }
                    Err(e) => errors.push(e),
                }
            }
        }
        if errors.len() == 1 {
            Err(errors.remove(0))
        } else {
            Err(Error::AllHostsFailed { errors })
        }
    }

    fn from_connection(conn: Connection) -> Result<ReplicationConn> {
        let version = conn.parameter("server_version").unwrap_or("").to_string();
        let num = parse_server_version(&version).ok_or_else(|| {
            Error::protocol(
                "startup",
                format!("cannot parse server_version {version:?}"),
            )
        })?;
        if num < MIN_SERVER_VERSION_NUM {
            return Err(Error::UnsupportedServerVersion { version });
        }
        Ok(ReplicationConn {
            conn,
            server_version_num: num,
        })
    }

    async fn matches_session_attrs(&mut self, want: TargetSessionAttrs) -> Result<bool> {
        if want == TargetSessionAttrs::Any {
            return Ok(true);
        }
        // PostgreSQL 14+ reports in_hot_standby and default_transaction_read_only at startup.
        // On 13 we ask: SHOW works on a walsender, SQL does not. transaction_read_only is on
        // for a hot standby, so it also tells primary from standby there.
        let on = |v: &str| v == "on";
        let in_hot_standby = self.in_hot_standby().await?;
        let read_only = in_hot_standby
            || match self.conn.parameter("default_transaction_read_only") {
                Some(v) => on(v),
                None => on(&self.show("transaction_read_only").await?),
            };
        Ok(match want {
            TargetSessionAttrs::Any | TargetSessionAttrs::PreferStandby => true,
            TargetSessionAttrs::ReadWrite => !read_only,
            TargetSessionAttrs::ReadOnly => read_only,
            TargetSessionAttrs::Primary => !in_hot_standby,
            TargetSessionAttrs::Standby => in_hot_standby,
        })
    }

    /// Whether the server is a hot standby (in recovery, accepting connections).
    pub async fn in_hot_standby(&mut self) -> Result<bool> {
        // PostgreSQL 14+ reports in_hot_standby at startup (and when it changes). On 13 we ask:
        // SHOW works on a walsender, SQL does not; transaction_read_only is on for a standby.
        let v = match self.conn.parameter("in_hot_standby") {
            Some(v) => v.to_string(),
            None if self.server_version_num >= 140000 => self.show("in_hot_standby").await?,
            None => self.show("transaction_read_only").await?,
        };
        Ok(v == "on")
    }

    /// `server_version_num`, derived from the `server_version` ParameterStatus: 150018, 170000.
    pub fn server_version_num(&self) -> u32 {
        self.server_version_num
    }

    /// The major version: 13, 14, …
    pub fn server_major(&self) -> u32 {
        self.server_version_num / 10000
    }

    /// The underlying connection (server parameters, host, TLS state).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Runs a replication command (or SHOW) and returns its result sets.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<ResultSet>> {
        self.conn.simple_query(sql).await
    }

    pub async fn identify_system(&mut self) -> Result<IdentifySystem> {
        let sets = self.conn.simple_query("IDENTIFY_SYSTEM").await?;
        let row = single_row(&sets, "IDENTIFY_SYSTEM", 4)?;
        let system_id = parse_field::<u64>(row, 0, "IDENTIFY_SYSTEM systemid")?;
        let timeline = parse_field::<TimelineId>(row, 1, "IDENTIFY_SYSTEM timeline")?;
        let xlogpos = parse_field::<Lsn>(row, 2, "IDENTIFY_SYSTEM xlogpos")?;
        Ok(IdentifySystem {
            system_id,
            timeline,
            xlogpos,
            dbname: row[3].clone(),
        })
    }

    /// `SHOW name`, the setting as text with its unit ("16MB", "on").
    pub async fn show(&mut self, name: &str) -> Result<String> {
        check_identifier(name, "setting name")?;
        let sets = self.conn.simple_query(&format!("SHOW {name}")).await?;
        let row = single_row(&sets, "SHOW", 1)?;
        row[0]
            .clone()
            .ok_or_else(|| Error::protocol("SHOW", format!("{name} is NULL")))
    }

    /// `SHOW name` for a memory-unit setting, in bytes (`wal_segment_size` "16MB" → 16777216).
    pub async fn show_bytes(&mut self, name: &str) -> Result<u64> {
        let v = self.show(name).await?;
        parse_size(&v).ok_or_else(|| {
            Error::protocol("SHOW", format!("{name} = {v:?} is not a size in bytes"))
        })
    }

    /// The WAL segment size in bytes, checked to be one PostgreSQL allows.
    pub async fn wal_segment_size(&mut self) -> Result<u64> {
        let size = self.show_bytes("wal_segment_size").await?;
        if !crate::wal::is_valid_segment_size(size) {
            return Err(Error::protocol(
                "SHOW wal_segment_size",
                format!("{size} is not a valid WAL segment size"),
            ));
        }
        Ok(size)
    }

    /// TIMELINE_HISTORY: the history file of `tli` as (file name, raw content).
    pub async fn timeline_history(&mut self, tli: TimelineId) -> Result<(String, Vec<u8>)> {
        let sets = self
            .conn
            .simple_query_raw(&format!("TIMELINE_HISTORY {tli}"))
            .await?;
        let row = single_raw_row(&sets, "TIMELINE_HISTORY", 2)?;
        let name = row[0]
            .as_ref()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .ok_or_else(|| Error::protocol("TIMELINE_HISTORY", "NULL file name"))?;
        let content = row[1]
            .as_ref()
            .map(|b| b.to_vec())
            .ok_or_else(|| Error::protocol("TIMELINE_HISTORY", "NULL content"))?;
        Ok((name, content))
    }

    /// `CREATE_REPLICATION_SLOT name [TEMPORARY] PHYSICAL [RESERVE_WAL]`.
    pub async fn create_replication_slot(
        &mut self,
        name: &str,
        opts: CreateSlotOptions,
    ) -> Result<SlotInfo> {
        check_slot_name(name)?;
        let sql = create_slot_sql(name, opts, self.server_version_num);
        let sets = self.conn.simple_query(&sql).await?;
        let row = single_row(&sets, "CREATE_REPLICATION_SLOT", 2)?;
        let consistent_point =
            parse_field::<Lsn>(row, 1, "CREATE_REPLICATION_SLOT consistent_point")?;
        let restart_lsn = if self.server_version_num >= 150000 && !opts.temporary {
            self.read_replication_slot(name)
                .await?
                .and_then(|s| s.restart_lsn)
        } else {
            None
        };
        Ok(SlotInfo {
            name: row[0].clone().unwrap_or_else(|| name.to_string()),
            consistent_point,
            restart_lsn,
        })
    }

    /// `DROP_REPLICATION_SLOT name [WAIT]`. Without `wait`, an active slot is an error
    /// (SQLSTATE 55006); with it, the command waits until the slot is released.
    pub async fn drop_replication_slot(&mut self, name: &str, wait: bool) -> Result<()> {
        check_slot_name(name)?;
        let sql = if wait {
            format!("DROP_REPLICATION_SLOT {name} WAIT")
        } else {
            format!("DROP_REPLICATION_SLOT {name}")
        };
        self.conn.simple_query(&sql).await.map(drop)
    }

    /// READ_REPLICATION_SLOT (PostgreSQL 15+): `None` when the slot does not exist.
    pub async fn read_replication_slot(
        &mut self,
        name: &str,
    ) -> Result<Option<ReplicationSlotInfo>> {
        check_slot_name(name)?;
        if self.server_version_num < 150000 {
            return Err(Error::Unsupported {
                what: format!(
                    "READ_REPLICATION_SLOT needs PostgreSQL 15 or later (server is {})",
                    self.server_major()
                ),
            });
        }
        let sets = self
            .conn
            .simple_query(&format!("READ_REPLICATION_SLOT {name}"))
            .await?;
        let row = single_row(&sets, "READ_REPLICATION_SLOT", 3)?;
        // A missing slot is reported as a row of NULLs.
        if row[0].is_none() {
            return Ok(None);
        }
        let restart_lsn = match &row[1] {
            None => None,
            Some(_) => Some(parse_field::<Lsn>(
                row,
                1,
                "READ_REPLICATION_SLOT restart_lsn",
            )?),
        };
        let restart_tli = match &row[2] {
            None => None,
            Some(_) => Some(parse_field::<TimelineId>(
                row,
                2,
                "READ_REPLICATION_SLOT restart_tli",
            )?),
        };
        Ok(Some(ReplicationSlotInfo {
            restart_lsn,
            restart_tli,
        }))
    }

    /// `START_REPLICATION [SLOT slot] PHYSICAL start [TIMELINE tli]`.
    ///
    /// `start` should be the start of a WAL segment or at least of a page: the server streams
    /// from exactly there. Without `timeline` the server's current timeline is used.
    pub async fn start_replication(
        mut self,
        slot: Option<&str>,
        start: Lsn,
        timeline: Option<TimelineId>,
    ) -> Result<XLogStream> {
        let mut sql = String::from("START_REPLICATION ");
        if let Some(s) = slot {
            check_slot_name(s)?;
            sql.push_str(&format!("SLOT {s} "));
        }
        sql.push_str(&format!("PHYSICAL {start}"));
        if let Some(t) = timeline {
            sql.push_str(&format!(" TIMELINE {t}"));
        }
        tracing::debug!(%start, ?timeline, ?slot, "START_REPLICATION");
        encode::query(&sql, self.conn.wbuf())?;
        self.conn.flush().await?;
        match self.conn.read_message().await? {
            BackendMessage::CopyBothResponse => Ok(XLogStream {
                conn: self,
                state: StreamState::Streaming,
                next_lsn: start,
            }),
            // Asking for the exact end of a historic timeline skips COPY and goes straight to
            // the next-timeline result set.
            BackendMessage::RowDescription { .. } => Ok(XLogStream {
                conn: self,
                state: StreamState::Draining {
                    reply_pending: false,
                    server_done: true,
                    next: None,
                },
                next_lsn: start,
            }),
            BackendMessage::ErrorResponse(f) => {
                // Drain to ReadyForQuery so that the error is reported whole; the connection
                // is dropped with `self` anyway.
                let err = f.into_error();
                Err(err)
            }
            other => Err(unexpected("START_REPLICATION response", &other)),
        }
    }

    /// Closes the connection politely (Terminate).
    pub async fn close(self) {
        self.conn.close().await
    }

    pub(crate) fn conn_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }
}

fn create_slot_sql(name: &str, opts: CreateSlotOptions, version: u32) -> String {
    let temp = if opts.temporary { " TEMPORARY" } else { "" };
    let reserve = match (opts.reserve_wal, version >= 150000) {
        (false, _) => "",
        // PostgreSQL 15 introduced the parenthesized option list; the bare keyword is the
        // older grammar (still accepted by 15+, but deprecated).
        (true, true) => " (RESERVE_WAL)",
        (true, false) => " RESERVE_WAL",
    };
    format!("CREATE_REPLICATION_SLOT {name}{temp} PHYSICAL{reserve}")
}

/// Slot names are `[a-z0-9_]{1,63}` (ReplicationSlotValidateName). Validating here also means
/// a name can be put in a command without quoting.
fn check_slot_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() < 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::config(format!(
            "invalid replication slot name {name:?}: use 1-63 lower-case letters, digits and underscores"
        )))
    }
}

fn check_identifier(name: &str, what: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Error::config(format!("invalid {what} {name:?}")))
    }
}

/// The first row of the first non-empty result set, with at least `min_cols` columns.
fn first_row<'a, T>(
    mut row_sets: impl Iterator<Item = &'a [Vec<Option<T>>]>,
    cmd: &'static str,
    min_cols: usize,
) -> Result<&'a [Option<T>]> {
    let row = row_sets
        .find_map(|rows| rows.first())
        .ok_or_else(|| Error::protocol(cmd, "no row in the result"))?;
    if row.len() < min_cols {
        return Err(Error::protocol(
            cmd,
            format!("expected {min_cols} columns, got {}", row.len()),
        ));
    }
    Ok(row)
}

fn single_row<'a>(
    sets: &'a [ResultSet],
    cmd: &'static str,
    min_cols: usize,
) -> Result<&'a [Option<String>]> {
    first_row(sets.iter().map(|s| s.rows.as_slice()), cmd, min_cols)
}

fn single_raw_row<'a>(
    sets: &'a [RawResultSet],
    cmd: &'static str,
    min_cols: usize,
) -> Result<&'a [Option<Bytes>]> {
    first_row(sets.iter().map(|s| s.rows.as_slice()), cmd, min_cols)
}

fn parse_field<T: std::str::FromStr>(
    row: &[Option<String>],
    i: usize,
    what: &'static str,
) -> Result<T> {
    let v = row
        .get(i)
        .and_then(|v| v.as_deref())
        .ok_or_else(|| Error::protocol(what, "missing or NULL"))?;
    v.trim()
        .parse()
        .map_err(|_| Error::protocol(what, format!("cannot parse {v:?}")))
}

/// Parses a PostgreSQL memory setting as shown by SHOW: "16MB", "8kB", "1GB", "512" (bytes).
/// Units are PostgreSQL's, powers of 1024, case-sensitive.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(digits_end);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "kB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        "TB" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

enum StreamState {
    /// Inside CopyBoth.
    Streaming,
    /// Leaving CopyBoth. `reply_pending`: our CopyDone is still to be queued. `server_done`: the
    /// server's CopyDone has arrived (until then, WAL it had in flight may still come).
    Draining {
        reply_pending: bool,
        server_done: bool,
        next: Option<(TimelineId, Lsn)>,
    },
    /// Back in command mode (ReadyForQuery seen).
    Ended,
    /// The server closed the connection after ending the stream (walsender exits this way when
    /// the server shuts down).
    Closed,
    /// An error was returned; the connection is unusable.
    Failed,
}

/// The CopyBoth stream of START_REPLICATION.
pub struct XLogStream {
    conn: ReplicationConn,
    state: StreamState,
    /// Where the next XLogData must start: WAL must arrive without gaps or overlaps.
    next_lsn: Lsn,
}

impl std::fmt::Debug for XLogStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XLogStream")
            .field("next_lsn", &format_args!("{}", self.next_lsn))
            .finish_non_exhaustive()
    }
}

impl XLogStream {
    /// The position right after the last WAL byte received.
    pub fn received_lsn(&self) -> Lsn {
        self.next_lsn
    }

    /// The next message, or `None` once the server has ended the stream without a timeline
    /// switch (server shutdown, or after [`XLogStream::finish`]).
    ///
    /// **Cancellation-safe**: it can be used in `tokio::select!` against timers and a shutdown
    /// token. Every await is a buffered read or flush that keeps partial bytes in the
    /// connection, and the stream's state changes only between awaits, so a dropped call loses
    /// no message and a later call resumes exactly where it stopped.
    pub async fn next_message(&mut self) -> Result<Option<ReplicationMessage>> {
        let result = self.next_message_inner().await;
        if result.is_err() {
            self.state = StreamState::Failed;
        }
        result
    }

    async fn next_message_inner(&mut self) -> Result<Option<ReplicationMessage>> {
        loop {
            match &mut self.state {
                StreamState::Streaming => {
                    // Finish any status update whose flush was cancelled.
                    if !self.conn.conn.wbuf().is_empty() {
                        self.conn.conn.flush().await?;
                    }
                    match self.conn.conn.read_message().await? {
                        BackendMessage::CopyData(payload) => {
                            return self.on_copy_data(payload).map(Some);
                        }
                        BackendMessage::CopyDone => {
                            self.state = StreamState::Draining {
                                reply_pending: true,
                                server_done: true,
                                next: None,
                            };
                        }
                        // A walsender that shuts down once its client has confirmed all WAL
                        // sends CommandComplete without CopyDone, then exits (WalSndDone in
                        // walsender.c): the stream ended, and the connection closes next.
                        BackendMessage::CommandComplete { .. } => {
                            self.state = StreamState::Draining {
                                reply_pending: false,
                                server_done: true,
                                next: None,
                            };
                        }
                        BackendMessage::ErrorResponse(f) => return Err(f.into_error()),
                        other => return Err(unexpected("START_REPLICATION stream", &other)),
                    }
                }
                StreamState::Draining {
                    reply_pending,
                    server_done,
                    ..
                } => {
                    if *reply_pending {
                        encode::copy_done(self.conn.conn.wbuf());
                        *reply_pending = false;
                    }
                    self.conn.conn.flush().await?;
                    let msg = match self.conn.conn.read_message().await {
                        Ok(m) => m,
                        Err(Error::Closed { .. }) if *server_done => {
                            self.state = StreamState::Closed;
                            return Ok(None);
                        }
                        Err(e) => return Err(e),
                    };
                    // Re-borrow: the state is unchanged across the awaits above.
                    let StreamState::Draining {
                        server_done, next, ..
                    } = &mut self.state
                    else {
                        return Err(Error::protocol(
                            "XLogStream",
                            "state changed while draining",
                        ));
                    };
                    match msg {
                        BackendMessage::CopyData(payload) if !*server_done => {
                            // WAL sent before the server saw our CopyDone. It is valid, but the
                            // caller asked to stop; it will be streamed again next time.
                            tracing::trace!(
                                bytes = payload.len(),
                                "discarding CopyData after CopyDone"
                            );
                        }
                        BackendMessage::CopyDone if !*server_done => *server_done = true,
                        BackendMessage::RowDescription { .. } => {}
                        BackendMessage::DataRow { values } => {
                            *next = Some(parse_next_timeline(&values)?);
                        }
                        BackendMessage::CommandComplete { .. } => {}
                        BackendMessage::ReadyForQuery { .. } => {
                            let next = *next;
                            self.state = StreamState::Ended;
                            return Ok(next.map(|(tli, lsn)| ReplicationMessage::EndOfTimeline {
                                next_timeline: tli,
                                next_timeline_start: lsn,
                            }));
                        }
                        BackendMessage::ErrorResponse(f) => return Err(f.into_error()),
                        other => return Err(unexpected("end of START_REPLICATION", &other)),
                    }
                }
                StreamState::Ended | StreamState::Closed => return Ok(None),
                StreamState::Failed => {
                    return Err(Error::protocol("XLogStream", "stream used after an error"))
                }
            }
        }
    }

    fn on_copy_data(&mut self, payload: Bytes) -> Result<ReplicationMessage> {
        match decode_server_copy(payload)? {
            ServerCopyMessage::XLogData {
                wal_start,
                wal_end,
                server_time,
                data,
            } => {
                if wal_start != self.next_lsn {
                    return Err(Error::protocol(
                        "XLogData",
                        format!(
                            "WAL not contiguous: expected data at {}, got {wal_start}",
                            self.next_lsn
                        ),
                    ));
                }
                // decode_server_copy checked that this cannot overflow.
                self.next_lsn = Lsn(wal_start.0 + data.len() as u64);
                Ok(ReplicationMessage::XLogData {
                    wal_start,
                    wal_end,
                    server_time,
                    data,
                })
            }
            ServerCopyMessage::Keepalive {
                wal_end,
                server_time,
                reply_requested,
            } => Ok(ReplicationMessage::Keepalive {
                wal_end,
                server_time,
                reply_requested,
            }),
        }
    }

    /// Sends a StandbyStatusUpdate. `flush` must be what is durably stored: the server uses it
    /// to advance the slot and may then remove older WAL. Only allowed while streaming.
    ///
    /// Cancellation-safe in the sense that the message is queued before the first await: if
    /// the flush is dropped, the rest is written by the next call or `next_message`.
    pub async fn send_status_update(
        &mut self,
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        reply_requested: bool,
    ) -> Result<()> {
        if !matches!(self.state, StreamState::Streaming) {
            return Err(Error::protocol(
                "StandbyStatusUpdate",
                "the stream is not in COPY mode any more",
            ));
        }
        let mut payload = BytesMut::with_capacity(StandbyStatusUpdate::LEN);
        StandbyStatusUpdate {
            write,
            flush,
            apply,
            client_time: PgTimestamp::now(),
            reply_requested,
        }
        .encode(&mut payload);
        encode::copy_data(&payload, self.conn.conn.wbuf())?;
        self.conn.conn.flush().await
    }

    /// Ends streaming: sends CopyDone and reads until the server is back in command mode,
    /// discarding WAL still in flight. Returns the next timeline if the server reported one.
    pub async fn finish(&mut self) -> Result<Option<(TimelineId, Lsn)>> {
        if let StreamState::Streaming = self.state {
            self.state = StreamState::Draining {
                reply_pending: true,
                server_done: false,
                next: None,
            };
        }
        loop {
            match self.next_message().await? {
                None => return Ok(None),
                Some(ReplicationMessage::EndOfTimeline {
                    next_timeline,
                    next_timeline_start,
                }) => return Ok(Some((next_timeline, next_timeline_start))),
                Some(_) => {}
            }
        }
    }

    /// The connection, back in command mode after EndOfTimeline, `None` from `next_message`
    /// or [`XLogStream::finish`]. Fails if the stream is still in COPY mode, the server closed
    /// the connection, or an error occurred.
    pub fn into_conn(self) -> Result<ReplicationConn> {
        match self.state {
            StreamState::Ended => Ok(self.conn),
            StreamState::Closed => Err(Error::Closed {
                context: "after the end of START_REPLICATION",
            }),
            _ => Err(Error::protocol(
                "XLogStream::into_conn",
                "the stream has not ended; call finish() first",
            )),
        }
    }
}

/// The next-timeline row after a historic timeline ends: (next_tli int8, next_tli_startpos text).
fn parse_next_timeline(values: &[Option<Bytes>]) -> Result<(TimelineId, Lsn)> {
    let text = |i: usize| -> Result<String> {
        values
            .get(i)
            .and_then(|v| v.as_ref())
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .ok_or_else(|| Error::protocol("end-of-timeline result", "missing column"))
    };
    let tli = text(0)?;
    let lsn = text(1)?;
    let tli: TimelineId = tli
        .trim()
        .parse()
        .map_err(|_| Error::protocol("end-of-timeline result", format!("bad timeline {tli:?}")))?;
    let lsn: Lsn = lsn
        .trim()
        .parse()
        .map_err(|_| Error::protocol("end-of-timeline result", format!("bad LSN {lsn:?}")))?;
    Ok((tli, lsn))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16MB"), Some(16 << 20));
        assert_eq!(parse_size("8kB"), Some(8192));
        assert_eq!(parse_size("1GB"), Some(1 << 30));
        assert_eq!(parse_size("2TB"), Some(2 << 40));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("512B"), Some(512));
        for bad in [
            "",
            "MB",
            "16mb",
            "16 XB",
            "-1MB",
            "99999999999999999999TB",
            "1.5GB",
        ] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }

    #[test]
    fn slot_names() {
        for ok in ["pitr", "pitr_slot_1", &"a".repeat(63)] {
            assert!(check_slot_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Pitr", "a-b", "a b", "x;DROP", &"a".repeat(64)] {
            assert!(check_slot_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn create_slot_syntax_by_version() {
        let o = CreateSlotOptions::default();
        assert_eq!(
            create_slot_sql("s", o, 150000),
            "CREATE_REPLICATION_SLOT s PHYSICAL (RESERVE_WAL)"
        );
        assert_eq!(
            create_slot_sql("s", o, 140010),
            "CREATE_REPLICATION_SLOT s PHYSICAL RESERVE_WAL"
        );
        let t = CreateSlotOptions {
            temporary: true,
            reserve_wal: false,
        };
        assert_eq!(
            create_slot_sql("s", t, 170000),
            "CREATE_REPLICATION_SLOT s TEMPORARY PHYSICAL"
        );
    }

    #[test]
    fn next_timeline_row() {
        let row = vec![
            Some(Bytes::from_static(b"2")),
            Some(Bytes::from_static(b"0/3000158")),
        ];
        assert_eq!(parse_next_timeline(&row).expect("ok"), (2, Lsn(0x3000158)));
        assert!(parse_next_timeline(&[None, None]).is_err());
        assert!(
            parse_next_timeline(&[Some(Bytes::from_static(b"x")), Some(Bytes::new())]).is_err()
        );
    }
}
