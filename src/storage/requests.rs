//! Requests sent to the backend, counted by kind: what an object store bills for.
//!
//! Every attempt counts, retries included, since each is a billed request. A `list` counts one
//! LIST per started page of [`LIST_PAGE`] keys: S3 and GCS return at most 1000 keys a page
//! (Azure 5000, so there this over-counts large listings). object_store's own internal retries
//! of a single hiccup are not visible here.

use std::sync::atomic::{AtomicU64, Ordering};

/// Keys per LIST page on S3 and GCS.
pub const LIST_PAGE: u64 = 1000;

/// Metric: requests sent, label `kind` (put, get, head, list, delete).
pub const METRIC_REQUESTS: &str = "pitr_storage_requests_total";
/// Metric: object bytes sent (`direction` = up) and received (`direction` = down).
pub const METRIC_BYTES: &str = "pitr_storage_bytes_total";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Put,
    Get,
    Head,
    List,
    Delete,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Put => "put",
            Kind::Get => "get",
            Kind::Head => "head",
            Kind::List => "list",
            Kind::Delete => "delete",
        }
    }
}

/// The counts of one [`super::Storage`] and its clones, since it was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RequestCounts {
    pub put: u64,
    pub get: u64,
    pub head: u64,
    pub list: u64,
    pub delete: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

impl RequestCounts {
    pub fn total(&self) -> u64 {
        self.put + self.get + self.head + self.list + self.delete
    }
}

#[derive(Debug, Default)]
pub(super) struct Counter {
    put: AtomicU64,
    get: AtomicU64,
    head: AtomicU64,
    list: AtomicU64,
    delete: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
}

impl Counter {
    pub(super) fn request(&self, kind: Kind, n: u64) {
        let c = match kind {
            Kind::Put => &self.put,
            Kind::Get => &self.get,
            Kind::Head => &self.head,
            Kind::List => &self.list,
            Kind::Delete => &self.delete,
        };
        c.fetch_add(n, Ordering::Relaxed);
        metrics::counter!(METRIC_REQUESTS, "kind" => kind.label()).increment(n);
    }

    pub(super) fn bytes_up(&self, n: usize) {
        self.bytes_up.fetch_add(n as u64, Ordering::Relaxed);
        metrics::counter!(METRIC_BYTES, "direction" => "up").increment(n as u64);
    }

    pub(super) fn bytes_down(&self, n: usize) {
        self.bytes_down.fetch_add(n as u64, Ordering::Relaxed);
        metrics::counter!(METRIC_BYTES, "direction" => "down").increment(n as u64);
    }

    pub(super) fn snapshot(&self) -> RequestCounts {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RequestCounts {
            put: l(&self.put),
            get: l(&self.get),
            head: l(&self.head),
            list: l(&self.list),
            delete: l(&self.delete),
            bytes_up: l(&self.bytes_up),
            bytes_down: l(&self.bytes_down),
        }
    }
}

// One debug line when the last clone goes: how the cost figures in docs/costs.md are measured
// (`--log-level debug`), without a flag or output format of its own.
impl Drop for Counter {
    fn drop(&mut self) {
        let c = self.snapshot();
        if c.total() > 0 {
            tracing::debug!(
                put = c.put,
                get = c.get,
                head = c.head,
                list = c.list,
                delete = c.delete,
                bytes_up = c.bytes_up,
                bytes_down = c.bytes_down,
                "storage requests"
            );
        }
    }
}

/// LIST requests for a listing that returned `keys` keys: at least one.
pub(super) fn list_pages(keys: usize) -> u64 {
    (keys as u64).div_ceil(LIST_PAGE).max(1)
}
