//! One reader for the tar archives of a base backup and their check against the backup
//! manifest, shared by `backup` (as the server sends), `restore` (as it writes) and `verify`.
//!
//! An [`ArchiveReader`] takes one archive's bytes in any chunking and sums each regular file's
//! size and CRC-32C; a [`ManifestCheck`], shared by all archives of a backup, compares each file
//! with its manifest entry as soon as it ends, or, when the manifest is not known yet (the
//! server sends it after the archives), once it arrives. Manifest paths are relative to the data
//! directory, so a tablespace archive's members are looked up under `pg_tblspc/<oid>/`. What
//! happens to the data is up to an [`ArchiveSink`]: restore writes files, backup and verify
//! discard them.

use std::collections::HashMap;

use super::manifest::{self, ManifestFile};
use super::tar::{EntryKind, TarError, TarEvent, TarHeader, TarReader};

/// A parsed manifest: path → expected size and checksum.
pub type Manifest = HashMap<String, ManifestFile>;

/// A regular file as read from an archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileSum {
    /// As the manifest names it (tablespace members under `pg_tblspc/<oid>/`).
    pub path: String,
    pub size: u64,
    pub crc32c: u32,
}

/// A file whose bytes differ from its manifest entry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    #[error("{path}: size {actual} differs from the manifest's {expected}")]
    Size {
        path: String,
        expected: u64,
        actual: u64,
    },
    #[error(
        "{path}: CRC-32C {} differs from the manifest's {}",
        manifest::format_crc32c(*actual),
        manifest::format_crc32c(*expected)
    )]
    Checksum {
        path: String,
        expected: u32,
        actual: u32,
    },
}

/// Where the entries of an archive go.
pub trait ArchiveSink {
    type Error;

    /// Every entry, files, directories and links alike; a file's data follows.
    fn entry(&mut self, _header: &TarHeader) -> Result<(), Self::Error> {
        Ok(())
    }

    /// The next bytes of the current file.
    fn data(&mut self, _bytes: &[u8]) -> Result<(), Self::Error> {
        Ok(())
    }

    /// A regular file is complete. `verdict` is its check against the manifest; it is `Ok` too
    /// when the manifest is not known yet (the check then waits for
    /// [`ManifestCheck::set_manifest`]) or does not list the file (see [`Outcome::extra`]).
    fn file_end(
        &mut self,
        file: &FileSum,
        verdict: Result<(), Mismatch>,
    ) -> Result<(), Self::Error>;
}

/// Discards the data and stops at the first file that does not match its manifest entry.
pub struct Discard;

impl ArchiveSink for Discard {
    type Error = Mismatch;

    fn file_end(&mut self, _file: &FileSum, verdict: Result<(), Mismatch>) -> Result<(), Mismatch> {
        verdict
    }
}

/// Why feeding an archive stopped: its tar stream is malformed, or the sink refused.
#[derive(Debug, PartialEq, Eq)]
pub enum FeedError<E> {
    Tar(TarError),
    Sink(E),
}

impl<E> From<TarError> for FeedError<E> {
    fn from(e: TarError) -> Self {
        FeedError::Tar(e)
    }
}

/// One archive (tar stream) of a backup being read.
#[derive(Debug)]
pub struct ArchiveReader {
    tar: TarReader,
    manifest_prefix: String,
    current: Option<FileSum>,
}

impl ArchiveReader {
    /// `tablespace_oid` is `None` for the data directory's archive (`base.tar`).
    pub fn new(tablespace_oid: Option<u32>) -> ArchiveReader {
        ArchiveReader {
            tar: TarReader::new(),
            manifest_prefix: tablespace_oid
                .map(|oid| format!("pg_tblspc/{oid}/"))
                .unwrap_or_default(),
            current: None,
        }
    }

    /// Feeds the next bytes of the archive: entries go to `sink`, finished files to `check`.
    pub fn feed<S: ArchiveSink>(
        &mut self,
        bytes: &[u8],
        check: &mut ManifestCheck,
        sink: &mut S,
    ) -> Result<(), FeedError<S::Error>> {
        let ArchiveReader {
            tar,
            manifest_prefix,
            current,
        } = self;
        tar.feed(bytes, &mut |ev| match ev {
            TarEvent::Entry(h) => {
                if h.kind == EntryKind::File {
                    *current = Some(FileSum {
                        path: format!("{manifest_prefix}{}", h.path),
                        size: 0,
                        crc32c: 0,
                    });
                }
                sink.entry(&h).map_err(FeedError::Sink)
            }
            TarEvent::Data(d) => {
                if let Some(f) = current {
                    f.crc32c = crate::codec::crc::crc32c_append(f.crc32c, d);
                    f.size += d.len() as u64;
                }
                sink.data(d).map_err(FeedError::Sink)
            }
            TarEvent::EntryEnd => match current.take() {
                Some(f) => {
                    let verdict = check.file(&f);
                    sink.file_end(&f, verdict).map_err(FeedError::Sink)
                }
                None => Ok(()),
            },
        })
    }

    /// Checks that the archive ended at an entry boundary.
    pub fn finish(&self) -> Result<(), TarError> {
        self.tar.finish()
    }
}

/// The files of every archive of one backup against its manifest.
#[derive(Debug, Default)]
pub struct ManifestCheck {
    manifest: Option<Manifest>,
    /// Every file read: manifest path → (size, CRC-32C).
    received: HashMap<String, (u64, u32)>,
    /// Mismatches found when the manifest arrived after the files.
    deferred: Vec<Mismatch>,
    files: u64,
    bytes: u64,
}

/// What reading all archives of a backup found, besides the mismatches reported per file.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub files: u64,
    pub bytes: u64,
    /// Files read before the manifest was known that do not match it, by path.
    pub mismatches: Vec<Mismatch>,
    /// Listed in the manifest but in no archive, sorted. Empty without a manifest.
    pub missing: Vec<String>,
    /// In an archive but not listed in the manifest, sorted. Empty without a manifest.
    pub extra: Vec<String>,
}

impl ManifestCheck {
    /// `manifest` is `None` when it is not known yet, or when the backup has none.
    pub fn new(manifest: Option<Manifest>) -> ManifestCheck {
        ManifestCheck {
            manifest,
            ..ManifestCheck::default()
        }
    }

    /// Files read so far.
    pub fn files(&self) -> u64 {
        self.files
    }

    /// Bytes of file data read so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The manifest arrived: checks the files already read against it (kept for
    /// [`Outcome::mismatches`]) and every later file as it ends.
    pub fn set_manifest(&mut self, manifest: Manifest) {
        let mut paths: Vec<&String> = self.received.keys().collect();
        paths.sort();
        for path in paths {
            let (size, crc) = self.received[path];
            if let Some(Err(m)) = manifest.get(path).map(|exp| compare(path, exp, size, crc)) {
                self.deferred.push(m);
            }
        }
        self.manifest = Some(manifest);
    }

    fn file(&mut self, f: &FileSum) -> Result<(), Mismatch> {
        self.files += 1;
        self.bytes += f.size;
        self.received.insert(f.path.clone(), (f.size, f.crc32c));
        match self.manifest.as_ref().and_then(|m| m.get(&f.path)) {
            Some(exp) => compare(&f.path, exp, f.size, f.crc32c),
            None => Ok(()),
        }
    }

    /// Call once every archive has been read.
    pub fn finish(self) -> Outcome {
        let (mut missing, mut extra) = (vec![], vec![]);
        if let Some(m) = &self.manifest {
            missing = m
                .keys()
                .filter(|p| !self.received.contains_key(*p))
                .cloned()
                .collect();
            extra = self
                .received
                .keys()
                .filter(|p| !m.contains_key(*p))
                .cloned()
                .collect();
        }
        missing.sort();
        extra.sort();
        Outcome {
            files: self.files,
            bytes: self.bytes,
            mismatches: self.deferred,
            missing,
            extra,
        }
    }
}

/// Size first: a file of the wrong size has the wrong checksum too.
fn compare(path: &str, exp: &ManifestFile, size: u64, crc: u32) -> Result<(), Mismatch> {
    if exp.size != size {
        return Err(Mismatch::Size {
            path: path.to_string(),
            expected: exp.size,
            actual: size,
        });
    }
    match exp.crc32c {
        Some(want) if want != crc => Err(Mismatch::Checksum {
            path: path.to_string(),
            expected: want,
            actual: crc,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::tar::build::{file, header, END};

    fn entry(path: &str, data: &[u8]) -> (String, ManifestFile) {
        let f = ManifestFile {
            size: data.len() as u64,
            crc32c: Some(crc32c::crc32c(data)),
        };
        (path.to_string(), f)
    }

    /// A data directory archive and a tablespace archive (oid 16384), with their manifest.
    fn backup() -> (Vec<u8>, Vec<u8>, Manifest) {
        let big = vec![7u8; 1500];
        let mut base = file("PG_VERSION", b"15\n");
        base.extend_from_slice(&header("global", b'5', 0));
        base.extend_from_slice(&file("global/pg_control", &big));
        base.extend_from_slice(&header("pg_tblspc/16384", b'2', 0));
        base.extend_from_slice(&END);
        let mut ts = header("PG_15_202209061", b'5', 0).to_vec();
        ts.extend_from_slice(&file("PG_15_202209061/5/16385", b"rel"));
        ts.extend_from_slice(&END);
        let manifest = [
            entry("PG_VERSION", b"15\n"),
            entry("global/pg_control", &big),
            entry("pg_tblspc/16384/PG_15_202209061/5/16385", b"rel"),
        ]
        .into_iter()
        .collect();
        (base, ts, manifest)
    }

    /// Keeps what the reader hands over, to compare with what went in.
    #[derive(Default)]
    struct Collect {
        entries: Vec<(String, EntryKind)>,
        files: Vec<(FileSum, Vec<u8>, Result<(), Mismatch>)>,
        data: Vec<u8>,
    }

    impl ArchiveSink for Collect {
        type Error = std::convert::Infallible;

        fn entry(&mut self, h: &TarHeader) -> Result<(), Self::Error> {
            self.entries.push((h.path.clone(), h.kind));
            Ok(())
        }

        fn data(&mut self, bytes: &[u8]) -> Result<(), Self::Error> {
            self.data.extend_from_slice(bytes);
            Ok(())
        }

        fn file_end(&mut self, f: &FileSum, v: Result<(), Mismatch>) -> Result<(), Self::Error> {
            let data = std::mem::take(&mut self.data);
            self.files.push((f.clone(), data, v));
            Ok(())
        }
    }

    fn read<S: ArchiveSink>(
        archive: &[u8],
        oid: Option<u32>,
        chunk: usize,
        check: &mut ManifestCheck,
        sink: &mut S,
    ) -> Result<(), FeedError<S::Error>> {
        let mut r = ArchiveReader::new(oid);
        for piece in archive.chunks(chunk) {
            r.feed(piece, check, sink)?;
        }
        Ok(r.finish()?)
    }

    #[test]
    fn a_matching_backup_passes_whatever_the_chunking() {
        let (base, ts, manifest) = backup();
        for chunk in [1, 100, 512, 513, 1 << 20] {
            let mut check = ManifestCheck::new(Some(manifest.clone()));
            let mut sink = Collect::default();
            read(&base, None, chunk, &mut check, &mut sink).unwrap();
            read(&ts, Some(16384), chunk, &mut check, &mut sink).unwrap();
            assert_eq!(sink.entries.len(), 6, "chunk {chunk}");
            let (f, data, _) = &sink.files[2];
            assert_eq!(f.path, "pg_tblspc/16384/PG_15_202209061/5/16385");
            assert_eq!((f.size, data.as_slice()), (3, &b"rel"[..]));
            assert_eq!(f.crc32c, crc32c::crc32c(b"rel"));
            assert!(sink.files.iter().all(|f| f.2.is_ok()), "chunk {chunk}");
            assert_eq!(sink.files[1].1, vec![7u8; 1500]);
            let outcome = check.finish();
            let want = Outcome {
                files: 3,
                bytes: 1506,
                ..Outcome::default()
            };
            assert_eq!(outcome, want, "chunk {chunk}");
        }
    }

    #[test]
    fn a_changed_file_fails_as_it_ends() {
        let (mut base, ts, manifest) = backup();
        base[512] = b'9'; // PG_VERSION's first byte
        let mut check = ManifestCheck::new(Some(manifest.clone()));
        let e = read(&base, None, 4096, &mut check, &mut Discard).unwrap_err();
        let FeedError::Sink(Mismatch::Checksum { path, expected, .. }) = &e else {
            panic!("{e:?}");
        };
        assert_eq!(
            (path.as_str(), *expected),
            ("PG_VERSION", crc32c::crc32c(b"15\n"))
        );

        // Read as the wrong tablespace, nothing matches the manifest: missing and extra.
        let mut check = ManifestCheck::new(Some(manifest.clone()));
        read(&ts, Some(1), 4096, &mut check, &mut Discard).unwrap();
        let outcome = check.finish();
        assert_eq!(outcome.extra, ["pg_tblspc/1/PG_15_202209061/5/16385"]);
        assert_eq!(
            outcome.missing,
            [
                "PG_VERSION",
                "global/pg_control",
                "pg_tblspc/16384/PG_15_202209061/5/16385"
            ]
        );

        let mut short = manifest;
        short.get_mut("global/pg_control").unwrap().size = 1499;
        let mut check = ManifestCheck::new(Some(short));
        let e = read(&base[1024..], None, 700, &mut check, &mut Discard).unwrap_err();
        let FeedError::Sink(m) = e else {
            panic!("{e:?}");
        };
        assert_eq!(
            m.to_string(),
            "global/pg_control: size 1500 differs from the manifest's 1499"
        );
    }

    #[test]
    fn a_manifest_that_arrives_last_checks_the_files_already_read() {
        let (mut base, ts, mut manifest) = backup();
        base[512] = b'9';
        manifest.remove("global/pg_control");
        manifest.insert(
            "global/1262".into(),
            ManifestFile {
                size: 0,
                crc32c: None,
            },
        );
        let mut check = ManifestCheck::new(None);
        read(&base, None, 1000, &mut check, &mut Discard).unwrap();
        read(&ts, Some(16384), 1000, &mut check, &mut Discard).unwrap();
        check.set_manifest(manifest);
        let outcome = check.finish();
        assert_eq!(outcome.files, 3);
        assert_eq!(
            outcome.mismatches,
            [Mismatch::Checksum {
                path: "PG_VERSION".into(),
                expected: crc32c::crc32c(b"15\n"),
                actual: crc32c::crc32c(b"95\n"),
            }]
        );
        assert_eq!(outcome.missing, ["global/1262"]);
        assert_eq!(outcome.extra, ["global/pg_control"]);
    }

    #[test]
    fn without_a_manifest_files_are_only_counted() {
        let (base, _, _) = backup();
        let mut check = ManifestCheck::new(None);
        read(&base, None, 512, &mut check, &mut Discard).unwrap();
        assert_eq!((check.files(), check.bytes()), (2, 1503));
        assert_eq!(check.finish().missing, Vec::<String>::new());
    }

    #[test]
    fn a_broken_or_short_stream_is_a_tar_error() {
        let (mut base, _, manifest) = backup();
        let mut check = ManifestCheck::new(Some(manifest));
        let e = read(&base[..1000], None, 512, &mut check, &mut Discard).unwrap_err();
        assert_eq!(e, FeedError::Tar(TarError::Truncated));
        base[1024] ^= 1; // the header of "global"
        let mut check = ManifestCheck::new(None);
        let e = read(&base, None, 512, &mut check, &mut Discard).unwrap_err();
        assert_eq!(e, FeedError::Tar(TarError::BadChecksum { offset: 1024 }));
    }
}
