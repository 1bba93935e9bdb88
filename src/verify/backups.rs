//! Backups against their manifests: every part decoded (frame checksums), the tar stream parsed,
//! and every file's size and CRC-32C compared with PostgreSQL's `backup_manifest`, exactly as a
//! restore would check them, without writing anything. Then chains: every incremental backup's
//! parents must be in the catalog, down to a full backup, and undamaged.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;

use super::{read_checked, record_read_error, ProblemKind, Severity, VerifyProgress, VerifyReport};
use crate::format::archive_check::{
    ArchiveReader, ArchiveSink, FeedError, FileSum, Manifest, ManifestCheck, Mismatch,
};
use crate::format::incremental::target_name;
use crate::format::manifest;
use crate::recovery::{chain_of, is_full};
use crate::repo::{BackupArchive, BackupInfo, ObjectKind, RepoError, Repository, ScannedObject};

/// Reads the catalog and checks every completed backup; frame-checks the other backup objects
/// (parts left by interrupted backups). Returns the catalog entries that parsed, oldest first.
pub(super) async fn verify_backups(
    repo: &Repository,
    objects: &[ScannedObject],
    report: &mut VerifyReport,
    progress: &(dyn Fn(VerifyProgress) + Sync),
) -> Result<Vec<BackupInfo>, RepoError> {
    let sizes: HashMap<&str, u64> = objects.iter().map(|o| (o.key(), o.size)).collect();
    let mut checked: HashSet<String> = HashSet::new();
    let mut catalog = vec![];
    for o in objects
        .iter()
        .filter(|o| matches!(o.kind, ObjectKind::Catalog { .. }))
    {
        checked.insert(o.key().to_string());
        let Some(raw) = read_checked(repo, o, report, progress).await? else {
            continue;
        };
        match serde_json::from_slice::<BackupInfo>(&raw) {
            Ok(b) => catalog.push(b),
            Err(e) => report.problem(
                Severity::Error,
                ProblemKind::BadMetadata,
                Some(o.key().to_string()),
                format!("backup catalog entry does not parse: {e}"),
            ),
        }
    }
    catalog.sort_by(|a, b| (a.stop_lsn, &a.id).cmp(&(b.stop_lsn, &b.id)));

    let mut damaged: HashSet<&str> = HashSet::new();
    for b in &catalog {
        report.backups += 1;
        let errors = report.errors();
        let mut reading = Reading {
            repo,
            backup: b,
            sizes: &sizes,
            checked: &mut checked,
            report,
            progress,
        };
        reading.verify().await?;
        if report.errors() > errors {
            damaged.insert(&b.id);
        }
    }
    verify_chains(&catalog, &damaged, report);

    // Data no completed backup refers to: only its frame can be checked.
    for o in objects.iter().filter(|o| !checked.contains(o.key())) {
        read_checked(repo, o, report, progress).await?;
    }
    Ok(catalog)
}

/// Every incremental backup restores only with its whole chain: each member in the catalog,
/// none damaged.
fn verify_chains(catalog: &[BackupInfo], damaged: &HashSet<&str>, report: &mut VerifyReport) {
    for b in catalog.iter().filter(|b| !is_full(b)) {
        let problem = match chain_of(b, catalog) {
            Err(e) => Some(e.to_string()),
            Ok(chain) => chain[1..]
                .iter()
                .find(|m| damaged.contains(m.id.as_str()))
                .map(|m| format!("member {} of its chain is damaged (see above)", m.id)),
        };
        if let Some(problem) = problem {
            report.problem(
                Severity::Error,
                ProblemKind::BrokenChain,
                None,
                format!("backup {} cannot be restored: {problem}", b.id),
            );
        }
    }
}

/// One completed backup being checked: its manifest, then each archive, part by part.
struct Reading<'a> {
    repo: &'a Repository,
    backup: &'a BackupInfo,
    sizes: &'a HashMap<&'a str, u64>,
    /// Keys read here; the objects no backup refers to are frame-checked afterwards.
    checked: &'a mut HashSet<String>,
    report: &'a mut VerifyReport,
    progress: &'a (dyn Fn(VerifyProgress) + Sync),
}

impl Reading<'_> {
    async fn verify(&mut self) -> Result<(), RepoError> {
        let manifest = self.read_manifest().await?;
        let mut check = ManifestCheck::new(manifest);
        let mut damaged = false;
        for archive in &self.backup.archives {
            damaged |= !self.verify_archive(archive, &mut check).await?;
        }
        self.report.backup_files += check.files();
        let mut outcome = check.finish();
        // An incremental backup holds changed files as INCREMENTAL.<name>; the manifest pitr
        // stores in block mode lists <name>, the final file: neither is a problem.
        let stand_ins: HashSet<String> = outcome
            .extra
            .iter()
            .filter_map(|p| target_name(p))
            .collect();
        outcome.missing.retain(|p| !stand_ins.contains(p));
        outcome.extra.retain(|p| target_name(p).is_none());
        // Only meaningful when every archive was read through.
        if damaged {
            return Ok(());
        }
        if let Some(first) = outcome.missing.first() {
            let n = outcome.missing.len();
            self.mismatch(
                None,
                format!("{n} file(s) listed in the manifest are not in the backup, e.g. {first}"),
            );
        }
        if let Some(first) = outcome.extra.first() {
            // The server lists every file it sends: restore writes such a file unchecked.
            let n = outcome.extra.len();
            self.report.problem(
                Severity::Warning,
                ProblemKind::BackupMismatch,
                None,
                format!(
                    "backup {}: {n} file(s) in the backup are not listed in its manifest, e.g. {first}",
                    self.backup.id
                ),
            );
        }
        Ok(())
    }

    /// `None` when the backup has no manifest or it cannot be read (reported).
    async fn read_manifest(&mut self) -> Result<Option<Manifest>, RepoError> {
        if !self.backup.manifest {
            return Ok(None);
        }
        let key = self.repo.backup_manifest_key(&self.backup.id);
        let Some(raw) = self.fetch(&key, None, "backup_manifest is missing").await? else {
            return Ok(None);
        };
        match manifest::parse(&raw) {
            Ok(m) => Ok(Some(m)),
            Err(e) => {
                self.mismatch(Some(key), e.to_string());
                Ok(None)
            }
        }
    }

    /// Reads one archive through `check`; true when it was read through and every file
    /// matched. After a tar error the remaining parts are still frame-checked.
    async fn verify_archive(
        &mut self,
        archive: &BackupArchive,
        check: &mut ManifestCheck,
    ) -> Result<bool, RepoError> {
        let mut reader = ArchiveReader::new(archive.tablespace_oid);
        let mut problems = FileProblems::default();
        let mut stream_ok = true;
        for part in 0..archive.parts {
            let key = self
                .repo
                .backup_part_key(&self.backup.id, &archive.name, part);
            let Some(chunk) = self
                .fetch(&key, Some((&archive.name, part)), "part is missing")
                .await?
            else {
                stream_ok = false;
                break;
            };
            if !stream_ok {
                continue;
            }
            if let Err(e) = reader.feed(&chunk, check, &mut problems) {
                let FeedError::Tar(e) = e;
                let msg = format!("archive {} is not a valid tar stream: {e}", archive.name);
                self.mismatch(Some(key), msg);
                stream_ok = false;
            }
        }
        if stream_ok {
            if let Err(e) = reader.finish() {
                self.mismatch(None, format!("archive {} ends early: {e}", archive.name));
                stream_ok = false;
            }
        }
        for m in &problems.0 {
            self.mismatch(None, format!("archive {}: {m}", archive.name));
        }
        Ok(stream_ok && problems.0.is_empty())
    }

    /// Reads one object of the backup; `None` when it is missing or unreadable (reported).
    /// Reads the manifest (`part` `None`) or a part, whose key is `key`; `None` when it is
    /// missing or damaged (reported).
    async fn fetch(
        &mut self,
        key: &str,
        part: Option<(&str, u32)>,
        missing: &str,
    ) -> Result<Option<Vec<u8>>, RepoError> {
        self.checked.insert(key.to_string());
        let size = self.sizes.get(key).copied().unwrap_or(0);
        self.report.objects += 1;
        self.report.bytes += size;
        (self.progress)(VerifyProgress::Checked { bytes: size });
        let id = &self.backup.id;
        let read = match part {
            None => self.repo.backup_manifest(id).await,
            Some((archive, n)) => match self.repo.backup_part(id, archive, n).await {
                Err(RepoError::Storage(e)) if e.is_not_found() => Ok(None),
                other => other.map(Some),
            },
        };
        match read {
            Ok(Some(raw)) => Ok(Some(raw)),
            Ok(None) => {
                self.mismatch(Some(key.to_string()), missing.to_string());
                Ok(None)
            }
            Err(e) => record_read_error(self.report, key, e).map(|()| None),
        }
    }

    fn mismatch(&mut self, key: Option<String>, msg: String) {
        self.report.problem(
            Severity::Error,
            ProblemKind::BackupMismatch,
            key,
            format!("backup {}: {msg}", self.backup.id),
        )
    }
}

/// Collects the files that differ from the manifest; reading goes on.
#[derive(Default)]
struct FileProblems(Vec<Mismatch>);

impl ArchiveSink for FileProblems {
    type Error = Infallible;

    fn file_end(&mut self, _: &FileSum, verdict: Result<(), Mismatch>) -> Result<(), Infallible> {
        if let Err(m) = verdict {
            self.0.push(m);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backup(id: &str, lsn: u64, parent: Option<&str>) -> BackupInfo {
        BackupInfo::example(id, lsn, parent)
    }

    #[test]
    fn chains_with_a_missing_or_damaged_member_are_reported() {
        let catalog = vec![
            backup("f", 10, None),
            backup("i1", 20, Some("f")),
            backup("i2", 30, Some("i1")),
            backup("j", 40, Some("gone")),
        ];
        let mut report = VerifyReport::default();
        verify_chains(&catalog, &HashSet::new(), &mut report);
        assert_eq!(report.problems.len(), 1);
        assert!(
            report.problems[0].message.contains("backup j"),
            "{:?}",
            report.problems
        );
        assert!(report.problems[0].message.contains("gone"));

        let mut report = VerifyReport::default();
        verify_chains(&catalog, &["f"].into(), &mut report);
        let messages: Vec<&str> = report.problems.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(messages.len(), 3, "{messages:?}");
        assert!(messages[0].contains("backup i1") && messages[0].contains("member f"));
        assert_eq!(report.problems[0].kind, ProblemKind::BrokenChain);
    }
}
