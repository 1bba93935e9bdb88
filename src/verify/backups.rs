//! Backups against their manifests: every part decoded (frame checksums), the tar stream parsed,
//! and every file's size and CRC-32C compared with PostgreSQL's `backup_manifest`, exactly as a
//! restore would check them, without writing anything.

use std::collections::{HashMap, HashSet};

use super::{read_checked, record_read_error, ProblemKind, Severity, VerifyProgress, VerifyReport};
use crate::format::manifest::{self, ManifestFile};
use crate::format::tar::{EntryKind, TarError, TarEvent, TarReader};
use crate::repo::{BackupInfo, ObjectKind, RepoError, Repository, ScannedObject};

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

    for b in &catalog {
        report.backups += 1;
        verify_one(repo, b, &sizes, &mut checked, report, progress).await?;
    }

    // Data no completed backup refers to: only its frame can be checked.
    for o in objects.iter().filter(|o| !checked.contains(o.key())) {
        read_checked(repo, o, report, progress).await?;
    }
    Ok(catalog)
}

/// CRC and length of the file being read from the tar stream.
struct OpenFile {
    manifest_path: String,
    crc: u32,
    len: u64,
}

async fn verify_one(
    repo: &Repository,
    b: &BackupInfo,
    sizes: &HashMap<&str, u64>,
    checked: &mut HashSet<String>,
    report: &mut VerifyReport,
    progress: &(dyn Fn(VerifyProgress) + Sync),
) -> Result<(), RepoError> {
    let mismatch = |report: &mut VerifyReport, key: Option<String>, msg: String| {
        report.problem(
            Severity::Error,
            ProblemKind::BackupMismatch,
            key,
            format!("backup {}: {msg}", b.id),
        )
    };
    let expected: Option<HashMap<String, ManifestFile>> = if b.manifest {
        let key = repo.backup_manifest_key(&b.id);
        checked.insert(key.clone());
        report.objects += 1;
        let size = sizes.get(key.as_str()).copied().unwrap_or(0);
        report.bytes += size;
        progress(VerifyProgress::Checked { bytes: size });
        match repo.backup_manifest(&b.id).await {
            Ok(Some(raw)) => match manifest::parse(&raw) {
                Ok(m) => Some(m),
                Err(e) => {
                    mismatch(report, Some(key), e.to_string());
                    None
                }
            },
            Ok(None) => {
                mismatch(report, Some(key), "backup_manifest is missing".into());
                None
            }
            Err(e) => {
                record_read_error(report, &key, e)?;
                None
            }
        }
    } else {
        None
    };

    let mut seen: HashSet<String> = HashSet::new();
    let mut damaged = false;
    for archive in &b.archives {
        let prefix = archive
            .tablespace_oid
            .map(|oid| format!("pg_tblspc/{oid}/"))
            .unwrap_or_default();
        let mut reader = TarReader::new();
        let mut current: Option<OpenFile> = None;
        let mut file_problems: Vec<String> = vec![];
        let mut stream_ok = true;
        for part in 0..archive.parts {
            let key = repo.backup_part_key(&b.id, &archive.name, part);
            checked.insert(key.clone());
            report.objects += 1;
            let size = sizes.get(key.as_str()).copied().unwrap_or(0);
            report.bytes += size;
            let chunk = match repo.backup_part(&b.id, &archive.name, part).await {
                Ok(c) => c,
                Err(RepoError::Storage(e)) if e.is_not_found() => {
                    mismatch(report, Some(key), "part is missing".into());
                    stream_ok = false;
                    break;
                }
                Err(e) => {
                    record_read_error(report, &key, e)?;
                    stream_ok = false;
                    break;
                }
            };
            progress(VerifyProgress::Checked { bytes: size });
            if !stream_ok {
                continue;
            }
            let res = reader.feed(&chunk, &mut |ev| -> Result<(), TarError> {
                match ev {
                    TarEvent::Entry(h) => {
                        current = (h.kind == EntryKind::File).then(|| OpenFile {
                            manifest_path: format!("{prefix}{}", h.path),
                            crc: 0,
                            len: 0,
                        });
                    }
                    TarEvent::Data(d) => {
                        if let Some(f) = &mut current {
                            f.crc = crc32c::crc32c_append(f.crc, d);
                            f.len += d.len() as u64;
                        }
                    }
                    TarEvent::EntryEnd => {
                        if let Some(f) = current.take() {
                            report.backup_files += 1;
                            if let Some(exp) =
                                expected.as_ref().and_then(|m| m.get(&f.manifest_path))
                            {
                                if exp.size != f.len {
                                    file_problems.push(format!(
                                        "{}: size {} differs from the manifest's {}",
                                        f.manifest_path, f.len, exp.size
                                    ));
                                } else if exp.crc32c.is_some_and(|want| want != f.crc) {
                                    file_problems.push(format!(
                                        "{}: CRC-32C {} differs from the manifest's {}",
                                        f.manifest_path,
                                        manifest::format_crc32c(f.crc),
                                        manifest::format_crc32c(exp.crc32c.unwrap_or(0))
                                    ));
                                }
                            }
                            seen.insert(f.manifest_path);
                        }
                    }
                }
                Ok(())
            });
            if let Err(e) = res {
                mismatch(
                    report,
                    Some(key),
                    format!("archive {} is not a valid tar stream: {e}", archive.name),
                );
                stream_ok = false;
            }
        }
        if stream_ok {
            if let Err(e) = reader.finish() {
                mismatch(
                    report,
                    None,
                    format!("archive {} ends early: {e}", archive.name),
                );
                stream_ok = false;
            }
        }
        damaged |= !stream_ok || !file_problems.is_empty();
        for p in file_problems {
            mismatch(report, None, format!("archive {}: {p}", archive.name));
        }
    }
    // Only meaningful when every archive was read through.
    if let (Some(m), false) = (&expected, damaged) {
        let mut missing: Vec<&String> = m.keys().filter(|p| !seen.contains(*p)).collect();
        missing.sort();
        if let Some(first) = missing.first() {
            mismatch(
                report,
                None,
                format!(
                    "{} file(s) listed in the manifest are not in the backup, e.g. {first}",
                    missing.len()
                ),
            );
        }
    }
    Ok(())
}
