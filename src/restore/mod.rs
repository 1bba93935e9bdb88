//! `pitr restore`: plan and execute a point-in-time restore.
