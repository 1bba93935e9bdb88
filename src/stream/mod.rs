//! `pitr stream`: continuous WAL streaming through a replication slot.
