#!/usr/bin/python3
"""An independent reader of pitr repositories (local directory backend).

Written from docs/repository-format.md alone, not from pitr's code: where the document was not
enough, the document was fixed. It uses only Python's standard library and Debian's
python3-lz4, python3-zstandard and python3-crc32c (scripts/install-test-deps.sh installs them).

Commands (REPO is the repository's root directory):
  check REPO                       decode every object, verify every frame and JSON; list damage
  wal REPO                         WAL files, chunk chains and the newest WAL per timeline (JSON)
  get-wal REPO NAME DEST [--unpadded]
                                   segment NAME as archive-get serves it: the segment object, or
                                   its chunk chain zero-padded (--unpadded: the chain's bytes only)
  cat REPO KEY DEST                the decoded content of object KEY (e.g. a backup_manifest)
  backups REPO                     completed backups, oldest first (JSON)
  extract REPO ID DEST             extract backup ID under DEST (base.tar into DEST/data,
                                   <oid>.tar into DEST/tablespaces/<oid>) and check every file
                                   against backup_manifest (JSON report)
Exit status: 0 success, 1 not found, 2 damage or mismatch, 3 usage.
"""

import json
import os
import re
import struct
import sys
import tarfile

import crc32c
import lz4.block
import zstandard

HEADER_LEN = 40
MAX_RAW_LEN = 2 << 30
MIN_PART_SIZE, MAX_PART_SIZE = 1 << 20, 16 << 20

SEGMENT_RE = re.compile(r"^[0-9A-F]{24}$")
PARTIAL_RE = re.compile(r"^[0-9A-F]{24}\.partial$")
BACKUP_FILE_RE = re.compile(r"^[0-9A-F]{24}\.[0-9A-F]{8}\.backup$")
HISTORY_RE = re.compile(r"^[0-9A-F]{8}\.history$")
CHUNK_RE = re.compile(r"^([0-9A-F]{8})-([0-9A-F]{8})$")


class Damage(Exception):
    """An object that fails its checks."""


class NotFound(Exception):
    pass


# --- frame ------------------------------------------------------------------------------------


def crc(data, value=0):
    return crc32c.crc32c(data, value)


def decode_frame(blob, what):
    """The content of one framed object, after every check of the document, in its order."""
    if len(blob) < HEADER_LEN or blob[0:4] != b"PITR":
        raise Damage(f"{what}: bad magic")
    (header_crc,) = struct.unpack_from("<I", blob, 36)
    if header_crc != crc(blob[0:36]):
        raise Damage(f"{what}: header checksum mismatch")
    version, codec = blob[4], blob[5]
    if version != 1:
        raise Damage(f"{what}: unknown frame version {version}")
    if codec not in (0, 1, 2, 3):
        raise Damage(f"{what}: unknown codec {codec}")
    raw_len, payload_len, raw_crc, payload_crc = struct.unpack_from("<QQII", blob, 8)
    payload = blob[HEADER_LEN:]
    if len(payload) != payload_len:
        raise Damage(f"{what}: {len(payload)} payload bytes, header says {payload_len}")
    if crc(payload) != payload_crc:
        raise Damage(f"{what}: payload checksum mismatch")
    if raw_len > MAX_RAW_LEN:
        raise Damage(f"{what}: raw_len {raw_len} too large")
    try:
        if codec == 0:
            raw = bytes(payload)
        elif codec == 1:
            raw = lz4.block.decompress(bytes(payload), uncompressed_size=raw_len)
        elif codec == 3:
            raw = decode_lz4_blocks(bytes(payload), raw_len, what)
        else:
            d = zstandard.ZstdDecompressor().decompressobj()
            raw = d.decompress(bytes(payload))
            if not d.eof or d.unused_data:
                raise Damage(f"{what}: payload is not exactly one zstd frame")
    except Damage:
        raise
    except Exception as e:  # the decompressors raise their own error types
        raise Damage(f"{what}: payload does not decompress: {e}") from e
    if len(raw) != raw_len:
        raise Damage(f"{what}: content is {len(raw)} bytes, header says {raw_len}")
    if crc(raw) != raw_crc:
        raise Damage(f"{what}: content checksum mismatch")
    return raw


MAX_BLOCK_RAW = 4 * 1024 * 1024
AS_IS = 1 << 31


def decode_lz4_blocks(payload, raw_len, what):
    """Codec 3: a sequence of (raw_len u32, word u32, data) blocks, each checked on its own."""
    out, at = bytearray(), 0
    while at < len(payload):
        if len(payload) - at < 8:
            raise Damage(f"{what}: block header at {at} is cut short")
        block_raw, word = struct.unpack_from("<II", payload, at)
        stored = word & ~AS_IS
        if not 1 <= block_raw <= MAX_BLOCK_RAW:
            raise Damage(f"{what}: block at {at} has raw_len {block_raw}")
        data = payload[at + 8: at + 8 + stored]
        if len(data) != stored:
            raise Damage(f"{what}: block at {at} runs past the payload")
        if word & AS_IS:
            if stored != block_raw:
                raise Damage(f"{what}: stored block at {at} is {stored} bytes, not {block_raw}")
            out += data
        else:
            raw = lz4.block.decompress(data, uncompressed_size=block_raw)
            if len(raw) != block_raw:
                raise Damage(f"{what}: block at {at} decodes to {len(raw)} bytes")
            out += raw
        if len(out) > raw_len:
            raise Damage(f"{what}: blocks hold more than the header's {raw_len} bytes")
        at += 8 + stored
    return bytes(out)


class Repo:
    def __init__(self, root):
        self.root = root
        desc = self.get_json("repository.json")
        if desc is None:
            raise NotFound(f"no pitr repository at {root}")
        if desc.get("format_version", 0) > 1:
            raise Damage(f"format_version {desc['format_version']} is newer than 1")
        self.descriptor = desc
        self.seg_size = int(desc["wal_segment_size"])
        self.system_identifier = int(desc["system_identifier"])

    def path(self, key):
        return os.path.join(self.root, *key.split("/"))

    def get(self, key):
        """Content of `key`, or None when it does not exist."""
        try:
            with open(self.path(key), "rb") as f:
                blob = f.read()
        except FileNotFoundError:
            return None
        return decode_frame(blob, key)

    def get_json(self, key):
        raw = self.get(key)
        if raw is None:
            return None
        try:
            return json.loads(raw.decode("utf-8"))
        except ValueError as e:
            raise Damage(f"{key}: not JSON: {e}") from e

    def list(self, prefix):
        """Keys under folder `prefix` ('' for all), skipping `.tmp.` files."""
        out = []
        top = self.path(prefix) if prefix else self.root
        for dirpath, _dirs, files in os.walk(top):
            for name in files:
                if name.startswith(".tmp."):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, name), self.root)
                out.append(rel.replace(os.sep, "/"))
        return sorted(out)


# --- WAL --------------------------------------------------------------------------------------


def wal_folder(name):
    return f"wal/{name[:16]}"


def segno_of(name, seg_size):
    per_log = 0x1_0000_0000 // seg_size
    return int(name[8:16], 16) * per_log + int(name[16:24], 16)


def lsn_text(lsn):
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text):
    hi, lo = text.split("/")
    return int(hi, 16) << 32 | int(lo, 16)


def scan_wal(repo):
    """One listing of wal/: WAL files by kind, and chunk folders {segment: [(start, end, key)]}."""
    files = {"segment": [], "partial": [], "backup": [], "history": [], "summary": []}
    chunks = {}
    for key in repo.list("wal"):
        parts = key.split("/")
        if len(parts) == 2 and HISTORY_RE.match(parts[1]):
            files["history"].append(parts[1])
        elif len(parts) == 3 and parts[1] == parts[2][:16]:
            name = parts[2]
            for kind, rx in (("segment", SEGMENT_RE), ("partial", PARTIAL_RE),
                             ("backup", BACKUP_FILE_RE)):
                if rx.match(name):
                    files[kind].append(name)
            if name.endswith(".summary") and SEGMENT_RE.match(name[: -len(".summary")]):
                files["summary"].append(name)
        elif len(parts) == 5 and parts[2] == "chunks" and SEGMENT_RE.match(parts[3]) \
                and parts[1] == parts[3][:16]:
            m = CHUNK_RE.match(parts[4])
            if m:
                start, end = int(m.group(1), 16), int(m.group(2), 16)
                if start < end <= repo.seg_size:
                    chunks.setdefault(parts[3], []).append((start, end, key))
    return files, chunks


def chain_of(chunks):
    """The document's chain rule: sort by start, then end descending; follow from offset 0."""
    chain, pos = [], 0
    for start, end, key in sorted(chunks, key=lambda c: (c[0], -c[1])):
        if start == pos:
            chain.append((start, end, key))
            pos = end
    return chain, pos


def read_chain(repo, chain):
    """Bytes [0, end) of the chain; None if a chunk vanished (its segment was stored)."""
    out = bytearray()
    for start, end, key in chain:
        raw = repo.get(key)
        if raw is None:
            return None
        if len(raw) != end - start:
            raise Damage(f"{key}: {len(raw)} bytes, its name says {end - start}")
        out += raw
    return bytes(out)


CHUNKED_MAGIC = b"PITR chunked segment 1\n"


def read_chunked_segment(repo, name, raw, padded):
    """A segment object that names its chunks instead of holding the bytes."""
    try:
        doc = json.loads(raw[len(CHUNKED_MAGIC):])
        size, wal_bytes, chunks = doc["segment_size"], doc["wal_bytes"], doc["chunks"]
    except (ValueError, KeyError, TypeError) as e:
        raise Damage(f"{name}: chunked segment does not parse: {e}") from e
    if size != repo.seg_size or not 0 < wal_bytes <= size:
        raise Damage(f"{name}: chunked segment sizes {size}/{wal_bytes} are wrong")
    folder = name[:-len(".partial")] if name.endswith(".partial") else name
    chain, pos = [], 0
    for start, end in chunks:
        if start != pos or end <= start:
            raise Damage(f"{name}: chunks are not contiguous at {start}")
        key = f"{wal_folder(folder)}/chunks/{folder}/{start:08X}-{end:08X}"
        chain.append((start, end, key))
        pos = end
    if pos != wal_bytes:
        raise Damage(f"{name}: chunks end at {pos}, not {wal_bytes}")
    data = read_chain(repo, chain)
    if data is None:
        raise Damage(f"{name}: a chunk the chunked segment names is missing")
    return data + bytes(size - len(data)) if padded else data


def get_segment(repo, name, padded=True):
    """Segment `name` as archive-get serves it: (bytes, source)."""
    seg_key = f"{wal_folder(name)}/{name}"
    for _ in range(2):
        raw = repo.get(seg_key)
        if raw is not None and raw.startswith(CHUNKED_MAGIC):
            return read_chunked_segment(repo, name, raw, padded), "chunked"
        if raw is not None:
            return raw, "segment"
        prefix = f"{wal_folder(name)}/chunks/{name}"
        found = []
        for key in repo.list(prefix):
            m = CHUNK_RE.match(key.rsplit("/", 1)[1])
            if m:
                found.append((int(m.group(1), 16), int(m.group(2), 16), key))
        chain, _ = chain_of(found)
        if not chain:
            raw = repo.get(seg_key)
            if raw is None:
                raise NotFound(f"{name} is not in the repository")
            return raw, "segment"
        data = read_chain(repo, chain)
        if data is not None:
            if padded:
                data = data + bytes(repo.seg_size - len(data))
            return data, "chunks"
    raise NotFound(f"{name}: chunks keep vanishing and no segment object appears")


def wal_report(repo):
    files, chunks = scan_wal(repo)
    complete = set(files["segment"])
    newest = {}
    for name in files["segment"]:
        tli = int(name[:8], 16)
        end = (segno_of(name, repo.seg_size) + 1) * repo.seg_size
        if end > newest.get(tli, {}).get("end", -1):
            newest[tli] = {"end": end, "segment": name, "source": "segment"}
    streamed = {}
    for name, found in chunks.items():
        if name in complete:
            continue  # a complete segment always wins: these are leftovers
        _, pos = chain_of(found)
        if pos == 0:
            continue
        tli = int(name[:8], 16)
        end = segno_of(name, repo.seg_size) * repo.seg_size + pos
        streamed[name] = lsn_text(end)
        if end > newest.get(tli, {}).get("end", -1):
            newest[tli] = {"end": end, "segment": name, "source": "chunks"}
    for v in newest.values():
        v["end"] = lsn_text(v["end"])
    return {
        "segments": sorted(files["segment"]),
        "partial": sorted(files["partial"]),
        "backup_files": sorted(files["backup"]),
        "histories": sorted(files["history"]),
        "summaries": len(files["summary"]),
        "streamed": streamed,
        "newest": {str(k): v for k, v in sorted(newest.items())},
    }


# --- backups ----------------------------------------------------------------------------------


def backups(repo):
    out = []
    for key in repo.list("catalog/backups"):
        if not key.endswith(".json"):
            continue
        info = repo.get_json(key)
        if repo.get(f"backups/{info['id']}/expired") is not None:
            continue  # being removed
        out.append(info)
    out.sort(key=lambda b: (parse_lsn(b["stop_lsn"]), b["stop_time"]))
    return out


class Parts:
    """A file-like object over the decoded parts of one archive, read in order."""

    def __init__(self, repo, backup_id, archive):
        self.repo = repo
        self.keys = [f"backups/{backup_id}/{archive['name']}/{i:08d}"
                     for i in range(archive["parts"])]
        self.part, self.at, self.total = b"", 0, 0
        self.part_size = None

    def _next_part(self):
        key = self.keys.pop(0)
        raw = self.repo.get(key)
        if raw is None:
            raise Damage(f"{key}: part missing")
        # Parts but the last all have the archive's part size (16 MiB before issue 12, 8 MiB
        # since): the first part's, when there is more than one.
        if self.part_size is None:
            self.part_size = len(raw)
            if self.keys and not MIN_PART_SIZE <= len(raw) <= MAX_PART_SIZE:
                raise Damage(f"{key}: part size {len(raw)} is not between 1 and 16 MiB")
        if (self.keys and len(raw) != self.part_size) or len(raw) > self.part_size:
            raise Damage(f"{key}: {len(raw)} bytes, but parts have {self.part_size} and only the last may be short")
        self.total += len(raw)
        self.part, self.at = raw, 0

    def read(self, n=-1):
        out = bytearray()
        while n < 0 or len(out) < n:
            if self.at == len(self.part):
                if not self.keys:
                    break
                self._next_part()
                continue
            take = len(self.part) - self.at if n < 0 else min(n - len(out), len(self.part) - self.at)
            out += self.part[self.at:self.at + take]
            self.at += take
        return bytes(out)


def manifest_files(raw):
    files = {}
    for f in json.loads(raw.decode("utf-8"))["Files"]:
        if "Path" in f:
            path = f["Path"]
        else:
            path = bytes.fromhex(f["Encoded-Path"]).decode("utf-8", "surrogateescape")
        want = None
        if f.get("Checksum-Algorithm") == "CRC32C":
            want = struct.unpack("<I", bytes.fromhex(f["Checksum"]))[0]
        files[path] = (int(f["Size"]), want)
    return files


def safe_join(root, member):
    parts = member.split("/")
    if member.startswith("/") or any(p == ".." for p in parts):
        raise Damage(f"unsafe path in tar: {member!r}")
    return os.path.join(root, *[p for p in parts if p not in ("", ".")])


def extract_archive(repo, backup_id, archive, root, expected, report):
    oid = archive["tablespace_oid"]
    manifest_prefix = "" if oid is None else f"pg_tblspc/{oid}/"
    parts = Parts(repo, backup_id, archive)
    os.makedirs(root, exist_ok=True)
    with tarfile.open(fileobj=parts, mode="r|") as tar:
        for m in tar:
            dest = safe_join(root, m.name)
            if m.isdir():
                os.makedirs(dest, exist_ok=True)
                continue
            if not m.isfile():
                report["other_entries"].append(manifest_prefix + m.name)
                continue
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            value, size = 0, 0
            src = tar.extractfile(m)
            with open(dest, "wb") as out:
                while True:
                    block = src.read(1 << 20)
                    if not block:
                        break
                    value = crc(block, value)
                    size += len(block)
                    out.write(block)
            path = manifest_prefix + m.name
            report["files"][path] = {"size": size, "crc32c": f"{value:08x}"}
            want = expected.get(path)
            if want is None:
                report["not_in_manifest"].append(path)
            elif want[0] != size or (want[1] is not None and want[1] != value):
                report["mismatches"].append(
                    {"path": path, "size": size, "crc32c": f"{value:08x}",
                     "manifest_size": want[0],
                     "manifest_crc32c": None if want[1] is None else f"{want[1]:08x}"})
    # tarfile stops at the first end-of-archive block and reads in 10240-byte records, so
    # what is left of the end-of-archive zero blocks depends on the archive's length.
    while True:
        rest = parts.read(1 << 16)
        if not rest:
            break
        if rest.count(0) != len(rest):
            raise Damage(f"{archive['name']}: data after the end of the tar archive")
    if parts.total != archive["raw_bytes"]:
        raise Damage(f"{archive['name']}: {parts.total} tar bytes, catalog says "
                     f"{archive['raw_bytes']}")


def extract(repo, backup_id, dest):
    info = repo.get_json(f"catalog/backups/{backup_id}.json")
    if info is None:
        raise NotFound(f"no completed backup {backup_id}")
    if repo.get(f"backups/{backup_id}/expired") is not None:
        raise NotFound(f"backup {backup_id} is being removed")
    manifest = repo.get(f"backups/{backup_id}/backup_manifest") if info["manifest"] else None
    expected = manifest_files(manifest) if manifest is not None else {}
    report = {"id": backup_id, "files": {}, "mismatches": [], "not_in_manifest": [],
              "missing": [], "other_entries": []}
    for archive in info["archives"]:
        oid = archive["tablespace_oid"]
        root = os.path.join(dest, "data") if oid is None \
            else os.path.join(dest, "tablespaces", str(oid))
        extract_archive(repo, backup_id, archive, root, expected, report)
    report["missing"] = sorted(p for p in expected if p not in report["files"])
    return report


# --- check ------------------------------------------------------------------------------------


def check(repo):
    """Decodes every object; JSON objects must parse; chunks must match their names."""
    report = {"objects": 0, "bytes": 0, "damaged": []}
    for key in repo.list(""):
        try:
            raw = repo.get(key)
            if raw is None:
                continue  # deleted while we listed (a chunk whose segment was stored)
            report["objects"] += 1
            report["bytes"] += len(raw)
            leaf = key.rsplit("/", 1)[-1]
            if key.endswith(".json") or leaf in ("lease", "expired") or key.endswith(".summary"):
                json.loads(raw.decode("utf-8"))
            if key.endswith(".summary"):
                sid = json.loads(raw)["system_identifier"]
                if int(sid) != repo.system_identifier:
                    raise Damage(f"{key}: system_identifier {sid}")
            if leaf == "state" and raw not in (b"complete", b"aborted"):
                raise Damage(f"{key}: state {raw!r}")
            m = CHUNK_RE.match(leaf)
            if "/chunks/" in key and m:
                if len(raw) != int(m.group(2), 16) - int(m.group(1), 16):
                    raise Damage(f"{key}: {len(raw)} bytes do not match its name")
        except (Damage, ValueError, KeyError) as e:
            report["damaged"].append(f"{key}: {e}")
    return report


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 3
    cmd, root, rest = argv[1], argv[2], argv[3:]
    try:
        repo = Repo(root)
        if cmd == "check":
            r = check(repo)
            print(json.dumps(r, indent=1))
            return 2 if r["damaged"] else 0
        if cmd == "wal":
            print(json.dumps(wal_report(repo), indent=1))
            return 0
        if cmd == "get-wal" and len(rest) in (2, 3):
            data, source = get_segment(repo, rest[0], padded="--unpadded" not in rest[2:])
            with open(rest[1], "wb") as f:
                f.write(data)
            print(json.dumps({"name": rest[0], "source": source, "bytes": len(data)}))
            return 0
        if cmd == "cat" and len(rest) == 2:
            raw = repo.get(rest[0])
            if raw is None:
                raise NotFound(f"no object {rest[0]}")
            with open(rest[1], "wb") as f:
                f.write(raw)
            return 0
        if cmd == "backups":
            print(json.dumps(backups(repo), indent=1))
            return 0
        if cmd == "extract" and len(rest) == 2:
            r = extract(repo, rest[0], rest[1])
            print(json.dumps(r, indent=1))
            return 2 if r["mismatches"] or r["missing"] else 0
    except NotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Damage as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(__doc__, file=sys.stderr)
    return 3

if __name__ == "__main__":
    sys.exit(main(sys.argv))
