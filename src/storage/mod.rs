//! Object-store backends behind one small type. Knows nothing of PostgreSQL.
