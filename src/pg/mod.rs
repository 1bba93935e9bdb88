//! PostgreSQL wire and replication protocol client. Knows nothing of storage or archiving.
