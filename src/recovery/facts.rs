//! Loading the segment summaries [`plan`](super::plan::plan) needs: the I/O half of planning.
//!
//! Restore must stay fast on a repository with months of WAL, so only what the target needs is
//! read: for time targets, `latest` and `list`, each contiguous run is walked back from its end
//! until a summary holding a transaction end is found (usually in the last segments: one batch
//! of small GETs, one round trip, per run); only restore-point targets read every summary of
//! the runs, a bounded number in flight at once.

use futures::{StreamExt, TryStreamExt};

use super::plan::{SummaryNeeds, WalFacts};
use crate::repo::{RepoError, Repository};
use crate::wal::SegNo;

/// Summary reads in flight at once: enough to hide object-store latency (tens of ms per GET),
/// few enough not to trip request-rate limits.
const SUMMARY_READS_IN_FLIGHT: usize = 32;

/// Batch size when walking a run backwards. Most runs end with a transaction in the last
/// segment, but a quiet server's last segments hold none (a backup's switch, checkpoints): a
/// batch is one round trip to an object store whatever its size, and summaries are small, so
/// start with 16 rather than walk back in several round trips (4 then 8 then 8 took three).
const BACKWARD_BATCH: u64 = 16;

async fn load(
    repo: &Repository,
    needs: &SummaryNeeds,
    segnos: Vec<SegNo>,
    facts: &mut WalFacts,
) -> Result<(), RepoError> {
    let loaded: Vec<_> = futures::stream::iter(segnos)
        .map(|n| async move {
            let name = needs.segment_name(n);
            repo.segment_summary_or_compute(&name).await.map(|s| (n, s))
        })
        .buffered(SUMMARY_READS_IN_FLIGHT)
        .try_collect()
        .await?;
    for (n, s) in loaded {
        if let Some(s) = s {
            facts.segments.insert(n, s);
        }
    }
    Ok(())
}

/// Reads the summaries `needs` asks for. A missing summary is rebuilt from its segment.
pub async fn load_facts(repo: &Repository, needs: &SummaryNeeds) -> Result<WalFacts, RepoError> {
    let mut facts = WalFacts::default();
    for run in &needs.runs {
        if needs.all {
            let missing: Vec<SegNo> = (run.first..=run.last)
                .filter(|n| !facts.segments.contains_key(n))
                .collect();
            load(repo, needs, missing, &mut facts).await?;
            continue;
        }
        let mut end = run.last;
        let mut batch = BACKWARD_BATCH;
        loop {
            let start = end.saturating_sub(batch - 1).max(run.first);
            let segnos: Vec<SegNo> = (start..=end)
                .filter(|n| !facts.segments.contains_key(n))
                .collect();
            load(repo, needs, segnos, &mut facts).await?;
            let found = facts
                .segments
                .range(start..=end)
                .any(|(_, s)| s.last_xact.is_some());
            if found || start == run.first {
                break;
            }
            end = start - 1;
            batch = (batch * 4).min(SUMMARY_READS_IN_FLIGHT as u64 * 4);
        }
    }
    Ok(facts)
}
