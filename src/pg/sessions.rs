//! Sessions kept open between uses: for a caller that reads the same databases again and
//! again (the agent's poller every few seconds), one client per database instead of a new
//! connection (and a new backend process on the server) for each read.
//!
//! Invariant: a client handed out is open as far as the driver knows; one whose connection
//! closed is replaced on the next use, and the caller [`forgets`](Sessions::forget) a client
//! after a failed request, so a session left in an unknown state (a broken socket, an aborted
//! transaction) is never reused.

use std::collections::HashMap;

use tokio_postgres::Client;

use super::{ConnInfo, PgError};

/// Open clients by the caller's name for each database (its configured name).
#[derive(Default)]
pub struct Sessions {
    clients: HashMap<String, Client>,
}

impl Sessions {
    pub fn new() -> Sessions {
        Sessions::default()
    }

    /// The open client of database `name` (at `conn`), connecting when there is none or its
    /// connection has closed.
    pub async fn client(&mut self, name: &str, conn: &ConnInfo) -> Result<&Client, PgError> {
        if self.clients.get(name).is_none_or(Client::is_closed) {
            let fresh = conn.connect().await?;
            self.clients.insert(name.to_string(), fresh);
        }
        Ok(self.clients.get(name).expect("inserted above when missing"))
    }

    /// Drops the client of database `name`: the next use connects again.
    pub fn forget(&mut self, name: &str) {
        self.clients.remove(name);
    }
}
