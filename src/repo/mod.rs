//! The repository: layout of keys, the descriptor, the catalog of backups and WAL.
