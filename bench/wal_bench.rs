//! Reader / summarizer micro-benchmark over real WAL segments, for profiling `src/wal` without
//! the rest of `pitr verify --full` (LIST, lz4, frame CRCs) around it.
//!
//!   cargo run --release --example wal_bench -- DIR [ROUNDS]
//!
//! DIR holds raw segments (e.g. from `KEEP_WAL=DIR bench/verify.sh`). Each round summarizes every
//! segment in name order, passing the tail along as archive-push and verify do, then reads the
//! same bytes with a bare `WalReader` fed 1 MiB at a time. Prints the best round of each: ms per
//! segment and MB/s. `perf record -g target/release/examples/wal_bench DIR 20` profiles it.

use std::time::{Duration, Instant};

use pitr::wal::{summarize_segment, Lsn, Next, SegmentTail, WalReader};

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("usage: wal_bench DIR [ROUNDS]");
    let rounds: usize = args.next().map_or(5, |r| r.parse().expect("ROUNDS"));
    // `summarize`: only the summarize pass, for profiling it alone.
    let only_summarize = args.next().as_deref() == Some("summarize");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .expect("DIR")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect();
    names.sort();
    let segs: Vec<Vec<u8>> = names
        .iter()
        .map(|n| std::fs::read(format!("{dir}/{n}")).expect("segment"))
        .collect();
    let seg_size = segs.first().expect("no segments in DIR").len() as u64;
    let bytes: u64 = segs.iter().map(|s| s.len() as u64).sum();

    let mut best_sum = Duration::MAX;
    let mut best_read = Duration::MAX;
    let (mut records, mut read_records) = (0u64, 0u64);
    let (mut best_cold_sum, mut cold_sink) = (Duration::MAX, 0u64);
    for _ in 0..rounds {
        let t0 = Instant::now();
        let mut tail: Option<SegmentTail> = None;
        records = 0;
        for s in &segs {
            let x = summarize_segment(s, tail.as_ref()).expect("summarize");
            records += x.summary.record_count;
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
        cold_sink += segs
            .iter()
            .map(|s| {
                s.chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                    .fold(0u64, u64::wrapping_add)
            })
            .fold(0u64, u64::wrapping_add);
        best_cold_sum = best_cold_sum.min(t0.elapsed());
    }
    // The same segment again and again: what it costs when the segment is still in the CPU
    // caches (archive-push has just read it), and two floors: one CRC-32C pass over the whole
    // segment, and summing its bytes.
    let hot = &segs[segs.len() / 2];
    let (mut best_hot, mut best_crc, mut best_sum8) = (Duration::MAX, Duration::MAX, Duration::MAX);
    let mut sink = 0u64;
    for _ in 0..if only_summarize { 0 } else { rounds * 2 } {
        let t0 = Instant::now();
        sink += summarize_segment(hot, None)
            .expect("summarize")
            .summary
            .record_count;
        best_hot = best_hot.min(t0.elapsed());
        let t0 = Instant::now();
        sink += u64::from(crc_fast::crc32_iscsi(hot));
        best_crc = best_crc.min(t0.elapsed());
        let t0 = Instant::now();
        sink += hot
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .fold(0u64, u64::wrapping_add);
        best_sum8 = best_sum8.min(t0.elapsed());
    }
    let per_seg = |d: Duration| d.as_secs_f64() * 1000.0 / segs.len() as f64;
    let mbs = |d: Duration| bytes as f64 / 1e6 / d.as_secs_f64();
    println!(
        "{} segments, {} MiB, {records} records (reader alone: {read_records}); best of {rounds}",
        segs.len(),
        bytes >> 20
    );
    println!(
        "summarize_segment: {:7.3} ms/segment {:8.1} MB/s",
        per_seg(best_sum),
        mbs(best_sum)
    );
    println!(
        "WalReader        : {:7.3} ms/segment {:8.1} MB/s",
        per_seg(best_read),
        mbs(best_read)
    );
    println!(
        "floor: summing the bytes {:7.3} ms/segment {:8.1} MB/s  [{}]",
        per_seg(best_cold_sum),
        mbs(best_cold_sum),
        cold_sink % 10
    );
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let hot_mbs = |d: Duration| hot.len() as f64 / 1e6 / d.as_secs_f64();
    println!(
        "one segment, in cache: summarize {:.3} ms ({:.0} MB/s); floors: one CRC-32C pass {:.3} ms, summing its bytes {:.3} ms  [{}]",
        ms(best_hot),
        hot_mbs(best_hot),
        ms(best_crc),
        ms(best_sum8),
        sink % 10
    );
}

/// Every record of the segments with one reader, as `pg_waldump --quiet` does.
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
