//! `pitr backup`: BASE_BACKUP streamed into the repository.
