//! Object framing, compression and checksums.
