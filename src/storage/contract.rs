//! The storage contract, run against every backend. The S3 run lives in the integration tests,
//! which call [`run_contract`] with a real S3-compatible server.

use bytes::Bytes;

use super::{Storage, StorageError};

/// Exercises every promise in the module docs of `storage`. Panics on the first broken one.
///
/// `atomic_create` says whether the server behind `s` makes conditional creates atomic under
/// concurrency. The local backend (link(2)), AWS S3, R2, MinIO, GCS and Azure do; the s3s-fs
/// test server checks then writes, so under a race every writer may win there. Sequential
/// refusal of an existing object is checked on every backend.
pub async fn run_contract(s: &Storage, atomic_create: bool) {
    let key = "contract/a/b/object";
    assert!(matches!(
        s.get(key).await,
        Err(StorageError::NotFound { .. })
    ));
    assert_eq!(s.head(key).await.unwrap(), None);

    s.put_if_absent(key, Bytes::from_static(b"first"))
        .await
        .unwrap();
    assert_eq!(s.get(key).await.unwrap(), Bytes::from_static(b"first"));
    assert_eq!(s.head(key).await.unwrap(), Some(5));
    // Into a reused buffer: exactly the object, whatever the buffer held before.
    let got = s
        .get_into(key, b"a longer leftover".to_vec())
        .await
        .unwrap();
    assert_eq!(got, Bytes::from_static(b"first"));
    assert!(matches!(
        s.get_into("contract/missing", Vec::with_capacity(64)).await,
        Err(StorageError::NotFound { .. })
    ));

    let again = s.put_if_absent(key, Bytes::from_static(b"second")).await;
    assert!(
        matches!(again, Err(StorageError::AlreadyExists { .. })),
        "{again:?}"
    );
    assert_eq!(
        s.get(key).await.unwrap(),
        Bytes::from_static(b"first"),
        "put_if_absent replaced an object"
    );

    s.put_overwrite("contract/mutable", Bytes::from_static(b"1"))
        .await
        .unwrap();
    s.put_overwrite("contract/mutable", Bytes::from_static(b"2"))
        .await
        .unwrap();
    assert_eq!(
        s.get("contract/mutable").await.unwrap(),
        Bytes::from_static(b"2")
    );

    // Racing writers: exactly one wins.
    let racers: Vec<_> = (0..8u8)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                s.put_if_absent("contract/race", Bytes::from(vec![i; 1000]))
                    .await
            })
        })
        .collect();
    let mut wins = 0;
    for r in racers {
        match r.await.unwrap() {
            Ok(()) => wins += 1,
            Err(StorageError::AlreadyExists { .. }) => {}
            Err(e) => panic!("unexpected error in race: {e}"),
        }
    }
    if atomic_create {
        assert_eq!(wins, 1, "exactly one racing put_if_absent must win");
    } else {
        assert!(wins >= 1, "at least one racing put_if_absent must win");
    }
    // Whoever won, the object is one writer's bytes whole, never a mix or a torn write.
    let raced = s.get("contract/race").await.unwrap();
    assert!(
        raced.len() == 1000 && raced.iter().all(|b| *b == raced[0]) && raced[0] < 8,
        "a raced object is not one writer's bytes"
    );

    let mut listed: Vec<String> = s
        .list("contract/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        ["contract/a/b/object", "contract/mutable", "contract/race"]
    );
    assert!(s.list("nothing-here/").await.unwrap().is_empty());
    let mut folders = s.list_folders("contract/").await.unwrap();
    folders.sort();
    assert_eq!(folders, ["a"], "only folders, not objects, one level deep");
    assert!(s.list_folders("nothing-here/").await.unwrap().is_empty());

    s.delete(key).await.unwrap();
    s.delete(key).await.unwrap();
    assert_eq!(s.head(key).await.unwrap(), None);
    s.check_reachable().await.unwrap();
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::storage::Location;

    #[tokio::test]
    async fn local_backend_keeps_the_contract() {
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::Local(dir.path().join("repo"));
        let s = Storage::open(&loc, Duration::from_secs(1)).unwrap();
        run_contract(&s, true).await;
        // No temporary file survives a successful run.
        let leftovers: Vec<_> = walk(dir.path())
            .into_iter()
            .filter(|p| p.contains(".tmp."))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    /// An object streamed in pieces over several writeback steps (the writeback thread runs)
    /// is published whole and byte for byte, with no temporary file left; one dropped half
    /// way is not published at all.
    #[tokio::test]
    async fn a_local_upload_over_several_writeback_steps_is_published_whole() {
        let dir = tempfile::tempdir().unwrap();
        let loc = Location::Local(dir.path().join("repo"));
        let s = Storage::open(&loc, Duration::from_secs(1)).unwrap();
        let data: Vec<u8> = (0..(3 << 20) + 4321u32)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let (s2, d2) = (s.clone(), data.clone());
        tokio::task::spawn_blocking(move || {
            let mut up = s2.upload("big/object").unwrap().unwrap();
            for piece in d2.chunks(100_000) {
                up.write(piece).unwrap();
            }
            up.write_at(b"head", 0).unwrap();
            up.finish_if_absent().unwrap();
            let mut half = s2.upload("big/dropped").unwrap().unwrap();
            half.write(&d2[..2 << 20]).unwrap();
        })
        .await
        .unwrap();
        let mut expected = data;
        expected[..4].copy_from_slice(b"head");
        assert_eq!(s.get("big/object").await.unwrap(), expected);
        assert_eq!(s.head("big/dropped").await.unwrap(), None);
        let leftovers: Vec<_> = walk(dir.path())
            .into_iter()
            .filter(|p| p.contains(".tmp."))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    fn walk(p: &std::path::Path) -> Vec<String> {
        let mut out = vec![];
        for e in std::fs::read_dir(p).unwrap() {
            let e = e.unwrap();
            out.push(e.path().display().to_string());
            if e.file_type().unwrap().is_dir() {
                out.extend(walk(&e.path()));
            }
        }
        out
    }
}
