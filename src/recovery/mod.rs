//! What the repository can recover, and how: the rules shared by `list`, `verify` and `restore`.
//!
//! [`Catalog`] is the repository's recoverable state loaded once (completed backups, the WAL
//! inventory, timeline histories); [`Catalog::plan`] decides a restore and
//! [`Catalog::windows`] describes what is recoverable, reading only the segment summaries the
//! question needs. The rules themselves ([`plan::plan`], [`plan::recoverable_windows`]) are
//! pure: no I/O, unit-tested on hand-built catalogs.

pub mod chain;
pub mod facts;
pub mod plan;
pub mod target;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

pub use chain::{chain_of, is_full, parent_of, ChainError};
pub use facts::load_facts;
pub use plan::{
    describe_windows, plan, recoverable_windows, summary_needs, PlanError, RestorePlan,
    RestoreRequest, SummaryNeeds, WalFacts, WalRun, Window,
};
pub use target::{format_pg_time, parse_target_time, Target, TargetAction, TimelineTarget};

use crate::error::{Classify, Code};
use crate::repo::{BackupInfo, Histories, RepoError, Repository, WalInventory};
use crate::wal::{Lsn, TimelineId};

/// Planning failed: the request cannot be met, or the repository could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Repo(#[from] RepoError),
}

impl Classify for RecoveryError {
    fn code(&self) -> Code {
        match self {
            RecoveryError::Plan(e) => e.code(),
            RecoveryError::Repo(e) => e.code(),
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            RecoveryError::Plan(e) => e.hint(),
            RecoveryError::Repo(e) => e.hint(),
        }
    }
}

/// The repository's recoverable state, loaded once.
#[derive(Clone, Debug)]
pub struct Catalog {
    /// Completed backups, oldest first.
    pub backups: Vec<BackupInfo>,
    pub inventory: WalInventory,
    pub histories: Histories,
    pub seg_size: u64,
    /// Per timeline, how far the chunks of a segment not yet stored whole reach.
    pub streamed: BTreeMap<TimelineId, Lsn>,
}

impl Catalog {
    /// Loads the catalog: one LIST of the backups' catalog, one of `wal/`, and the history
    /// files. The two listings go out together: each is a round trip or more to an object
    /// store, before a restore can start.
    pub async fn load(repo: &Repository) -> Result<Catalog, RepoError> {
        let (backups, scan) = tokio::try_join!(repo.list_backups(), repo.wal_scan())?;
        let seg_size = repo.descriptor().wal_segment_size;
        let streamed = scan.streamed_ends(seg_size);
        let inventory = scan.inventory;
        let histories = repo.histories(&inventory.histories).await?;
        Ok(Catalog {
            backups,
            inventory,
            histories,
            seg_size,
            streamed,
        })
    }

    /// Which segment summaries answering `req` needs.
    pub fn summary_needs(&self, req: &RestoreRequest) -> Result<SummaryNeeds, PlanError> {
        summary_needs(
            req,
            &self.backups,
            &self.inventory,
            &self.histories,
            self.seg_size,
        )
    }

    /// Plans `req`, reading the summaries it needs first.
    pub async fn plan(
        &self,
        repo: &Repository,
        req: &RestoreRequest,
        now: DateTime<Utc>,
    ) -> Result<RestorePlan, RecoveryError> {
        let needs = self.summary_needs(req)?;
        let facts = load_facts(repo, &needs).await?;
        Ok(plan(
            req,
            &self.backups,
            &self.inventory,
            &self.histories,
            &facts,
            self.seg_size,
            now,
        )?)
    }

    /// The recoverable windows on the latest timeline, oldest first.
    pub async fn windows(&self, repo: &Repository) -> Result<Vec<Window>, RecoveryError> {
        let latest = RestoreRequest::latest();
        let needs = self.summary_needs(&latest)?;
        let facts = load_facts(repo, &needs).await?;
        Ok(self.windows_with(&facts)?)
    }

    /// The recoverable windows on the latest timeline, from summaries the caller holds.
    pub fn windows_with(&self, facts: &WalFacts) -> Result<Vec<Window>, PlanError> {
        recoverable_windows(
            &RestoreRequest::latest(),
            &self.backups,
            &self.inventory,
            &self.histories,
            facts,
            self.seg_size,
        )
    }
}
