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

/// Reads `bytes` (starting at `start`) to the end; returns the record LSNs and how it stopped.
fn outcome(start: Lsn, bytes: &[u8]) -> (Vec<Lsn>, Result<Option<EndOfWal>, WalError>) {
    let mut r = WalReader::new(SEG_SIZE, start).unwrap();
    r.feed(bytes);
    let mut lsns = Vec::new();
    loop {
        match r.next_record() {
            Ok(Next::Record(rec)) => lsns.push(rec.lsn),
            Ok(Next::NeedInput) => return (lsns, Ok(None)),
            Ok(Next::EndOfWal(e)) => return (lsns, Ok(Some(e))),
            Err(e) => return (lsns, Err(e)),
        }
    }
}

fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn corruption_is_reported_with_its_lsn() {
    let segs = segments();
    let start = Lsn::from_segno(segs[0].0, SEG_SIZE);
    let lsn = |s: &str| s.parse::<Lsn>().unwrap();
    let at = |l: &str| (lsn(l).0 - start.0) as usize;
    let seg = &segs[0].1;

    // A flipped byte in the commit record at 0/723DA0 breaks its CRC.
    let mut b = seg.clone();
    b[at("0/723DA0") + 30] ^= 0x40;
    let (lsns, res) = outcome(start, &b);
    assert!(matches!(res, Err(WalError::BadCrc { lsn: l, .. }) if l == lsn("0/723DA0")));
    assert_eq!(lsns.last(), Some(&lsn("0/723D40")));

    // A wrong xl_prev.
    let mut b = seg.clone();
    b[at("0/723DA0") + 8] ^= 0x08;
    assert!(
        matches!(outcome(start, &b).1, Err(WalError::BadPrevLink { lsn: l, .. }) if l == lsn("0/723DA0"))
    );

    // A page of a recycled segment (older pageaddr) and a timeline going backwards.
    let page = at("0/702000");
    let mut b = seg.clone();
    b[page + 8..page + 16].copy_from_slice(&0x502000u64.to_le_bytes());
    assert!(
        matches!(outcome(start, &b).1, Err(WalError::StalePage { page: p, found }) if p == lsn("0/702000") && found == lsn("0/502000"))
    );
    let mut b = seg.clone();
    b[page + 4..page + 8].copy_from_slice(&0u32.to_le_bytes());
    assert!(matches!(
        outcome(start, &b).1,
        Err(WalError::TimelineRegressed {
            tli: 0,
            prev_tli: 1,
            ..
        })
    ));
    let mut b = seg.clone();
    put_u16(&mut b, page, 0xD106);
    assert!(matches!(
        outcome(start, &b).1,
        Err(WalError::MagicChanged {
            expected: 0xD110,
            found: 0xD106,
            ..
        })
    ));
    let mut b = seg.clone();
    put_u16(&mut b, page + 2, 0x0010);
    assert!(matches!(
        outcome(start, &b).1,
        Err(WalError::BadPageFlags { info: 0x0010, .. })
    ));

    // The 200 kB message at 0/7345A0 spans 25 pages: break the contrecord chain on one.
    let cont = at("0/73A000");
    let mut b = seg.clone();
    b[cont + 16] ^= 1;
    assert!(
        matches!(outcome(start, &b).1, Err(WalError::BadContrecordLength { lsn: l, .. }) if l == lsn("0/7345A0"))
    );
    let mut b = seg.clone();
    put_u16(&mut b, cont + 2, 0);
    assert!(
        matches!(outcome(start, &b).1, Err(WalError::MissingContrecord { lsn: l, .. }) if l == lsn("0/7345A0"))
    );
    // ... or make the WAL end (zeros) in the middle of it: a torn record, not corruption.
    let mut b = seg.clone();
    b[cont..].fill(0);
    let (lsns, res) = outcome(start, &b);
    assert_eq!(
        res,
        Ok(Some(EndOfWal {
            lsn: lsn("0/7345A0"),
            reason: EndReason::TornRecord
        }))
    );
    assert_eq!(lsns.last(), Some(&lsn("0/734568")));
    // Zeros at a page where a record should start.
    let mut b = seg.clone();
    b[page..].fill(0);
    let (_, res) = outcome(start, &b);
    assert!(matches!(
        res,
        Ok(Some(EndOfWal {
            reason: EndReason::ZeroRecord | EndReason::ZeroPage | EndReason::TornRecord,
            ..
        }))
    ));
}

#[test]
fn overwritten_contrecord_is_skipped_like_postgres_does() {
    // Simulate crash recovery having abandoned the 200 kB message at 0/7345A0: its second page
    // is flagged XLP_FIRST_IS_OVERWRITE_CONTRECORD and starts with XLOG_OVERWRITE_CONTRECORD,
    // whose xl_prev is the last valid record before the abandoned one.
    let segs = segments();
    let start = Lsn::from_segno(segs[0].0, SEG_SIZE);
    let mut b = segs[0].1.clone();
    let page = (0x736000 - start.0) as usize;
    b[page..].fill(0);
    b[page..page + 2].copy_from_slice(&0xD110u16.to_le_bytes());
    put_u16(&mut b, page + 2, super::XLP_FIRST_IS_OVERWRITE_CONTRECORD);
    b[page + 4..page + 8].copy_from_slice(&1u32.to_le_bytes());
    b[page + 8..page + 16].copy_from_slice(&0x736000u64.to_le_bytes());
    let mut main = 0x7345A0u64.to_le_bytes().to_vec();
    main.extend_from_slice(&42i64.to_le_bytes());
    let rec = super::record::tests::build_record(
        0,
        0xD0,
        0,
        Lsn(0x734568),
        &super::record::tests::main_data_body(&main),
    );
    b[page + 24..page + 24 + rec.len()].copy_from_slice(&rec);

    let mut r = WalReader::new(SEG_SIZE, start).unwrap();
    r.feed(&b);
    let mut last = None;
    while let Next::Record(rec) = r.next_record().unwrap() {
        last = Some((rec.lsn, decode_event(&rec)));
    }
    assert_eq!(
        last,
        Some((
            Lsn(0x736018),
            Some(WalEvent::OverwriteContrecord {
                overwritten: Lsn(0x7345A0),
                overwrite_time: 42
            })
        ))
    );
    assert_eq!(r.overwritten_record(), Some(Lsn(0x7345A0)));
}

/// Deterministic mutation fuzzing over real WAL: random byte flips, garbage runs, zeroed runs
/// and truncations, read with random chunk sizes. Nothing may panic, and whatever the reader
/// returns before stopping must be records that are in the unmutated WAL or contain the damage.
#[test]
fn mutated_wal_never_panics() {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let segs = segments();
    let start = Lsn::from_segno(segs[0].0, SEG_SIZE);
    // The first 256 kB of segment 7: many small records and most of a 25-page one.
    let base = &segs[0].1[..256 * 1024];
    let (clean, _) = outcome(start, base);
    for seed in 0..400u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut b = base.to_vec();
        let mut first_damage = b.len();
        for _ in 0..rng.gen_range(1..4) {
            if b.is_empty() {
                break;
            }
            let at = rng.gen_range(0..b.len());
            first_damage = first_damage.min(at);
            match rng.gen_range(0..4) {
                0 => b[at] ^= 1 << rng.gen_range(0..8),
                1 => {
                    let end = (at + rng.gen_range(1..64)).min(b.len());
                    rng.fill(&mut b[at..end]);
                }
                2 => {
                    let end = (at + rng.gen_range(1..20_000)).min(b.len());
                    b[at..end].fill(0);
                }
                _ => b.truncate(at),
            }
        }
        let chunk = rng.gen_range(1..40_000);
        let mut r = WalReader::new(SEG_SIZE, start).unwrap();
        let mut seen = Vec::new();
        for c in b.chunks(chunk) {
            r.feed(c);
            while let Ok(Next::Record(rec)) = r.next_record() {
                let _ = decode_event(&rec);
                let _ = rec.blocks();
                seen.push(rec.lsn);
            }
        }
        // Records wholly before the first damaged byte are read exactly as without damage
        // (200 100 bytes bounds the longest record in the window, with its page headers).
        let damage_lsn = start.0 + first_damage as u64;
        let before: Vec<_> = clean
            .iter()
            .copied()
            .take_while(|l| l.0 + 200_100 < damage_lsn)
            .collect();
        assert!(seen.starts_with(&before), "seed {seed}");
    }
    // Whole mutated segments through the summarizer.
    for seed in 0..20u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut b = segs[0].1.clone();
        for _ in 0..8 {
            let at = rng.gen_range(0..b.len());
            b[at] = rng.gen();
        }
        let _ = summarize_segment(&b, None);
        b.truncate(rng.gen_range(0..b.len()));
        assert!(summarize_segment(&b, None).is_err());
    }
}
