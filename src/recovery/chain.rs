//! Chains of incremental backups: which backups restoring one needs, and whether the catalog
//! has them all. Shared by `restore` (planning), `expire` (retention) and `verify`.
//!
//! An incremental backup names its parent (a full or another incremental); restoring it needs
//! the parent's chain too, down to a full backup: its chain, newest first.

use crate::repo::{BackupInfo, BackupKind};

/// Whether `b` is a full backup (backups of older pitr versions all are).
pub fn is_full(b: &BackupInfo) -> bool {
    b.kind == BackupKind::Full
}

/// The id of the backup `b` was taken incrementally on; `None` for a full backup.
pub fn parent_of(b: &BackupInfo) -> Option<&str> {
    match b.kind {
        BackupKind::Full => None,
        BackupKind::Incremental => b.parent.as_deref(),
    }
}

/// Why a backup's chain cannot be restored: the first member that is missing or wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("member {member} of its chain {problem}")]
pub struct ChainError {
    pub member: String,
    pub problem: String,
}

/// The chain restoring `backup` needs, newest first: `backup`, its parent, ..., a full backup.
/// Every member must be in `backups` (the catalog), older than its child and of the same
/// cluster; the first that is not is named.
pub fn chain_of<'a>(
    backup: &'a BackupInfo,
    backups: &'a [BackupInfo],
) -> Result<Vec<&'a BackupInfo>, ChainError> {
    let mut chain = vec![backup];
    let mut child = backup;
    while !is_full(child) {
        let Some(id) = parent_of(child) else {
            return Err(ChainError {
                member: child.id.clone(),
                problem: "is incremental but names no parent".into(),
            });
        };
        let problem = |problem: &str| ChainError {
            member: id.to_string(),
            problem: problem.to_string(),
        };
        let parent = backups
            .iter()
            .find(|b| b.id == id)
            .ok_or_else(|| problem("is not in the repository's catalog (expired or deleted)"))?;
        if parent.system_identifier != child.system_identifier {
            return Err(problem("belongs to another cluster"));
        }
        // Parents are older: this also ends any loop in damaged catalog entries.
        if parent.start_lsn >= child.start_lsn || chain.len() > backups.len() {
            return Err(problem("does not start before its child"));
        }
        chain.push(parent);
        child = parent;
    }
    Ok(chain)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backup(id: &str, lsn: u64, parent: Option<&str>) -> BackupInfo {
        BackupInfo::example(id, lsn, parent)
    }

    #[test]
    fn chains_run_from_the_backup_to_its_full_and_name_the_first_missing_member() {
        let all = vec![
            backup("f", 10, None),
            backup("i1", 20, Some("f")),
            backup("i2", 30, Some("i1")),
            backup("i3", 40, Some("i2")),
        ];
        let ids = |c: Vec<&BackupInfo>| c.iter().map(|b| b.id.clone()).collect::<Vec<_>>();
        assert_eq!(
            ids(chain_of(&all[3], &all).unwrap()),
            ["i3", "i2", "i1", "f"]
        );
        assert_eq!(ids(chain_of(&all[0], &all).unwrap()), ["f"]);
        assert!(is_full(&all[0]) && !is_full(&all[1]));

        let without_middle: Vec<BackupInfo> =
            all.iter().filter(|b| b.id != "i2").cloned().collect();
        let e = chain_of(&all[3], &without_middle).unwrap_err();
        assert_eq!(e.member, "i2");
        assert!(
            e.to_string().contains("not in the repository's catalog"),
            "{e}"
        );

        // A parent that is not older, e.g. a loop in damaged entries, ends the walk.
        let looped = vec![backup("a", 10, Some("b")), backup("b", 20, Some("a"))];
        assert!(chain_of(&looped[1], &looped).is_err());
        let mut orphan = backup("o", 50, None);
        orphan.kind = BackupKind::Incremental;
        assert_eq!(chain_of(&orphan, &all).unwrap_err().member, "o");
    }
}
