//! A server that answers in German (`lc_messages = 'de_DE.UTF-8'`, which a replication role
//! cannot override): `pitr stream` must fail with the same exit codes and hints as against an
//! English server, because it reads the server's SQLSTATE, not its words. Needs the locale
//! (scripts/install-test-deps.sh generates it); Debian's postgresql-15 ships the translations.

use std::process::Output;

use crate::common::{Backend, TestRepo};
use crate::harness::{pitr, PgCluster};

/// What the user sees of one failure, apart from the server's own words.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    case: &'static str,
    code: i32,
    hint: String,
}

fn seen(case: &'static str, out: &Output) -> (Seen, String) {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let errors = stderr
        .lines()
        .filter(|l| l.starts_with("pitr ") && l.contains(": error: "))
        .count();
    let hints: Vec<&str> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("hint: "))
        .collect();
    assert_eq!(errors, 1, "{case}: one error line\n{stderr}");
    assert!(hints.len() <= 1, "{case}: at most one hint line\n{stderr}");
    let s = Seen {
        case,
        code: out.status.code().unwrap_or(-1),
        hint: hints.first().unwrap_or(&"").to_string(),
    };
    (s, stderr)
}

fn cluster(lc_messages: &str, extra: &[&str]) -> PgCluster {
    let mut b = PgCluster::builder()
        .wal_segsize(1)
        .conf(format!("lc_messages = '{lc_messages}'"))
        .hba("host replication repl 127.0.0.1/32 scram-sha-256");
    for c in extra {
        b = b.conf(*c);
    }
    b.start().unwrap()
}

fn psql1(pg: &PgCluster, sql: &str) -> String {
    pg.psql(sql)
        .unwrap_or_else(|e| panic!("{sql}: {e:#}\n{}", pg.log_contents()))
}

fn stream(repo: &TestRepo, conninfo: &str, extra: &[&str]) -> Output {
    let mut args = vec!["stream", "-d", conninfo];
    args.extend(extra);
    pitr(repo.args(&args), &repo.env)
}

/// The repository ends with a segment the server has since removed, and a new slot holds only
/// later WAL (as after a slot was dropped and recreated while `pitr stream` was down).
fn removed_wal(pg: &PgCluster) -> Output {
    let repo = TestRepo::new(Backend::Local);
    let name = psql1(
        pg,
        "select pg_walfile_name(l) from (select pg_switch_wal() l) s",
    );
    let path = pg.data_dir().join("pg_wal").join(&name);
    let out = pitr(
        repo.args(&["archive-push", path.to_str().unwrap()]),
        &repo.env,
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    psql1(pg, "create table big(i int, pad text)");
    for _ in 0..6 {
        psql1(
            pg,
            "insert into big select g, repeat('z', 500) from generate_series(1, 3000) g",
        );
        psql1(pg, "select pg_switch_wal()");
    }
    psql1(pg, "checkpoint");
    psql1(pg, "checkpoint");
    psql1(
        pg,
        "select pg_create_physical_replication_slot('pitr', true)",
    );
    stream(&repo, &pg.conninfo(), &["--slot", "pitr"])
}

/// Every case, against a server speaking `lc_messages`: what pitr showed, and its stderr.
fn cases(lc_messages: &str) -> Vec<(Seen, String)> {
    let mut pg = cluster(lc_messages, &[]);
    psql1(
        &pg,
        "create role repl login replication password 'right-password'",
    );
    let repo = TestRepo::new(Backend::Local);
    let mut out = vec![seen(
        "missing slot",
        &stream(&repo, &pg.conninfo(), &["--slot", "nosuch"]),
    )];
    let wrong = format!(
        "host=127.0.0.1 port={} user=repl password=wrong-password sslmode=disable",
        pg.port()
    );
    out.push(seen(
        "wrong password",
        &stream(&repo, &wrong, &["--create-slot"]),
    ));
    out.push(seen("removed WAL", &removed_wal(&pg)));
    pg.append_conf("max_wal_senders = 0").unwrap();
    pg.restart().unwrap();
    out.push(seen(
        "max_wal_senders = 0",
        &stream(&repo, &pg.conninfo(), &["--create-slot"]),
    ));
    let minimal = cluster(lc_messages, &["wal_level = minimal", "max_wal_senders = 0"]);
    out.push(seen(
        "wal_level = minimal",
        &stream(&repo, &minimal.conninfo(), &["--create-slot"]),
    ));
    out
}

#[test]
fn a_german_server_gets_the_same_exit_codes_and_hints_as_an_english_one() {
    // First, that the server really answers in German: otherwise this test proves nothing.
    let probe = cluster("de_DE.UTF-8", &[]);
    let e = probe.psql("select 1/0").expect_err("division by zero");
    assert!(
        format!("{e:#}").contains("Division durch Null"),
        "the server does not answer in German (is the de_DE.UTF-8 locale generated? \
         run scripts/install-test-deps.sh): {e:#}"
    );
    drop(probe);

    let (english, german) = std::thread::scope(|s| {
        let en = s.spawn(|| cases("C"));
        let de = s.spawn(|| cases("de_DE.UTF-8"));
        (en.join().unwrap(), de.join().unwrap())
    });
    let expected = [
        ("missing slot", 7, "--create-slot"),
        ("wrong password", 7, "password"),
        ("removed WAL", 11, "--accept-gap"),
        ("max_wal_senders = 0", 7, "max_wal_senders > 0"),
        ("wal_level = minimal", 7, "wal_level = replica"),
    ];
    for ((en, en_err), (de, de_err)) in english.iter().zip(&german) {
        let (case, code, hint) = expected
            .iter()
            .find(|(c, ..)| *c == en.case)
            .expect("an expected case");
        assert_eq!(en.code, *code, "{case} in English:\n{en_err}");
        assert!(en.hint.contains(hint), "{case} in English:\n{en_err}");
        assert_eq!(de, en, "{case}: German\n{de_err}\nEnglish\n{en_err}");
    }
    assert_eq!(english.len(), expected.len());
    // The server's own words reached pitr in German: the classification above did not read
    // English text.
    let stderr_of = |case: &str| &german.iter().find(|(s, _)| s.case == case).unwrap().1;
    for (case, word) in [
        ("wrong password", "Passwort-Authentifizierung"),
        ("removed WAL", "WAL-Segment"),
        ("max_wal_senders = 0", "Standby-Verbindungen"),
    ] {
        assert!(
            stderr_of(case).contains(word),
            "{case}: {word:?} not in\n{}",
            stderr_of(case)
        );
    }
}
