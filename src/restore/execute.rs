//! Carrying out a [`RestorePlan`]: lay the backup (or its chain) out through [`super::writer`],
//! verify it, write recovery settings, make it durable.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::chain;
use super::check;
use super::delta::{self, Delta};
use super::durable::Syncer;
use super::error::RestoreError;
use super::recovery_conf;
use super::writer::{
    check_target_dir, create_private_dir, io_at, restore_archive, tablespace_dir, Extraction,
    FileWriter,
};
use crate::format::archive_check::{Manifest, ManifestCheck, Outcome};
use crate::format::manifest;
use crate::recovery::RestorePlan;
use crate::repo::{BackupInfo, RepoError, Repository};

#[derive(Clone, Debug)]
pub struct RestoreOptions {
    pub pgdata: PathBuf,
    /// Tablespace relocations: old location (as on the source server) → new directory.
    pub tablespace_map: Vec<(String, PathBuf)>,
    /// The full restore_command to write; built by the caller so it can name the binary and the
    /// repository or config file exactly as the user gave them.
    pub restore_command: String,
    /// Restore into an existing, stopped data directory, rewriting only what differs
    /// (`--delta`, see [`super::delta`]).
    pub delta: bool,
}

#[derive(Clone, Debug, Default)]
pub struct RestoreReport {
    /// Files and bytes of the backup.
    pub files: u64,
    pub bytes: u64,
    /// Of those, written; the rest were already in place (delta restore).
    pub written_files: u64,
    pub written_bytes: u64,
    pub kept_files: u64,
    pub kept_bytes: u64,
    /// Files, links and directories a delta restore removed: not in the backup.
    pub removed: u64,
    /// Files reconstructed from the blocks of an incremental chain.
    pub rebuilt_files: u64,
    pub seconds: f64,
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// When run as root, hands the restored tree to the owner of the (pre-created) target directory:
/// PostgreSQL refuses to start on a data directory it does not own.
fn chown_tree(root: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(root, Some(uid), Some(gid))?;
    if fs::symlink_metadata(root)?.is_dir() {
        for e in fs::read_dir(root)? {
            chown_tree(&e?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Restores `plan` into `opts.pgdata`. The caller has checked the directory with
/// [`check_target_dir`] before planning.
pub async fn execute(
    repo: &Repository,
    plan: &RestorePlan,
    opts: &RestoreOptions,
) -> Result<RestoreReport, RestoreError> {
    let started = Instant::now();
    // Both before anything is written, and together: a round trip each over a slow network.
    let (checked, manifest) = tokio::join!(
        async {
            match plan.chain.len() > 1 {
                true => chain::check_members(repo, &plan.chain).await,
                false => Ok(()),
            }
        },
        load_manifest(repo, &plan.backup),
    );
    checked?;
    let manifest = manifest?;
    let owner = prepare_target(&opts.pgdata, opts.delta)?;
    let syncer = Syncer::start();
    let extraction = Extraction {
        writer: FileWriter::new(
            opts.pgdata.clone(),
            opts.tablespace_map.iter().cloned().collect(),
            syncer.handle(),
            opts.delta.then(Delta::default),
        ),
        check: ManifestCheck::new(manifest.clone()),
        buffers: Default::default(),
    };
    let (outcome, relocated, writer, rebuilt) =
        write_backup(repo, &opts.pgdata, plan, extraction, manifest.as_ref()).await?;
    // The writer's sync handle goes here: the syncer finishes only once every handle is gone.
    let (delta, written_files, written_bytes) = writer.into_results();
    check_complete(&outcome)?;
    let removed = match delta {
        Some(mut d) => {
            d.remove_unseen(&opts.pgdata, true)?;
            for (_, dir) in &relocated {
                d.remove_unseen(dir, false)?;
            }
            tracing::info!(kept = d.kept_files, removed = d.removed, "delta restore");
            Some(d)
        }
        None => None,
    };
    finish_layout(&opts.pgdata, plan, opts, &relocated)?;
    let roots: Vec<PathBuf> = std::iter::once(opts.pgdata.clone())
        .chain(relocated.iter().map(|(_, d)| d.clone()))
        .collect();
    make_durable(syncer, roots, owner).await?;
    let d = removed.unwrap_or_default();
    Ok(RestoreReport {
        files: outcome.files,
        bytes: outcome.bytes,
        written_files,
        written_bytes,
        kept_files: d.kept_files,
        kept_bytes: d.kept_bytes,
        removed: d.removed,
        rebuilt_files: rebuilt,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Writes the backup (or, for an incremental one, its chain) into place; returns what was
/// read, where each tablespace went, the writer, and how many files were reconstructed from
/// incremental entries (each checked against the manifest).
async fn write_backup(
    repo: &Repository,
    pgdata: &Path,
    plan: &RestorePlan,
    extraction: Extraction,
    manifest: Option<&Manifest>,
) -> Result<(Outcome, Vec<(u32, PathBuf)>, FileWriter, u64), RestoreError> {
    if plan.chain.len() <= 1 {
        let (outcome, relocated, writer) = restore_archives(repo, &plan.backup, extraction).await?;
        return Ok((outcome, relocated, writer, 0));
    }
    let mut done = chain::restore_chain(repo, &plan.chain, extraction).await?;
    // Server mode: PostgreSQL's incremental manifest does not list the final files.
    let unlisted = done
        .rebuilt
        .iter()
        .any(|(_, key)| !manifest.is_some_and(|m| m.contains_key(key)));
    let mut map = match unlisted {
        true => repo.block_map(&plan.backup.id).await?,
        false => None,
    };
    check::check_rebuilt(&done.rebuilt, manifest, map.as_mut(), &mut done.outcome).await?;
    chain::finish_backup_label(pgdata)?;
    Ok((
        done.outcome,
        done.relocated,
        done.writer,
        done.rebuilt.len() as u64,
    ))
}

/// Creates the data directory; returns who owns it, if it existed: the user may have prepared
/// it for the server's account. A delta restore takes an existing directory whose server is
/// stopped.
fn prepare_target(pgdata: &Path, delta: bool) -> Result<Option<(u32, u32)>, RestoreError> {
    if delta {
        delta::check_stopped(pgdata)?;
    } else {
        check_target_dir(pgdata)?;
    }
    // Remember who owns the directory the user prepared, before we create anything.
    let owner = fs::metadata(pgdata).ok().map(|m| (m.uid(), m.gid()));
    create_private_dir(pgdata)?;
    Ok(owner)
}

async fn load_manifest(
    repo: &Repository,
    backup: &BackupInfo,
) -> Result<Option<Manifest>, RestoreError> {
    if !backup.manifest {
        return Ok(None);
    }
    let raw = repo.backup_manifest(&backup.id).await?.ok_or_else(|| {
        RestoreError::Repo(RepoError::Storage(crate::storage::StorageError::NotFound {
            key: repo.backup_manifest_key(&backup.id),
        }))
    })?;
    Ok(Some(manifest::parse(&raw)?))
}

/// Writes every archive into place, in order; returns what was read, where each tablespace
/// went, and the writer (its counts).
async fn restore_archives(
    repo: &Repository,
    backup: &BackupInfo,
    mut ex: Extraction,
) -> Result<(Outcome, Vec<(u32, PathBuf)>, FileWriter), RestoreError> {
    let pgdata = ex.writer.root.clone();
    let mut relocated: Vec<(u32, PathBuf)> = vec![];
    for archive in &backup.archives {
        ex.writer.root = match archive.tablespace_oid {
            None => pgdata.clone(),
            Some(oid) => {
                let delta = ex.writer.delta.is_some();
                let dir = tablespace_dir(archive, oid, &ex.writer.links, delta)?;
                relocated.push((oid, dir.clone()));
                dir
            }
        };
        let (files, bytes) = (ex.check.files(), ex.check.bytes());
        ex = restore_archive(repo, &backup.id, archive, ex).await?;
        let (files, bytes) = (ex.check.files() - files, ex.check.bytes() - bytes);
        tracing::info!(archive = %archive.name, files, bytes, "restored archive");
    }
    Ok((ex.check.finish(), relocated, ex.writer))
}

/// Every file the manifest lists must have arrived.
fn check_complete(outcome: &Outcome) -> Result<(), RestoreError> {
    if let Some(example) = outcome.missing.first() {
        return Err(RestoreError::MissingFiles {
            count: outcome.missing.len(),
            example: example.clone(),
        });
    }
    // The server lists every file it sends; an unlisted one was written unchecked, not lost.
    if let Some(example) = outcome.extra.first() {
        tracing::warn!(count = outcome.extra.len(), %example, "files in the backup are not in its manifest");
    }
    Ok(())
}

/// Hands the tree to the directory's owner when run as root, then waits until everything
/// written is on disk: a crash after "restored" must not leave a half-written tree.
async fn make_durable(
    syncer: Syncer,
    roots: Vec<PathBuf>,
    owner: Option<(u32, u32)>,
) -> Result<(), RestoreError> {
    if is_root() {
        if let Some((uid, gid)) = owner.filter(|&(uid, _)| uid != 0) {
            for dir in &roots {
                chown_tree(dir, uid, gid).map_err(io_at(dir))?;
            }
        }
    }
    tokio::task::spawn_blocking(move || syncer.finish(&roots))
        .await
        .expect("sync task panicked")
}

/// pg_wal, tablespace_map, signal file and recovery settings.
fn finish_layout(
    pgdata: &Path,
    plan: &RestorePlan,
    opts: &RestoreOptions,
    relocated: &[(u32, PathBuf)],
) -> Result<(), RestoreError> {
    // BASE_BACKUP sends pg_wal empty (or not at all); PostgreSQL needs it and archive_status.
    create_private_dir(&pgdata.join("pg_wal").join("archive_status"))?;

    // With TABLESPACE_MAP the server lists tablespaces in tablespace_map instead of sending
    // symlinks; PostgreSQL recreates the links from it, so relocations are written there.
    let map_path = pgdata.join("tablespace_map");
    if !relocated.is_empty() && map_path.exists() {
        let lines: String = relocated
            .iter()
            .map(|(oid, dir)| format!("{oid} {}\n", dir.display()))
            .collect();
        fs::write(&map_path, lines).map_err(io_at(&map_path))?;
    }

    let signal = pgdata.join(if plan.standby {
        "standby.signal"
    } else {
        "recovery.signal"
    });
    File::create(&signal).map_err(io_at(&signal))?;
    let auto_conf = pgdata.join("postgresql.auto.conf");
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(&auto_conf)
        .map_err(io_at(&auto_conf))?;
    f.write_all(recovery_conf::settings_block(plan, &opts.restore_command).as_bytes())
        .map_err(io_at(&auto_conf))?;
    // These few small files are written last, after the background sync has started draining.
    for p in [&map_path, &signal, &auto_conf] {
        if p.exists() {
            File::open(p).and_then(|f| f.sync_all()).map_err(io_at(p))?;
        }
    }
    Ok(())
}
