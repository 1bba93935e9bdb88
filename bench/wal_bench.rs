//! Reader / summarizer micro-benchmark over real WAL segments, for profiling `src/wal` without
//! the rest of `pitr verify --full` (LIST, lz4, frame CRCs) around it.
//!
//!   cargo run --release --example wal_bench -- DIR [ROUNDS] [summarize]
//!
//! DIR holds raw segments (e.g. from `KEEP_WAL=DIR bench/verify.sh`). Each round summarizes every
//! segment in name order, passing the tail along as archive-push and verify do, then reads the
//! same bytes with a bare `WalReader` fed 1 MiB at a time, then sums them (a floor: the memory
//! traffic alone). The segments are read one after the other, so they come from RAM, not the
//! CPU caches. Then two segments are summarized again and again, in cache: the one with the most
//! records (small records: the per-record cost) and the one with the fewest (large records
//! crossing pages: the per-byte cost), next to one CRC-32C pass over the segment. Prints the best
//! round of each. With `summarize` only the first pass runs, for
//! `perf record -g target/release/examples/wal_bench DIR 20 summarize`.
//!
//!   cargo run --release --example wal_bench -- DIR compare REPO
//!
//! checks instead that summarizing each segment fed in the pieces `pitr verify --full` walks
//! (the 256 KiB blocks of an lz4-blocks frame), the tail carried, gives byte for byte the JSON
//! of the summary stored in REPO (a local-directory repository the segments were pushed into,
//! by any pitr), and the same as summarizing the whole segment.

use std::time::{Duration, Instant};

use pitr::repo::StoredSummary;
use pitr::wal::{
    summarize_segment, Lsn, Next, SegmentSummarizer, SegmentSummary, SegmentTail, WalReader,
};

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .expect("usage: wal_bench DIR [ROUNDS] [summarize]");
    let second = args.next();
    if second.as_deref() == Some("compare") {
        return compare(
            &dir,
            &args.next().expect("usage: wal_bench DIR compare REPO"),
        );
    }
    let rounds: usize = second.map_or(5, |r| r.parse().expect("ROUNDS"));
    let only_summarize = args.next().as_deref() == Some("summarize");
    let names = segment_names(&dir);
    let segs: Vec<Vec<u8>> = names
        .iter()
        .map(|n| std::fs::read(format!("{dir}/{n}")).expect("segment"))
        .collect();
    let seg_size = segs.first().expect("no segments in DIR").len() as u64;
    let bytes: u64 = segs.iter().map(|s| s.len() as u64).sum();

    let (mut best_sum, mut best_read, mut best_mem) = (Duration::MAX, Duration::MAX, Duration::MAX);
    let mut counts = vec![0u64; segs.len()];
    let (mut read_records, mut sink) = (0u64, 0u64);
    for _ in 0..rounds {
        let t0 = Instant::now();
        let mut tail: Option<SegmentTail> = None;
        for (s, count) in segs.iter().zip(&mut counts) {
            let x = summarize_segment(s, tail.as_ref()).expect("summarize");
            *count = x.summary.record_count;
            tail = x.tail;
        }
        best_sum = best_sum.min(t0.elapsed());
        if only_summarize {
            continue;
        }
        let t0 = Instant::now();
        read_records = read_all(&segs, seg_size);
        best_read = best_read.min(t0.elapsed());
        let t0 = Instant::now();
        sink = sink.wrapping_add(segs.iter().map(|s| sum(s)).fold(0, u64::wrapping_add));
        best_mem = best_mem.min(t0.elapsed());
    }
    let records: u64 = counts.iter().sum();
    let per_seg = |d: Duration| d.as_secs_f64() * 1000.0 / segs.len() as f64;
    let mbs = |d: Duration| bytes as f64 / 1e6 / d.as_secs_f64();
    println!(
        "{} segments, {} MiB, {records} records; best of {rounds}, segments from RAM",
        segs.len(),
        bytes >> 20
    );
    let line = |what: &str, d: Duration| {
        println!(
            "  {what:<32} {:7.3} ms/segment {:8.1} MB/s",
            per_seg(d),
            mbs(d)
        )
    };
    line("summarize_segment, tail carried", best_sum);
    if only_summarize {
        return;
    }
    line(
        &format!("WalReader feed ({read_records} records)"),
        best_read,
    );
    line("floor: summing the bytes", best_mem);

    let most = (0..segs.len()).max_by_key(|&i| counts[i]).unwrap_or(0);
    let fewest = (0..segs.len())
        .filter(|&i| counts[i] > 0)
        .min_by_key(|&i| counts[i])
        .unwrap_or(0);
    println!("in cache, the same segment again and again:");
    for (what, i) in [("most records", most), ("fewest records", fewest)] {
        let seg = &segs[i];
        let (mut best, mut best_crc) = (Duration::MAX, Duration::MAX);
        for _ in 0..rounds * 4 {
            let t0 = Instant::now();
            let n = summarize_segment(seg, None)
                .expect("summarize")
                .summary
                .record_count;
            best = best.min(t0.elapsed());
            sink = sink.wrapping_add(n);
            let t0 = Instant::now();
            sink = sink.wrapping_add(u64::from(crc_fast::crc32_iscsi(seg)));
            best_crc = best_crc.min(t0.elapsed());
        }
        println!(
            "  {} ({what}, {} records): summarize {:.3} ms = {:.1} ns/record; one CRC-32C pass {:.3} ms",
            names[i],
            counts[i],
            best.as_secs_f64() * 1e3,
            best.as_nanos() as f64 / counts[i].max(1) as f64,
            best_crc.as_secs_f64() * 1e3,
        );
    }
    std::hint::black_box(sink);
}

/// The WAL segment files in `dir` (24 hex digits), in order.
fn segment_names(dir: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("DIR")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect();
    names.sort();
    names
}

/// The `compare` mode (see the top of the file).
fn compare(dir: &str, repo: &str) {
    let names = segment_names(dir);
    let (mut tail, mut whole_tail): (Option<SegmentTail>, Option<SegmentTail>) = (None, None);
    let (mut same, mut records) = (0, 0);
    for n in &names {
        let seg = std::fs::read(format!("{dir}/{n}")).expect("segment");
        let mut s = SegmentSummarizer::new(&seg, seg.len() as u64, tail.as_ref()).expect("start");
        for piece in seg.chunks(pitr::codec::BLOCK_LEN) {
            s.feed(piece);
        }
        let walked = s.finish().expect("summarize");
        let whole = summarize_segment(&seg, whole_tail.as_ref()).expect("summarize");
        let json = |s: &SegmentSummary| serde_json::to_vec(s).expect("json");
        assert_eq!(json(&walked.summary), json(&whole.summary), "{n}: whole");
        let key = format!("{repo}/wal/{}/{n}.summary", &n[..16]);
        let stored = pitr::codec::decode(&std::fs::read(&key).expect("stored summary"))
            .expect("summary frame");
        let stored: StoredSummary = serde_json::from_slice(&stored).expect("summary JSON");
        assert_eq!(json(&walked.summary), json(&stored.summary), "{n}: stored");
        same += 1;
        records += walked.summary.record_count;
        tail = walked.tail;
        whole_tail = whole.tail;
    }
    println!(
        "{same} of {} summaries identical to the stored ones ({records} records)",
        names.len()
    );
}

/// Every record of the segments with one reader fed 1 MiB at a time (copying, as streaming
/// callers do).
fn read_all(segs: &[Vec<u8>], seg_size: u64) -> u64 {
    let start = Lsn(u64::from_le_bytes(segs[0][8..16].try_into().unwrap()));
    let mut r = WalReader::new(seg_size, start).expect("reader");
    let mut n = 0;
    for s in segs {
        for slice in s.chunks(1 << 20) {
            r.feed(slice);
            loop {
                match r.next_record() {
                    Ok(Next::Record(_)) => n += 1,
                    Ok(Next::NeedInput) => break,
                    Ok(Next::EndOfWal(_)) | Err(_) => return n,
                }
            }
        }
    }
    n
}

fn sum(s: &[u8]) -> u64 {
    s.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .fold(0, u64::wrapping_add)
}
