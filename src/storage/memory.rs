//! A repository that lives in memory, for unit tests of repository rules (repo, verify, expire,
//! the restore planner) that need no PostgreSQL and no server.
//!
//! It is `object_store`'s `InMemory` behind the same [`ObjectStoreBackend`] that S3 uses, under a
//! key prefix: the key mapping, conditional creates and error mapping are S3's code paths, and
//! the shared contract tests pin it like every other backend.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::memory::InMemory;

use super::{Location, ObjectStoreBackend, Storage};

/// What [`Storage::location`] shows for an in-memory repository. Not a path: nothing on disk.
const MEMORY_LOCATION: &str = "memory:";

impl Storage {
    /// An empty repository in memory; each call gets its own. Never fails a request, so no
    /// retry budget is needed.
    pub fn in_memory() -> Storage {
        let backend = ObjectStoreBackend::from_store(
            Arc::new(InMemory::new()),
            "repo",
            MEMORY_LOCATION.to_string(),
        );
        Storage::from_backend(
            Arc::new(backend),
            Location::Local(PathBuf::from(MEMORY_LOCATION)),
            Duration::ZERO,
        )
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::storage::contract::run_contract;

    #[tokio::test]
    async fn in_memory_backend_keeps_the_contract() {
        run_contract(&Storage::in_memory(), true).await;
    }

    #[tokio::test]
    async fn each_in_memory_repository_is_its_own() {
        let a = Storage::in_memory();
        let b = Storage::in_memory();
        a.put_if_absent("k", Bytes::from_static(b"x"))
            .await
            .unwrap();
        assert_eq!(b.head("k").await.unwrap(), None);
        // Clones share the repository, as clones of any `Storage` do.
        assert_eq!(a.clone().head("k").await.unwrap(), Some(1));
    }

    #[tokio::test]
    async fn requests_are_counted_by_kind() {
        let s = Storage::in_memory();
        s.put_if_absent("a/1", bytes::Bytes::from_static(b"abc"))
            .await
            .unwrap();
        let _ = s.put_if_absent("a/1", bytes::Bytes::new()).await;
        s.get("a/1").await.unwrap();
        s.head("a/2").await.unwrap();
        s.list("a/").await.unwrap();
        s.clone().delete("a/1").await.unwrap();
        let c = s.requests();
        assert_eq!(
            (c.put, c.get, c.head, c.list, c.delete),
            (2, 1, 1, 1, 1),
            "{c:?}"
        );
        assert_eq!((c.bytes_up, c.bytes_down), (3, 3));
    }
}
