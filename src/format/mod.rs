//! File formats inside a PostgreSQL base backup: the tar streams BASE_BACKUP sends and the
//! backup manifest. Pure parsers, shared by the backup and restore jobs.

pub mod manifest;
pub mod tar;
