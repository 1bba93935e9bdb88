//! pitr on a network that loses answers: a proxy in front of the S3 server lets the first PUT of
//! every object through but cuts the connection as the server's answer arrives, so the object
//! is stored and pitr never hears. pitr retries, the server refuses the conditional create
//! (412) for pitr's own object, and pitr must see identical content and carry on.

use std::fs;

use crate::archive::{cluster_with_segments, copy_segment};
use crate::common::{assert_code, switch_and_wait, Backend, TestRepo};
use crate::harness::{Proxy, TestDir};
use crate::pitr::{insert, ok, primary, restore_and_read, run};

/// An S3 repository whose pitr commands go through a proxy that loses the first answer to each
/// PUT.
fn flaky_repo() -> (TestRepo, Proxy) {
    let mut repo = TestRepo::new(Backend::S3);
    let proxy = Proxy::lose_first_put_response(repo.s3.as_ref().unwrap().port());
    repo.set_s3_endpoint(&proxy.endpoint());
    (repo, proxy)
}

/// Asserts that the proxy lost the answer to a PUT of a key containing `part`.
#[track_caller]
fn assert_cut(proxy: &Proxy, part: &str) {
    let cut = proxy.cut_keys();
    assert!(
        cut.iter().any(|k| k.contains(part)),
        "no PUT answer lost for {part}; lost: {cut:?}"
    );
    assert!(proxy.errors().is_empty(), "{:?}", proxy.errors());
}

#[test]
fn archive_push_survives_lost_put_answers() {
    let (repo, proxy) = flaky_repo();
    let (pg, segs) = cluster_with_segments();
    let work = TestDir::new();
    for name in &segs {
        let seg = copy_segment(&pg, name, work.path());
        let o = repo.pitr(&["archive-push", seg.to_str().unwrap()]);
        assert_code(&o, 0);
        assert_cut(&proxy, name);
    }
    // The stored segments are the pushed bytes, read back through the proxy.
    for name in &segs {
        let dest = work.join(format!("{name}.restored"));
        let o = repo.pitr(&["archive-get", name, dest.to_str().unwrap()]);
        assert_code(&o, 0);
        assert!(
            fs::read(&dest).unwrap() == fs::read(work.join(name)).unwrap(),
            "{name} differs after archive-get"
        );
    }
    assert_code(&repo.pitr(&["verify"]), 0);
}

#[test]
fn backup_survives_lost_put_answers() {
    let (repo, proxy) = flaky_repo();
    let pg = primary(&repo);
    pg.psql("create table marks(id serial primary key, phase text not null)")
        .unwrap();
    insert(&pg, "a");
    ok(&repo, &["backup", "-d", &pg.conninfo()]);
    // Every part and the manifest of the backup lost their first answer.
    assert_cut(&proxy, "/base.tar/00000000");
    assert_cut(&proxy, "/backup_manifest");
    insert(&pg, "b");
    switch_and_wait(&pg);
    assert_code(&run(&repo, &["verify"]), 0);
    let work = TestDir::new();
    let (_restored, phases) = restore_and_read(&repo, &work, "latest", &[], false);
    assert_eq!(phases, "a:10,b:10");
}
