//! Restoring an incremental backup: every file reconstructed from the chain (the backup, its
//! parent, ..., the full backup at the root) in one streaming pass, newest member first.
//!
//! An incremental backup's archives hold each file either whole or as `INCREMENTAL.<name>` in
//! PostgreSQL's format (a header with the truncation length and the numbers of the blocks it
//! carries, padded to a block, then those blocks; see pg_combinebackup's reconstruct.c). The
//! newest member's archives are written as in a full restore, except that an incremental entry
//! creates its file at the final length and writes the blocks it carries; the blocks below its
//! truncation length that it does not carry are remembered in a bitmap per file (16 KiB for a
//! 1 GiB segment, nothing for a complete file). Each older member is then streamed in turn and
//! fills only the blocks still needed, from its own incremental entries or from a whole file,
//! which ends the search for that file: blocks no member has stay zero, as pg_combinebackup
//! leaves them. Members whose blocks are no longer needed are not even fetched. Nothing is
//! staged: blocks go straight to their place in the target files with positioned writes.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::error::RestoreError;
use super::writer::{
    io_at, mismatch_error, restore_archive, safe_join, tablespace_dir, Extraction, FileWriter,
};
use crate::format::archive_check::{ArchiveSink, FileSum, ManifestCheck, Mismatch, Outcome};
use crate::format::incremental::{
    target_name, IncrementalError, IncrementalHeader as Header, BLCKSZ,
};
use crate::format::tar::{EntryKind, TarHeader};
use crate::repo::{BackupInfo, Repository};

/// PostgreSQL's block size, which incremental files are made of.
const BLOCK: u64 = BLCKSZ as u64;

/// The blocks of one file still to be found in older members: bit `b` set = block `b` needed.
#[derive(Debug)]
struct Pending {
    path: PathBuf,
    /// Delta restore into a file that was already there: blocks are compared before written.
    compare: bool,
    needed: Vec<u64>,
    /// The newest member's truncation length: older members supply only blocks below it.
    limit: u32,
    left: u32,
}

impl Pending {
    fn new(path: PathBuf, header: &Header, compare: bool) -> Pending {
        let limit = header.truncation_block_length;
        let mut needed = vec![u64::MAX; (limit as usize).div_ceil(64)];
        if limit % 64 != 0 {
            *needed.last_mut().expect("limit > 0") = (1u64 << (limit % 64)) - 1;
        }
        let mut p = Pending {
            path,
            compare,
            needed,
            limit,
            left: limit,
        };
        for &b in &header.blocks {
            p.take(b);
        }
        p
    }

    fn wants(&self, b: u32) -> bool {
        b < self.limit && self.needed[(b / 64) as usize] & (1 << (b % 64)) != 0
    }

    fn take(&mut self, b: u32) {
        if self.wants(b) {
            self.needed[(b / 64) as usize] &= !(1 << (b % 64));
            self.left -= 1;
        }
    }

    /// The blocks still needed, in order.
    fn still_needed(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.limit).filter(|&b| self.wants(b))
    }
}

/// Writes `data` at `at`; with `compare`, only when the file does not hold it already (a delta
/// restore). Returns whether it wrote.
fn put(
    file: &File,
    path: &Path,
    data: &[u8],
    at: u64,
    compare: bool,
    scratch: &mut Vec<u8>,
) -> Result<bool, RestoreError> {
    if compare {
        scratch.resize(data.len(), 0);
        // Past the end (the file grew) reads short: then it is written.
        if file.read_exact_at(scratch, at).is_ok() && scratch[..] == *data {
            return Ok(false);
        }
    }
    file.write_all_at(data, at).map_err(io_at(path))?;
    Ok(true)
}

/// The entry being read.
enum Current {
    None,
    /// The newest member's directories, links and whole files: the file writer's.
    Inner,
    Incremental(Incremental),
    /// A whole file in an older member: the last source of the blocks still needed.
    Whole {
        key: String,
        file: File,
        pos: u64,
    },
}

struct Incremental {
    key: String,
    path: PathBuf,
    head: Vec<u8>,
    header: Option<Header>,
    file: Option<File>,
    /// Bytes of block contents read so far.
    pos: u64,
    /// Delta restore into a file that was already there: blocks are compared before written.
    compare: bool,
}

/// Writes the archives of every member of a chain; see the module docs.
pub(super) struct ChainWriter {
    pub inner: FileWriter,
    /// 0 while the newest member is read.
    member: usize,
    /// Prefix of the current archive's members in the manifest (`pg_tblspc/<oid>/`).
    prefix: String,
    /// Files still missing blocks, by manifest path.
    pending: HashMap<String, Pending>,
    /// Every file reconstructed from incremental entries: path and manifest path, for the
    /// final check.
    pub rebuilt: Vec<(PathBuf, String)>,
    current: Current,
    /// A delta restore's buffer for the bytes already on disk.
    scratch: Vec<u8>,
    /// Bytes of the newest member's incremental entries (the report counts final sizes).
    pub incremental_bytes: u64,
}

impl ChainWriter {
    pub fn new(inner: FileWriter) -> ChainWriter {
        ChainWriter {
            inner,
            member: 0,
            prefix: String::new(),
            pending: HashMap::new(),
            rebuilt: vec![],
            current: Current::None,
            scratch: vec![],
            incremental_bytes: 0,
        }
    }

    /// The next archive: of member `member` (0 = newest), written under `root`.
    pub fn set_archive(&mut self, member: usize, root: PathBuf, tablespace_oid: Option<u32>) {
        self.member = member;
        self.inner.root = root;
        self.prefix = tablespace_oid
            .map(|oid| format!("pg_tblspc/{oid}/"))
            .unwrap_or_default();
    }

    /// Whether any file of the archive of `tablespace_oid` still needs blocks.
    pub fn needs(&self, tablespace_oid: Option<u32>) -> bool {
        self.pending.keys().any(|k| match tablespace_oid {
            Some(oid) => k.starts_with(&format!("pg_tblspc/{oid}/")),
            None => !k.starts_with("pg_tblspc/"),
        })
    }

    pub fn is_complete(&self) -> bool {
        self.pending.is_empty()
    }

    /// After the chain's root: every block must have been found.
    pub fn finish(&self) -> Result<(), RestoreError> {
        match self.pending.iter().min_by_key(|(k, _)| *k) {
            None => Ok(()),
            Some((key, p)) => Err(RestoreError::ChainIncomplete {
                path: key.clone(),
                blocks: p.left,
                files: self.pending.len(),
            }),
        }
    }

    fn start_incremental(&mut self, rel: String) -> Result<(), RestoreError> {
        let path = safe_join(&self.inner.root, &rel)?;
        let key = format!("{}{rel}", self.prefix);
        let mut compare = false;
        if self.member == 0 {
            // A delta restore reconstructs into the file already there, block by block.
            if let Some(d) = &mut self.inner.delta {
                d.see(&path, false);
                compare = fs::symlink_metadata(&path).is_ok_and(|m| m.is_file());
                if !compare {
                    d.clear(&path, false)?;
                }
            }
        } else if let Some(p) = self.pending.get(&key) {
            compare = p.compare;
        } else {
            return Ok(()); // complete already
        }
        self.current = Current::Incremental(Incremental {
            key,
            path,
            head: vec![],
            header: None,
            file: None,
            pos: 0,
            compare,
        });
        Ok(())
    }

    fn start_whole(&mut self, rel: &str) -> Result<(), RestoreError> {
        let key = format!("{}{rel}", self.prefix);
        let Some(p) = self.pending.get(&key) else {
            return Ok(());
        };
        let file = open_for_blocks(&p.path)?;
        self.current = Current::Whole { key, file, pos: 0 };
        Ok(())
    }
}

/// Opens a file being reconstructed; readable too, for a delta restore's comparisons.
fn open_for_blocks(path: &Path) -> Result<File, RestoreError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_at(path))
}

/// Creates the newest member's version of a reconstructed file at its final length (sparse:
/// blocks no member supplies read as zeros).
fn create_rebuilt(path: &Path, header: &Header) -> Result<File, RestoreError> {
    if let Some(parent) = path.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(io_at(parent))?;
    }
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_at(path))?;
    file.set_len(u64::from(header.reconstructed_blocks()) * BLOCK)
        .map_err(io_at(path))?;
    Ok(file)
}

fn bad(path: &Path, reason: impl Into<String>) -> RestoreError {
    RestoreError::BadIncremental {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl ChainWriter {
    /// Collects the header; returns what follows it in `d`, or `None` while it is incomplete.
    fn header<'d>(
        inc: &mut Incremental,
        mut d: &'d [u8],
    ) -> Result<Option<&'d [u8]>, RestoreError> {
        let bad_header = |e: IncrementalError| bad(&inc.path, e.to_string());
        loop {
            if let Some((header, _)) = Header::parse(&inc.head).map_err(bad_header)? {
                inc.header = Some(header);
                return Ok(Some(d));
            }
            let need = Header::needed(&inc.head).map_err(bad_header)?;
            let take = (need - inc.head.len()).min(d.len());
            inc.head.extend_from_slice(&d[..take]);
            d = &d[take..];
            if inc.head.len() < need {
                return Ok(None);
            }
        }
    }

    /// The header is complete: the newest member creates the file, an older one opens it.
    fn begin_blocks(&mut self) -> Result<(), RestoreError> {
        let Current::Incremental(inc) = &mut self.current else {
            return Ok(());
        };
        let header = inc.header.as_ref().expect("header parsed");
        if self.member == 0 {
            let file = if inc.compare {
                let file = open_for_blocks(&inc.path)?;
                let len = u64::from(header.reconstructed_blocks()) * BLOCK;
                file.set_len(len).map_err(io_at(&inc.path))?;
                // Blocks past the truncation length that the newest member does not carry
                // are zeros (pg_combinebackup's), whatever the old file held there.
                let zero = vec![0u8; BLOCK as usize];
                for b in header.truncation_block_length..header.reconstructed_blocks() {
                    if !header.blocks.contains(&b) {
                        let at = u64::from(b) * BLOCK;
                        if put(&file, &inc.path, &zero, at, true, &mut self.scratch)? {
                            self.inner.written_bytes += BLOCK;
                        }
                    }
                }
                file
            } else {
                create_rebuilt(&inc.path, header)?
            };
            inc.file = Some(file);
            self.inner.written_files += 1;
            self.rebuilt.push((inc.path.clone(), inc.key.clone()));
            let p = Pending::new(inc.path.clone(), header, inc.compare);
            if p.left > 0 {
                self.pending.insert(inc.key.clone(), p);
            }
        } else {
            inc.file = Some(open_for_blocks(&inc.path)?);
        }
        Ok(())
    }

    fn incremental_data(&mut self, d: &[u8]) -> Result<(), RestoreError> {
        let Current::Incremental(inc) = &mut self.current else {
            return Ok(());
        };
        let mut d = d;
        if inc.header.is_none() {
            match Self::header(inc, d)? {
                Some(rest) => d = rest,
                None => return Ok(()),
            }
            self.begin_blocks()?;
        }
        let Current::Incremental(inc) = &mut self.current else {
            return Ok(());
        };
        let header = inc.header.as_ref().expect("header parsed");
        let file = inc.file.as_ref().expect("file opened");
        let mut pending = self.pending.get_mut(&inc.key);
        while !d.is_empty() {
            let (i, within) = ((inc.pos / BLOCK) as usize, inc.pos % BLOCK);
            let Some(&b) = header.blocks.get(i) else {
                return Err(bad(&inc.path, "more data than its header announces"));
            };
            let take = ((BLOCK - within) as usize).min(d.len());
            // The newest member's blocks are all written; older ones only fill what is needed.
            let want = self.member == 0 || pending.as_ref().is_some_and(|p| p.wants(b));
            if want {
                let at = u64::from(b) * BLOCK + within;
                if put(
                    file,
                    &inc.path,
                    &d[..take],
                    at,
                    inc.compare,
                    &mut self.scratch,
                )? {
                    self.inner.written_bytes += take as u64;
                }
                if within + take as u64 == BLOCK && self.member > 0 {
                    if let Some(p) = pending.as_mut() {
                        p.take(b);
                    }
                }
            }
            inc.pos += take as u64;
            d = &d[take..];
        }
        Ok(())
    }

    fn whole_data(&mut self, d: &[u8]) -> Result<(), RestoreError> {
        let Current::Whole { key, file, pos } = &mut self.current else {
            return Ok(());
        };
        let Some(p) = self.pending.get_mut(key.as_str()) else {
            return Ok(());
        };
        let mut d = d;
        while !d.is_empty() {
            let (b, within) = ((*pos / BLOCK) as u32, *pos % BLOCK);
            let take = ((BLOCK - within) as usize).min(d.len());
            if p.wants(b) {
                if put(
                    file,
                    &p.path,
                    &d[..take],
                    *pos,
                    p.compare,
                    &mut self.scratch,
                )? {
                    self.inner.written_bytes += take as u64;
                }
                if within + take as u64 == BLOCK {
                    p.take(b);
                }
            }
            *pos += take as u64;
            d = &d[take..];
        }
        Ok(())
    }

    /// Blocks no member supplied read as zeros in a new (sparse) file; a delta restore's old
    /// file may hold anything there. `len` is what the whole file had.
    fn zero_rest(&mut self, file: &File, p: &Pending, len: u64) -> Result<(), RestoreError> {
        if !p.compare {
            return Ok(());
        }
        let zero = vec![0u8; BLOCK as usize];
        for b in p.still_needed() {
            let at = u64::from(b) * BLOCK;
            // The part of a block the whole file did have was written already.
            let from = len.saturating_sub(at).min(BLOCK) as usize;
            if put(
                file,
                &p.path,
                &zero[from..],
                at + from as u64,
                true,
                &mut self.scratch,
            )? {
                self.inner.written_bytes += (BLOCK as usize - from) as u64;
            }
        }
        Ok(())
    }

    fn end_incremental(&mut self, inc: Incremental) -> Result<(), RestoreError> {
        let Some(header) = &inc.header else {
            return Err(bad(&inc.path, "ends inside its header"));
        };
        if inc.pos != header.blocks.len() as u64 * BLOCK {
            return Err(bad(&inc.path, "ends before its last block"));
        }
        if self.member > 0 && self.pending.get(&inc.key).is_some_and(|p| p.left == 0) {
            self.pending.remove(&inc.key);
        }
        if let Some(file) = inc.file {
            self.inner.syncer.done(file, inc.path);
        }
        Ok(())
    }
}

impl ArchiveSink for ChainWriter {
    type Error = RestoreError;

    fn entry(&mut self, h: &TarHeader) -> Result<(), RestoreError> {
        self.current = Current::None;
        if h.kind == EntryKind::File {
            if let Some(rel) = target_name(&h.path) {
                if self.member == 0 {
                    self.incremental_bytes += h.size;
                }
                return self.start_incremental(rel);
            }
        }
        if self.member == 0 {
            self.current = Current::Inner;
            return self.inner.entry(h);
        }
        if h.kind == EntryKind::File {
            return self.start_whole(&h.path);
        }
        Ok(())
    }

    fn data(&mut self, d: &[u8]) -> Result<(), RestoreError> {
        match &self.current {
            Current::None => Ok(()),
            Current::Inner => self.inner.data(d),
            Current::Incremental(_) => self.incremental_data(d),
            Current::Whole { .. } => self.whole_data(d),
        }
    }

    fn file_end(&mut self, f: &FileSum, verdict: Result<(), Mismatch>) -> Result<(), RestoreError> {
        match std::mem::replace(&mut self.current, Current::None) {
            Current::None => Ok(()),
            Current::Inner => self.inner.file_end(f, verdict),
            Current::Incremental(inc) => {
                // The server's manifest of an incremental backup lists its INCREMENTAL files.
                verdict.map_err(mismatch_error)?;
                self.end_incremental(inc)
            }
            Current::Whole { key, file, pos } => {
                // A whole file ends the search: what it lacks is zero.
                if let Some(p) = self.pending.remove(&key) {
                    self.zero_rest(&file, &p, pos)?;
                    self.inner.syncer.done(file, p.path);
                }
                Ok(())
            }
        }
    }
}

/// Reads every member of `chain` (newest first) into place; returns the newest member's check,
/// where each tablespace went, the file writer, and the files reconstructed.
pub(super) async fn restore_chain(
    repo: &Repository,
    chain: &[BackupInfo],
    ex: Extraction,
) -> Result<ChainOutcome, RestoreError> {
    let pgdata = ex.writer.root.clone();
    let mut ex = Extraction {
        check: ex.check,
        writer: ChainWriter::new(ex.writer),
        buffers: ex.buffers,
    };
    let newest = &chain[0];
    let mut roots: HashMap<&str, PathBuf> = HashMap::new();
    let mut relocated = vec![];
    for archive in &newest.archives {
        let root = match archive.tablespace_oid {
            None => pgdata.clone(),
            Some(oid) => {
                let delta = ex.writer.inner.delta.is_some();
                let dir = tablespace_dir(archive, oid, &ex.writer.inner.links, delta)?;
                relocated.push((oid, dir.clone()));
                dir
            }
        };
        roots.insert(&archive.name, root.clone());
        ex.writer.set_archive(0, root, archive.tablespace_oid);
        ex = restore_archive(repo, &newest.id, archive, ex).await?;
    }
    // Older members' entries are checked by the final check of the files they complete.
    let outcome = std::mem::replace(&mut ex.check, ManifestCheck::new(None)).finish();
    for (m, member) in chain.iter().enumerate().skip(1) {
        if ex.writer.is_complete() {
            tracing::info!(
                skipped = chain.len() - m,
                "no older member of the chain is needed"
            );
            break;
        }
        for archive in &member.archives {
            let Some(root) = roots.get(archive.name.as_str()) else {
                continue;
            };
            if !ex.writer.needs(archive.tablespace_oid) {
                continue;
            }
            ex.writer
                .set_archive(m, root.clone(), archive.tablespace_oid);
            ex = restore_archive(repo, &member.id, archive, ex).await?;
        }
        tracing::info!(member = %member.id, "filled blocks from an older member of the chain");
    }
    ex.writer.finish()?;
    let mut outcome = outcome;
    outcome.bytes -= ex.writer.incremental_bytes;
    Ok(ChainOutcome {
        outcome,
        relocated,
        rebuilt: std::mem::take(&mut ex.writer.rebuilt),
        writer: ex.writer.inner,
    })
}

pub(super) struct ChainOutcome {
    /// The newest member's archives against its manifest; `bytes` counts reconstructed
    /// files at their final size.
    pub outcome: Outcome,
    pub relocated: Vec<(u32, PathBuf)>,
    pub writer: FileWriter,
    pub rebuilt: Vec<(PathBuf, String)>,
}

/// PostgreSQL refuses to start on the `backup_label` of a server-side incremental backup ("this
/// is an incremental backup, not a data directory"): like pg_combinebackup, drop its
/// `INCREMENTAL FROM LSN` and `INCREMENTAL FROM TLI` lines once the files are reconstructed.
pub(super) fn finish_backup_label(pgdata: &Path) -> Result<(), RestoreError> {
    let path = pgdata.join("backup_label");
    let label = match fs::read(&path) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_at(&path)(e)),
    };
    let kept: Vec<u8> = label
        .split_inclusive(|&b| b == b'\n')
        .filter(|line| {
            !line.starts_with(b"INCREMENTAL FROM LSN: ")
                && !line.starts_with(b"INCREMENTAL FROM TLI: ")
        })
        .flatten()
        .copied()
        .collect();
    if kept.len() != label.len() {
        fs::write(&path, kept).map_err(io_at(&path))?;
    }
    Ok(())
}

/// Refuses the restore, before anything is written, when a member of the chain has lost an
/// object or is being expired. The members are listed all at once (one round trip, not one
/// per member); the first broken one in chain order is named.
pub(super) async fn check_members(
    repo: &Repository,
    chain: &[BackupInfo],
) -> Result<(), RestoreError> {
    let problems =
        futures::future::try_join_all(chain.iter().map(|m| repo.backup_objects_problem(m))).await?;
    match chain.iter().zip(problems).find_map(|(m, p)| Some((m, p?))) {
        Some((member, problem)) => Err(RestoreError::ChainBroken {
            backup: chain[0].id.clone(),
            member: member.id.clone(),
            problem,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::super::durable::Syncer;
    use super::*;
    use crate::format::archive_check::{ArchiveReader, FeedError};
    use crate::format::tar::build::{file, header, END};

    fn block(tag: u8) -> Vec<u8> {
        vec![tag; BLOCK as usize]
    }

    fn blocks(tags: &[u8]) -> Vec<u8> {
        tags.iter().flat_map(|&t| block(t)).collect()
    }

    fn incremental(path: &str, truncation: u32, carried: &[(u32, u8)]) -> Vec<u8> {
        let h = Header {
            truncation_block_length: truncation,
            blocks: carried.iter().map(|&(b, _)| b).collect(),
        };
        let tags: Vec<u8> = carried.iter().map(|&(_, t)| t).collect();
        file(path, &encode(&h, &blocks(&tags)))
    }

    fn encode(h: &Header, contents: &[u8]) -> Vec<u8> {
        let mut out = vec![];
        h.write_header(&mut out).unwrap();
        out.extend_from_slice(contents);
        out
    }

    fn archive(entries: &[Vec<u8>]) -> Vec<u8> {
        let mut a = header("base", b'5', 0).to_vec();
        a.extend_from_slice(&header("base/1", b'5', 0));
        for e in entries {
            a.extend_from_slice(e);
        }
        a.extend_from_slice(&END);
        a
    }

    /// Feeds `archive` in awkward pieces, as parts arrive.
    fn feed(w: &mut ChainWriter, archive: &[u8]) -> Result<(), RestoreError> {
        let mut check = ManifestCheck::new(None);
        let mut reader = ArchiveReader::new(None);
        for piece in archive.chunks(3000) {
            reader.feed(piece, &mut check, w).map_err(|e| match e {
                FeedError::Tar(t) => panic!("{t}"),
                FeedError::Sink(e) => e,
            })?;
        }
        reader.finish().unwrap();
        Ok(())
    }

    #[test]
    fn reconstructs_files_from_a_chain_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let syncer = Syncer::start();
        let mut w = ChainWriter::new(FileWriter::new(
            root.clone(),
            HashMap::new(),
            syncer.handle(),
            None,
        ));
        // Newest: 100 keeps 3 blocks of which it carries 2, and grows to 6; 200 is unchanged.
        let newest = archive(&[
            file("PG_VERSION", b"17\n"),
            incremental("base/1/INCREMENTAL.100", 3, &[(2, b'C'), (5, b'D')]),
            incremental("base/1/INCREMENTAL.200", 3, &[]),
        ]);
        // Middle: 100 changed block 1 (and block 0 of an earlier version, superseded by none);
        // 200 was rewritten whole.
        let middle = archive(&[
            incremental("base/1/INCREMENTAL.100", 4, &[(1, b'B')]),
            file("base/1/200", &blocks(b"QRS")),
            file("base/1/300", &blocks(b"Z")),
        ]);
        let full = archive(&[
            file("base/1/100", &blocks(b"AAAA")),
            file("base/1/200", &blocks(b"PP")),
        ]);
        w.set_archive(0, root.clone(), None);
        feed(&mut w, &newest).unwrap();
        assert!(w.needs(None));
        w.set_archive(1, root.clone(), None);
        feed(&mut w, &middle).unwrap();
        assert!(
            !w.is_complete(),
            "block 0 of 100 is only in the full backup"
        );
        w.set_archive(2, root.clone(), None);
        feed(&mut w, &full).unwrap();
        w.finish().unwrap();

        let mut want = blocks(b"ABC");
        want.extend(vec![0u8; 2 * BLOCK as usize]);
        want.extend(block(b'D'));
        assert_eq!(fs::read(root.join("base/1/100")).unwrap(), want);
        assert_eq!(fs::read(root.join("base/1/200")).unwrap(), blocks(b"QRS"));
        assert_eq!(fs::read(root.join("PG_VERSION")).unwrap(), b"17\n");
        assert!(
            !root.join("base/1/300").exists(),
            "not in the newest member"
        );
        assert!(!root.join("base/1/INCREMENTAL.100").exists());
        assert_eq!(w.rebuilt.len(), 2);
        drop(w); // its sync handle
        syncer.finish(&[root]).unwrap();
    }

    #[test]
    fn the_backup_label_loses_its_incremental_lines() {
        let dir = tempfile::tempdir().unwrap();
        let label = "START WAL LOCATION: 0/4000028 (file 000000010000000000000004)\n\
                     CHECKPOINT LOCATION: 0/4000080\n\
                     INCREMENTAL FROM LSN: 0/2000028\n\
                     INCREMENTAL FROM TLI: 1\n\
                     START TIMELINE: 1\n";
        fs::write(dir.path().join("backup_label"), label).unwrap();
        finish_backup_label(dir.path()).unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("backup_label")).unwrap(),
            "START WAL LOCATION: 0/4000028 (file 000000010000000000000004)\n\
             CHECKPOINT LOCATION: 0/4000080\n\
             START TIMELINE: 1\n"
        );
        finish_backup_label(&dir.path().join("none")).unwrap();
    }

    #[test]
    fn a_chain_that_lacks_blocks_or_has_a_bad_header_fails() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let syncer = Syncer::start();
        let new_writer = || {
            ChainWriter::new(FileWriter::new(
                root.clone(),
                HashMap::new(),
                syncer.handle(),
                None,
            ))
        };
        let mut w = new_writer();
        w.set_archive(0, root.clone(), None);
        feed(
            &mut w,
            &archive(&[incremental("base/1/INCREMENTAL.100", 2, &[])]),
        )
        .unwrap();
        let e = w.finish().unwrap_err();
        assert!(
            matches!(&e, RestoreError::ChainIncomplete { path, blocks: 2, .. } if path == "base/1/100"),
            "{e}"
        );
        drop(w);

        let mut w = new_writer();
        w.set_archive(0, root.join("other"), None);
        let h = Header {
            truncation_block_length: 1,
            blocks: vec![0],
        };
        let mut bad = encode(&h, &block(b'x'));
        bad[0] ^= 1;
        let e = feed(&mut w, &archive(&[file("base/1/INCREMENTAL.7", &bad)])).unwrap_err();
        assert!(matches!(e, RestoreError::BadIncremental { .. }), "{e}");
        assert_eq!(target_name("INCREMENTAL.x"), Some("x".into()));
        assert_eq!(target_name("a/INCREMENTAL.x"), Some("a/x".into()));
        assert_eq!(target_name("a/x"), None);
        drop(w);
        syncer.finish(&[root]).unwrap();
    }

    mod on_a_repository {
        use super::*;
        use crate::recovery::{RestorePlan, Target, TargetAction, TimelineTarget};
        use crate::repo::{BackupArchive, ClusterIdentity, WriteOptions};
        use crate::restore::{execute, RestoreOptions};
        use crate::storage::Storage;
        use crate::wal::{Lsn, WalFileName};

        const CLUSTER: ClusterIdentity = ClusterIdentity {
            system_identifier: 7_000_000_000_000_000_002,
            pg_major: 17,
            wal_segment_size: 16 << 20,
        };

        /// Stores `tar` as backup `id`'s base.tar (in two parts, so a member spans parts) and
        /// returns its catalog entry.
        async fn put_backup(repo: &Repository, id: &str, lsn: u64, tar: &[u8]) -> BackupInfo {
            let half = tar.len() / 2;
            let mut stored = 0;
            for (n, piece) in [&tar[..half], &tar[half..]].into_iter().enumerate() {
                stored += repo
                    .put_backup_part(id, "base.tar", n as u32, piece.to_vec())
                    .await
                    .unwrap();
            }
            BackupInfo {
                system_identifier: CLUSTER.system_identifier,
                archives: vec![BackupArchive {
                    name: "base.tar".into(),
                    tablespace_oid: None,
                    tablespace_location: None,
                    parts: 2,
                    raw_bytes: tar.len() as u64,
                    stored_bytes: stored,
                }],
                manifest: false,
                ..BackupInfo::example(id, lsn, None)
            }
        }

        fn plan(chain: Vec<BackupInfo>) -> RestorePlan {
            let seg = WalFileName::segment(1, 1, CLUSTER.wal_segment_size);
            RestorePlan {
                backup: chain[0].clone(),
                chain,
                target: Target::Latest,
                action: TargetAction::Promote,
                timeline: TimelineTarget::Latest,
                resolved_timeline: 1,
                inclusive: true,
                standby: false,
                wal_first: seg.clone(),
                wal_last: seg,
                recoverable_end: Lsn(0),
                bytes_to_fetch: 0,
                last_xact: None,
                restore_point: None,
                windows: vec![],
            }
        }

        #[tokio::test]
        async fn restores_a_chain_and_refuses_one_with_a_lost_member() {
            let storage = Storage::in_memory();
            let repo = Repository::open_for_cluster(
                storage.clone(),
                &CLUSTER,
                "test",
                WriteOptions::default(),
            )
            .await
            .unwrap();
            let full = put_backup(
                &repo,
                "full",
                100,
                &archive(&[
                    file("PG_VERSION", b"17\n"),
                    file("base/1/100", &blocks(b"AAAA")),
                ]),
            )
            .await;
            let middle = put_backup(
                &repo,
                "middle",
                200,
                &archive(&[
                    file("PG_VERSION", b"17\n"),
                    incremental("base/1/INCREMENTAL.100", 4, &[(3, b'B')]),
                ]),
            )
            .await;
            let newest = put_backup(
                &repo,
                "newest",
                300,
                &archive(&[
                    file("PG_VERSION", b"17\n"),
                    incremental("base/1/INCREMENTAL.100", 4, &[(0, b'C')]),
                ]),
            )
            .await;
            // The final content's block map (no manifest here): what checks the result.
            let mut map = repo.put_block_map("newest");
            let final_100 = blocks(b"CAAB");
            map.add(&crate::repo::FileBlocks {
                path: "base/1/100".into(),
                size: final_100.len() as u64,
                hashes: final_100
                    .chunks(BLOCK as usize)
                    .map(crate::repo::block_hash)
                    .collect(),
            })
            .await
            .unwrap();
            map.finish().await.unwrap();
            let dir = tempfile::tempdir().unwrap();
            let opts = |d: &Path| RestoreOptions {
                pgdata: d.to_path_buf(),
                tablespace_map: vec![],
                restore_command: "true".into(),
                delta: false,
            };
            let chain = vec![newest.clone(), middle.clone(), full.clone()];
            let target = dir.path().join("ok");
            let report = execute(&repo, &plan(chain.clone()), &opts(&target))
                .await
                .unwrap();
            assert_eq!(report.rebuilt_files, 1);
            assert_eq!(
                fs::read(target.join("base/1/100")).unwrap(),
                blocks(b"CAAB")
            );

            // Delta restores into it: only what differs is written, block by block.
            let delta = |d: &Path| RestoreOptions {
                delta: true,
                ..opts(d)
            };
            let mut damaged = blocks(b"CAXB");
            damaged.extend(block(b'Y')); // and a block too many
            fs::write(target.join("base/1/100"), &damaged).unwrap();
            fs::write(target.join("base/1/999"), b"dropped").unwrap();
            let report = execute(&repo, &plan(chain.clone()), &delta(&target))
                .await
                .unwrap();
            assert_eq!(
                fs::read(target.join("base/1/100")).unwrap(),
                blocks(b"CAAB")
            );
            assert!(!target.join("base/1/999").exists());
            assert_eq!(report.written_bytes, BLOCK, "{report:?}");
            assert_eq!(report.kept_files, 1, "PG_VERSION: {report:?}");

            // A lost part of the middle member: refused before anything is written, naming it.
            let key = repo.backup_part_key("middle", "base.tar", 1);
            storage.delete(&key).await.unwrap();
            let refused = dir.path().join("refused");
            let e = execute(&repo, &plan(chain), &opts(&refused))
                .await
                .unwrap_err();
            assert!(
                matches!(&e, RestoreError::ChainBroken { member, .. } if member == "middle"),
                "{e}"
            );
            assert!(!refused.exists(), "nothing written");
        }
    }
}
