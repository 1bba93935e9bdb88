//! Tests against real PostgreSQL 15 WAL (src/wal/testdata/pg15, made by generate.sh): the reader's
//! records must match pg_waldump's, and no mutation of the bytes may make it panic.

use super::testdata::*;
use super::*;

#[test]
fn records_match_pg_waldump_across_all_segments() {
    let segs = segments();
    let dump = waldump();
    let mut r = WalReader::new(SEG_SIZE, Lsn::from_segno(segs[0].0, SEG_SIZE)).unwrap();
    let mut got = Vec::new();
    let mut end = None;
    for (_, bytes) in &segs {
        r.feed(bytes);
        loop {
            match r.next_record().unwrap() {
                Next::Record(rec) => got.push(rec_line(&rec)),
                Next::NeedInput => break,
                Next::EndOfWal(e) => {
                    end = Some(e);
                    break;
                }
            }
        }
    }
    assert_eq!(got.len(), dump.len());
    for (g, d) in got.iter().zip(&dump) {
        assert_eq!(g, &d.key(), "reader vs pg_waldump");
    }
    // pg_waldump stopped with "invalid record length at 0/900118: wanted 24, got 0"
    assert_eq!(
        end,
        Some(EndOfWal {
            lsn: "0/900118".parse().unwrap(),
            reason: EndReason::ZeroRecord
        })
    );
}

#[test]
fn any_chunking_gives_the_same_records() {
    let segs = segments();
    let all: Vec<u8> = segs.iter().flat_map(|(_, b)| b.iter().copied()).collect();
    let start = Lsn::from_segno(segs[0].0, SEG_SIZE);
    let reference = read_all(start, &all, all.len());
    for chunk in [1usize, 7, 24, 4096, 8192, 8193, 100_000] {
        let got = read_all(start, &all, chunk);
        assert_eq!(got, reference, "chunk size {chunk}");
    }
}

#[test]
fn starting_mid_stream_skips_the_continued_record() {
    // Segment 8 starts with the tail of the 20 kB "cross" message begun in segment 7.
    let segs = segments();
    let (segno, bytes) = &segs[1];
    let mut r = WalReader::new(SEG_SIZE, Lsn::from_segno(*segno, SEG_SIZE)).unwrap();
    r.feed(bytes);
    let Next::Record(first) = r.next_record().unwrap() else {
        panic!("no record")
    };
    assert_eq!(first.lsn, "0/802FE8".parse().unwrap()); // RESTORE_POINT rp2
                                                        // Starting at a known record start works too, with an exact xl_prev check.
    let start: Lsn = "0/802FE8".parse().unwrap();
    let mut r = WalReader::new(SEG_SIZE, start).unwrap();
    r.set_prev_record("0/7FE148".parse().unwrap());
    r.feed(&bytes[start.segment_offset(SEG_SIZE) as usize..]);
    let Next::Record(first) = r.next_record().unwrap() else {
        panic!("no record")
    };
    assert_eq!(first.lsn, start);
}

fn read_all(start: Lsn, all: &[u8], chunk: usize) -> Vec<(Lsn, Lsn, u32)> {
    let mut r = WalReader::new(SEG_SIZE, start).unwrap();
    let mut out = Vec::new();
    for c in all.chunks(chunk) {
        r.feed(c);
        while let Next::Record(rec) = r.next_record().unwrap() {
            out.push((rec.lsn, rec.end_lsn, rec.xl_crc));
        }
    }
    out
}

/// Reader's view of a record in the same shape as [`DumpLine::key`].
fn rec_line(rec: &Record<'_>) -> (Lsn, Lsn, String, u32, u32) {
    (
        rec.lsn,
        rec.xl_prev,
        rmgr_name(rec.xl_rmid).unwrap_or("?").to_string(),
        rec.xl_tot_len,
        rec.xl_xid,
    )
}

/// Transaction ends as pg_waldump describes them: `COMMIT 2026-11-23 03:17:19.864997 UTC; …` or
/// `COMMIT_PREPARED 731: 2026-…`.
fn dump_xact_ends(dump: &[DumpLine]) -> Vec<(Lsn, XactKind, u32, chrono::DateTime<chrono::Utc>)> {
    let mut out = Vec::new();
    for d in dump.iter().filter(|d| d.rmgr == "Transaction") {
        let (op, rest) = d.desc.split_once(' ').unwrap_or((&d.desc, ""));
        let kind = match op {
            "COMMIT" => XactKind::Commit,
            "ABORT" => XactKind::Abort,
            "COMMIT_PREPARED" => XactKind::CommitPrepared,
            "ABORT_PREPARED" => XactKind::AbortPrepared,
            _ => continue,
        };
        let (xid, rest) = match rest.split_once(": ") {
            Some((x, r)) if x.bytes().all(|b| b.is_ascii_digit()) => (x.parse().unwrap(), r),
            _ => (d.xid, rest),
        };
        let ts = rest
            .split(';')
            .next()
            .unwrap()
            .trim()
            .trim_end_matches(" UTC");
        let t = chrono::NaiveDateTime::parse_from_str(ts, "%Y-%m-%d %H:%M:%S%.f")
            .unwrap()
            .and_utc();
        out.push((d.lsn, kind, xid, t));
    }
    out
}

#[test]
fn commit_and_abort_timestamps_match_pg_waldump() {
    let segs = segments();
    let expected = dump_xact_ends(&waldump());
    assert!(expected.iter().any(|e| e.1 == XactKind::Abort));
    assert!(expected
        .iter()
        .any(|e| e.1 == XactKind::CommitPrepared && e.2 == 731));
    assert!(expected
        .iter()
        .any(|e| e.1 == XactKind::AbortPrepared && e.2 == 732));
    let mut r = WalReader::new(SEG_SIZE, Lsn::from_segno(segs[0].0, SEG_SIZE)).unwrap();
    let mut got = Vec::new();
    let mut restore_points = Vec::new();
    for (_, b) in &segs {
        r.feed(b);
        while let Next::Record(rec) = r.next_record().unwrap() {
            match decode_event(&rec) {
                Some(WalEvent::XactEnd {
                    kind,
                    xid,
                    xact_time,
                }) => got.push((rec.lsn, kind, xid, pg_timestamp_to_utc(xact_time).unwrap())),
                Some(WalEvent::RestorePoint { name, .. }) => restore_points.push(name),
                _ => {}
            }
        }
    }
    assert_eq!(got, expected);
    assert_eq!(restore_points, ["rp1", "rp2"]);
}

#[test]
fn segment_summaries_with_and_without_tails() {
    let segs = segments();
    let dump = waldump();
    // In order, handing each tail to the next segment: every record counted exactly once.
    let mut tail = None;
    let mut sums = Vec::new();
    for (_, b) in &segs {
        let s = summarize_segment(b, tail.as_ref()).unwrap();
        assert!(s.error.is_none(), "{:?}", s.error);
        tail = s.tail;
        sums.push(s.summary);
    }
    assert_eq!(
        sums.iter().map(|s| s.record_count).sum::<u64>(),
        dump.len() as u64
    );
    let lsn = |s: &str| s.parse::<Lsn>().unwrap();
    let [s7, s8, s9] = &sums[..] else {
        panic!("three segments")
    };
    assert_eq!(
        (s7.timeline, s7.pg_major, s7.skipped_continuation.clone()),
        (1, 15, None)
    );
    assert_eq!(s7.first_record_lsn, Some(lsn("0/700028")));
    assert_eq!(
        s7.end,
        SegmentEnd::Continues {
            next_record: lsn("0/7FE148")
        }
    );
    assert_eq!(
        s7.restore_points
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        ["rp1"]
    );
    assert_eq!(
        s7.checkpoints,
        [CheckpointMark {
            lsn: lsn("0/72CA38"),
            redo: lsn("0/72CA00"),
            shutdown: false
        }]
    );
    let xact_ends: u64 = sums.iter().map(|s| s.commit_count + s.abort_count).sum();
    assert_eq!(xact_ends, dump_xact_ends(&dump).len() as u64);
    assert_eq!(s7.abort_count, 2); // the rollback and ROLLBACK PREPARED
                                   // The "cross" message starts in 7 and ends in 8, so it is 8's first record.
    assert_eq!(s8.first_record_lsn, Some(lsn("0/7FE148")));
    assert_eq!(
        (s8.last_record_lsn, s8.end_lsn),
        (Some(lsn("0/803050")), Some(lsn("0/900000")))
    );
    assert!(s8.ends_with_switch);
    assert_eq!(s8.end, SegmentEnd::Switch);
    assert_eq!(
        s9.end,
        SegmentEnd::EndOfWal {
            lsn: lsn("0/900118"),
            reason: EndReason::ZeroRecord
        }
    );
    assert_eq!(
        s9.checkpoints,
        [CheckpointMark {
            lsn: lsn("0/9000A0"),
            redo: lsn("0/9000A0"),
            shutdown: true
        }]
    );
    assert_eq!(
        s9.first_xact.as_ref().map(|x| (x.lsn, x.xid)),
        Some((lsn("0/900070"), 733))
    );

    // Without the tail, 8 skips the continuation and starts at the first record beginning in it.
    let alone = summarize_segment(&segs[1].1, None).unwrap().summary;
    assert_eq!(
        alone.skipped_continuation,
        Some(SkippedContinuation { rem_len: 0x2FA3 })
    );
    assert_eq!(alone.first_record_lsn, Some(lsn("0/802FE8")));
    assert_eq!(alone.record_count, s8.record_count - 1);

    // JSON round trip, with LSNs and times in their human forms.
    let json = serde_json::to_string_pretty(s7).unwrap();
    assert!(
        json.contains("\"first_record_lsn\": \"0/700028\""),
        "{json}"
    );
    let back: SegmentSummary = serde_json::from_str(&json).unwrap();
    assert_eq!(&back, s7);

    // A tail that does not end where the segment starts is refused.
    let t7 = summarize_segment(&segs[0].1, None).unwrap().tail.unwrap();
    assert!(matches!(
        summarize_segment(&segs[2].1, Some(&t7)),
        Err(SummaryError::TailMismatch { .. })
    ));
}
