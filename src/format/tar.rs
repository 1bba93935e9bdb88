//! An incremental reader for the tar streams PostgreSQL's BASE_BACKUP sends.
//!
//! PostgreSQL writes POSIX ustar (`tarCreateHeader()` in src/port/tar.c): names up to 99 bytes,
//! sizes in octal or, above 8 GiB, base-256. GNU long-name (`L`) and pax (`x`) headers are
//! understood too, so archives made by other tools restore as well. The reader is sans-I/O: feed
//! it bytes in any chunking and it calls back with headers and data, so a multi-GiB archive
//! passes through a fixed amount of memory.

const BLOCK: usize = 512;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Directory,
    Symlink,
    Other(u8),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TarHeader {
    pub path: String,
    pub kind: EntryKind,
    pub size: u64,
    pub mode: u32,
    pub mtime: i64,
    pub link_target: String,
}

#[derive(Debug)]
pub enum TarEvent<'a> {
    /// A new entry; its data (if any) follows as `Data` events totalling `size` bytes.
    Entry(TarHeader),
    Data(&'a [u8]),
    /// The entry's data is complete.
    EntryEnd,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TarError {
    #[error("tar header at byte {offset} has a bad checksum")]
    BadChecksum { offset: u64 },
    #[error("tar header at byte {offset}: bad {field} field")]
    BadField { offset: u64, field: &'static str },
    #[error("tar stream ended inside an entry")]
    Truncated,
    #[error("data after the end-of-archive marker")]
    TrailingData,
}

#[derive(Debug)]
enum State {
    Header,
    Data {
        remaining: u64,
        padding: usize,
    },
    Padding {
        remaining: usize,
    },
    /// A GNU long name or pax header body being collected for the next header.
    Meta {
        kind: u8,
        remaining: u64,
        padding: usize,
    },
    End,
}

#[derive(Debug)]
pub struct TarReader {
    state: State,
    header: Vec<u8>,
    meta: Vec<u8>,
    long_name: Option<String>,
    long_link: Option<String>,
    offset: u64,
    zero_blocks: u32,
}

impl Default for TarReader {
    fn default() -> Self {
        TarReader::new()
    }
}

fn parse_octal(field: &[u8]) -> Option<u64> {
    // base-256 for values that do not fit in octal (GNU extension, used by PostgreSQL for >8 GiB)
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        let mut v: u64 = (field[0] & 0x7f) as u64;
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(b as u64)?;
        }
        return Some(v);
    }
    let s: Vec<u8> = field.iter().copied().take_while(|&b| b != 0).collect();
    let s = std::str::from_utf8(&s).ok()?.trim();
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

fn cstr(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

fn pad_of(size: u64) -> usize {
    ((BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64) as usize
}

impl TarReader {
    pub fn new() -> TarReader {
        TarReader {
            state: State::Header,
            header: Vec::with_capacity(BLOCK),
            meta: vec![],
            long_name: None,
            long_link: None,
            offset: 0,
            zero_blocks: 0,
        }
    }

    /// True once the end-of-archive marker (two zero blocks) has been read.
    pub fn is_finished(&self) -> bool {
        matches!(self.state, State::End)
    }

    /// Checks that the stream ended at an entry boundary. PostgreSQL always writes the
    /// end-of-archive marker, but accept a stream that stops cleanly between entries.
    pub fn finish(&self) -> Result<(), TarError> {
        match self.state {
            State::End => Ok(()),
            State::Header if self.header.is_empty() => Ok(()),
            _ => Err(TarError::Truncated),
        }
    }

    /// Feeds the next bytes of the stream.
    pub fn feed<E>(
        &mut self,
        mut input: &[u8],
        on: &mut impl FnMut(TarEvent<'_>) -> Result<(), E>,
    ) -> Result<(), E>
    where
        E: From<TarError>,
    {
        while !input.is_empty() {
            match &mut self.state {
                State::End => {
                    // Trailing zero padding after the marker is normal (tar pads to records).
                    if input.iter().any(|&b| b != 0) {
                        return Err(TarError::TrailingData.into());
                    }
                    self.offset += input.len() as u64;
                    return Ok(());
                }
                State::Header => {
                    let take = (BLOCK - self.header.len()).min(input.len());
                    self.header.extend_from_slice(&input[..take]);
                    input = &input[take..];
                    self.offset += take as u64;
                    if self.header.len() == BLOCK {
                        let block = std::mem::take(&mut self.header);
                        self.header.reserve(BLOCK);
                        self.on_header(&block, on)?;
                    }
                }
                State::Data { remaining, padding } => {
                    let take = (*remaining).min(input.len() as u64) as usize;
                    if take > 0 {
                        on(TarEvent::Data(&input[..take]))?;
                        *remaining -= take as u64;
                        input = &input[take..];
                        self.offset += take as u64;
                    }
                    if *remaining == 0 {
                        let padding = *padding;
                        on(TarEvent::EntryEnd)?;
                        self.state = if padding > 0 {
                            State::Padding { remaining: padding }
                        } else {
                            State::Header
                        };
                    }
                }
                State::Padding { remaining } => {
                    let take = (*remaining).min(input.len());
                    *remaining -= take;
                    input = &input[take..];
                    self.offset += take as u64;
                    if *remaining == 0 {
                        self.state = State::Header;
                    }
                }
                State::Meta {
                    kind,
                    remaining,
                    padding,
                } => {
                    let take = (*remaining).min(input.len() as u64) as usize;
                    self.meta.extend_from_slice(&input[..take]);
                    *remaining -= take as u64;
                    input = &input[take..];
                    self.offset += take as u64;
                    if *remaining == 0 {
                        let (kind, padding) = (*kind, *padding);
                        self.absorb_meta(kind);
                        self.state = if padding > 0 {
                            State::Padding { remaining: padding }
                        } else {
                            State::Header
                        };
                    }
                }
            }
        }
        Ok(())
    }

    fn absorb_meta(&mut self, kind: u8) {
        let body = std::mem::take(&mut self.meta);
        match kind {
            b'L' => self.long_name = Some(cstr(&body)),
            b'K' => self.long_link = Some(cstr(&body)),
            b'x' => {
                // pax records: "<len> <key>=<value>\n"
                let text = String::from_utf8_lossy(&body);
                for rec in text.split('\n') {
                    if let Some((_, kv)) = rec.split_once(' ') {
                        if let Some((k, v)) = kv.split_once('=') {
                            match k {
                                "path" => self.long_name = Some(v.to_string()),
                                "linkpath" => self.long_link = Some(v.to_string()),
                                _ => {}
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }

    fn on_header<E>(
        &mut self,
        block: &[u8],
        on: &mut impl FnMut(TarEvent<'_>) -> Result<(), E>,
    ) -> Result<(), E>
    where
        E: From<TarError>,
    {
        let at = self.offset - BLOCK as u64;
        if block.iter().all(|&b| b == 0) {
            self.zero_blocks += 1;
            if self.zero_blocks == 2 {
                self.state = State::End;
            }
            return Ok(());
        }
        if self.zero_blocks > 0 {
            // A single zero block followed by more headers: tolerate, as GNU tar does.
            self.zero_blocks = 0;
        }
        let bad = |field| TarError::BadField { offset: at, field };
        let stored = parse_octal(&block[148..156]).ok_or(bad("checksum"))?;
        let computed: u64 = block
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    b' ' as u64
                } else {
                    b as u64
                }
            })
            .sum();
        if stored != computed {
            return Err(TarError::BadChecksum { offset: at }.into());
        }
        let size = parse_octal(&block[124..136]).ok_or(bad("size"))?;
        let typeflag = block[156];
        if matches!(typeflag, b'L' | b'K' | b'x' | b'g') {
            if size > 1 << 20 {
                return Err(bad("extended header size").into());
            }
            self.meta.clear();
            let kind = if typeflag == b'g' { 0 } else { typeflag };
            self.state = if size == 0 {
                State::Header
            } else {
                State::Meta {
                    kind,
                    remaining: size,
                    padding: pad_of(size),
                }
            };
            return Ok(());
        }
        let is_ustar = &block[257..262] == b"ustar";
        let mut path = cstr(&block[0..100]);
        if is_ustar {
            let prefix = cstr(&block[345..500]);
            if !prefix.is_empty() {
                path = format!("{prefix}/{path}");
            }
        }
        if let Some(long) = self.long_name.take() {
            path = long;
        }
        let link_target = self
            .long_link
            .take()
            .unwrap_or_else(|| cstr(&block[157..257]));
        let kind = match typeflag {
            b'0' | 0 | b'7' => EntryKind::File,
            b'5' => EntryKind::Directory,
            b'2' => EntryKind::Symlink,
            other => EntryKind::Other(other),
        };
        if kind == EntryKind::Directory && path.ends_with('/') {
            path.pop();
        }
        let header = TarHeader {
            path,
            kind,
            size: if kind == EntryKind::File { size } else { 0 },
            mode: parse_octal(&block[100..108]).ok_or(bad("mode"))? as u32,
            mtime: parse_octal(&block[136..148]).ok_or(bad("mtime"))? as i64,
            link_target,
        };
        let data = header.size;
        on(TarEvent::Entry(header))?;
        if data == 0 {
            on(TarEvent::EntryEnd)?;
            self.state = State::Header;
        } else {
            self.state = State::Data {
                remaining: data,
                padding: pad_of(data),
            };
        }
        Ok(())
    }
}

/// Tar bytes built in tests, the way PostgreSQL writes them.
#[cfg(test)]
pub(crate) mod build {
    /// Builds a ustar header the way PostgreSQL's tarCreateHeader() does.
    pub(crate) fn header(path: &str, typeflag: u8, size: u64) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[..path.len()].copy_from_slice(path.as_bytes());
        b[100..108].copy_from_slice(b"0000600\0");
        b[108..116].copy_from_slice(b"0000000\0");
        b[116..124].copy_from_slice(b"0000000\0");
        b[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
        b[136..148].copy_from_slice(b"14712345670\0");
        b[156] = typeflag;
        b[257..263].copy_from_slice(b"ustar\0");
        b[263..265].copy_from_slice(b"00");
        b[148..156].copy_from_slice(b"        ");
        let sum: u64 = b.iter().map(|&x| x as u64).sum();
        b[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        b
    }

    /// A symbolic link entry.
    pub(crate) fn link(path: &str, target: &str) -> [u8; 512] {
        let mut b = header(path, b'2', 0);
        b[157..157 + target.len()].copy_from_slice(target.as_bytes());
        // The checksum covers the link name too.
        b[148..156].copy_from_slice(b"        ");
        let sum: u64 = b.iter().map(|&x| x as u64).sum();
        b[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        b
    }

    /// A regular file entry: header, data, padding to the next block.
    pub(crate) fn file(path: &str, data: &[u8]) -> Vec<u8> {
        let mut a = header(path, b'0', data.len() as u64).to_vec();
        a.extend_from_slice(data);
        a.resize(a.len() + super::pad_of(data.len() as u64), 0);
        a
    }

    /// The end-of-archive marker.
    pub(crate) const END: [u8; 1024] = [0u8; 1024];
}

#[cfg(test)]
mod tests {
    use super::build::header;
    use super::*;

    fn archive() -> Vec<u8> {
        let mut a = vec![];
        a.extend_from_slice(&header("PG_VERSION", b'0', 3));
        a.extend_from_slice(b"15\n");
        a.extend_from_slice(&[0u8; 509]);
        a.extend_from_slice(&header("global", b'5', 0));
        let big = vec![7u8; 1500];
        a.extend_from_slice(&header("global/pg_control", b'0', big.len() as u64));
        a.extend_from_slice(&big);
        a.extend_from_slice(&vec![0u8; pad_of(1500)]);
        a.extend_from_slice(&header("pg_tblspc/16384", b'2', 0));
        a.extend_from_slice(&[0u8; 1024]);
        a
    }

    fn collect(a: &[u8], chunk: usize) -> Vec<(String, Vec<u8>)> {
        let mut r = TarReader::new();
        let mut out: Vec<(String, Vec<u8>)> = vec![];
        for piece in a.chunks(chunk) {
            r.feed(piece, &mut |ev| -> Result<(), TarError> {
                match ev {
                    TarEvent::Entry(h) => out.push((h.path, vec![])),
                    TarEvent::Data(d) => out.last_mut().unwrap().1.extend_from_slice(d),
                    TarEvent::EntryEnd => {}
                }
                Ok(())
            })
            .unwrap();
        }
        assert!(r.is_finished());
        out
    }

    #[test]
    fn reads_entries_whatever_the_chunking() {
        let a = archive();
        let whole = collect(&a, a.len());
        assert_eq!(
            whole.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(),
            [
                "PG_VERSION",
                "global",
                "global/pg_control",
                "pg_tblspc/16384"
            ]
        );
        assert_eq!(whole[0].1, b"15\n");
        assert_eq!(whole[2].1.len(), 1500);
        for chunk in [1, 7, 511, 512, 513, 4096] {
            assert_eq!(collect(&a, chunk), whole, "chunk {chunk}");
        }
    }

    #[test]
    fn detects_corruption_and_truncation() {
        let mut a = archive();
        a[600] ^= 1; // inside the first data block: not detectable by tar itself
        a[0] ^= 1; // inside the first header: checksum fails
        let mut r = TarReader::new();
        let e = r
            .feed(&a, &mut |_| -> Result<(), TarError> { Ok(()) })
            .unwrap_err();
        assert_eq!(e, TarError::BadChecksum { offset: 0 });

        let a = archive();
        let mut r = TarReader::new();
        r.feed(&a[..1000], &mut |_| -> Result<(), TarError> { Ok(()) })
            .unwrap();
        assert_eq!(r.finish(), Err(TarError::Truncated));
    }

    #[test]
    fn base256_sizes() {
        let mut f = [0u8; 12];
        f[0] = 0x80;
        f[11] = 1;
        f[10] = 2;
        assert_eq!(parse_octal(&f), Some(513));
    }
}
