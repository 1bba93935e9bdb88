//! File formats inside a PostgreSQL base backup: the tar streams BASE_BACKUP sends and the
//! backup manifest. Pure parsers and the check of one against the other, shared by the backup,
//! restore and verify jobs.

pub mod archive_check;
pub mod incremental;
pub mod manifest;
pub mod tar;
