//! WAL domain types: LSNs, timelines, file names, page headers and timeline history.
//!
//! Pure code: no I/O, no knowledge of storage or of the replication protocol. Names mirror
//! PostgreSQL's (`XLogFileName`, `XLP_LONG_HEADER`, …) so that a grep in the PostgreSQL source
//! finds the counterpart (src/include/access/xlog_internal.h).

mod file_name;
mod history;
mod lsn;
mod page;
mod reader;
#[cfg(test)]
mod real_wal_tests;
pub mod record;
mod summary;
#[cfg(test)]
pub(crate) mod testdata;
pub mod xact;

pub use file_name::{SegNo, WalFileName, WalFileNameError};
pub use history::{parse_history, HistoryEntry, HistoryError};
pub use lsn::{Lsn, LsnParseError};
pub use page::{
    major_from_magic, parse_long_header, parse_page_header, validate_segment,
    validate_segment_start, LongPageHeader, PageError, PageHeader, SIZE_OF_LONG_PAGE_HEADER,
    XLP_BKP_REMOVABLE, XLP_FIRST_IS_CONTRECORD, XLP_FIRST_IS_OVERWRITE_CONTRECORD, XLP_LONG_HEADER,
};
pub use reader::{EndOfWal, EndReason, Next, WalError, WalReader};
pub use record::{rmgr_name, BlockRef, Record, XLogRecord, RM_XACT_ID, RM_XLOG_ID};
pub use summary::{
    summarize_segment, CheckpointMark, RestorePointMark, SegmentEnd, SegmentSummarizer,
    SegmentSummary, SegmentTail, SkippedContinuation, Summarized, SummaryError, XactMark, XidRange,
    SUMMARY_FORMAT,
};
pub use xact::{
    decode_event, may_be_event, pg_timestamp_to_utc, utc_to_pg_timestamp, WalEvent, XactKind,
};

/// PostgreSQL timeline identifier.
pub type TimelineId = u32;

/// WAL segment sizes PostgreSQL accepts (`initdb --wal-segsize`): powers of two, 1 MiB to 1 GiB.
pub fn is_valid_segment_size(size: u64) -> bool {
    size.is_power_of_two() && (1 << 20..=1 << 30).contains(&size)
}

/// Default WAL page size (`XLOG_BLCKSZ`); every build of PostgreSQL we support uses 8 KiB.
pub const XLOG_BLCKSZ: u32 = 8192;
