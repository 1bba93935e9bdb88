//! Chains of incremental backups: which backups restoring one needs, and whether the catalog
//! has them all. Shared by `restore` (planning), `expire` (retention) and `verify`.
//!
//! An incremental backup names its parent (a full or another incremental); restoring it needs
//! the parent's chain too, down to a full backup: its chain, newest first.

use crate::repo::BackupInfo;

/// Whether `b` is a full backup (backups of older pitr versions all are).
pub fn is_full(b: &BackupInfo) -> bool {
    parent_of(b).is_none()
}

/// The id of the backup `b` was taken incrementally on; `None` for a full backup.
pub fn parent_of(_b: &BackupInfo) -> Option<&str> {
    // Interim until the catalog carries `kind` and `parent` (the backup side of issue 13).
    None
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
    while let Some(id) = parent_of(child) {
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
