//! Whether a backup's stored objects are all there, from one LIST and no reads: what restoring
//! a chain of incremental backups checks for every member before it writes anything, and what
//! `verify` reports for chains.

use std::collections::HashMap;

use super::{layout, BackupInfo, Repository, Result};

impl Repository {
    /// What is wrong with backup `b`'s stored objects: an `expired` marker (an expire is
    /// removing it), a missing manifest or part, or an archive whose parts add up to another
    /// size than the catalog recorded. `None` when everything is in place. Contents are not
    /// read: they are checked as they are fetched.
    pub async fn backup_objects_problem(&self, b: &BackupInfo) -> Result<Option<String>> {
        let prefix = layout::backup_prefix(&b.id);
        let sizes: HashMap<String, u64> = self
            .storage
            .list(&prefix)
            .await?
            .into_iter()
            .map(|o| (o.key, o.size))
            .collect();
        if sizes.contains_key(&layout::backup_expired_key(&b.id)) {
            return Ok(Some("is being removed by `pitr expire`".into()));
        }
        if b.manifest && !sizes.contains_key(&layout::backup_manifest_key(&b.id)) {
            return Ok(Some("has lost its backup_manifest object".into()));
        }
        for a in &b.archives {
            let mut total = 0;
            for part in 0..a.parts {
                let key = layout::backup_part_key(&b.id, &a.name, part);
                match sizes.get(&key) {
                    Some(size) => total += size,
                    None => return Ok(Some(format!("has lost object {key}"))),
                }
            }
            // Older catalogs may not know the stored size.
            if a.stored_bytes != 0 && total != a.stored_bytes {
                return Ok(Some(format!(
                    "is damaged: the parts of {} hold {total} bytes, the catalog says {}",
                    a.name, a.stored_bytes
                )));
            }
        }
        Ok(None)
    }
}
