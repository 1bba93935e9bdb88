//! The connection flag `backup` and `stream` share.

use clap::Args;

use super::exit::Failure;
use crate::pg::ConnConfig;

#[derive(Args, Debug)]
pub struct ConnArgs {
    /// Connection string (libpq key=value or postgres:// URL); PG* variables and ~/.pgpass apply.
    /// The role needs REPLICATION. List several hosts with target_session_attrs=read-write to
    /// follow a promoted standby.
    #[arg(
        short = 'd',
        long = "dbname",
        value_name = "CONNINFO",
        default_value = ""
    )]
    pub conninfo: String,
}

impl ConnArgs {
    /// The parsed connection settings, reporting as `application_name`; a malformed string is
    /// bad input.
    pub fn config(&self, application_name: impl Into<String>) -> Result<ConnConfig, Failure> {
        Ok(ConnConfig::parse(&self.conninfo)?.application_name(application_name))
    }
}
