//! The pipeline's logical replication slot on the source: checks that the source can decode,
//! creating the slot (with an exported snapshot for the initial copy), reading its state,
//! opening the replication stream, and dropping it.
//!
//! The stream itself is `pgwire-replication`'s; this module only builds its configuration from a
//! [`ConnInfo`] so the replication connection uses the same host, credentials and TLS settings
//! as the SQL connections. Both sides of a pipeline pin the session settings that shape text
//! output ([`TEXT_FORM`](crate::pg::settings::TEXT_FORM)), so a value's text form is read back into the same value.

use std::time::{Duration, Instant};

use pgwire_replication::{ReplicationClient, ReplicationConfig, TlsConfig};
use tokio::sync::watch;
use tokio_postgres::Client;

use super::{decoder, CdcError};
use crate::pg::{ConnInfo, Lsn, PgError, SslMode};

/// The slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone)]
pub struct SlotState {
    /// The pid of the walsender using the slot, if one is.
    pub active_pid: Option<i32>,
    pub confirmed_flush: Option<Lsn>,
    pub restart_lsn: Option<Lsn>,
    /// WAL the slot keeps from being removed: current WAL position minus `restart_lsn`.
    pub retained_bytes: i64,
    /// The source's current WAL position.
    pub current_lsn: Lsn,
}

fn lsn_column(v: Option<String>) -> Option<Lsn> {
    v.and_then(|s| s.parse().ok())
}

/// Refuses a source that cannot feed a pipeline: `wal_level` not logical, or a role without
/// REPLICATION.
pub async fn check_source(client: &Client, conn: &ConnInfo) -> Result<(), CdcError> {
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'), r.rolreplication OR r.rolsuper, current_user::text \
             FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await
        .map_err(|e| PgError::query("checking wal_level and role", conn, e))?;
    let level: String = row.get(0);
    if level != "logical" {
        return Err(CdcError::WalLevel {
            target: conn.to_string(),
            level,
        });
    }
    if !row.get::<_, bool>(1) {
        return Err(CdcError::NoReplicationRole {
            target: conn.to_string(),
            role: row.get(2),
        });
    }
    Ok(())
}

/// The slot's state, or `None` when it does not exist.
pub async fn state(
    client: &Client,
    conn: &ConnInfo,
    slot: &str,
) -> Result<Option<SlotState>, CdcError> {
    let row = client
        .query_opt(
            "SELECT s.active_pid, s.confirmed_flush_lsn::text, s.restart_lsn::text, \
                    COALESCE(pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn), 0)::bigint, \
                    pg_current_wal_lsn()::text \
             FROM pg_replication_slots s WHERE s.slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| PgError::query(format!("reading slot {slot}"), conn, e))?;
    Ok(row.map(|r| SlotState {
        active_pid: r.get(0),
        confirmed_flush: lsn_column(r.get(1)),
        restart_lsn: lsn_column(r.get(2)),
        retained_bytes: r.get(3),
        current_lsn: lsn_column(r.get(4)).unwrap_or_default(),
    }))
}

/// Ends the walsender streaming from `slot` for another session (`pg_terminate_backend` of the
/// slot's `active_pid`), rather than waiting for `wal_sender_timeout`: what a new holder of the
/// slot's work does to a paused or cut-off old holder. Returns its process id, if one was
/// active. The role needs to be a member of the walsender's role or of `pg_signal_backend`.
pub async fn end_walsender(
    client: &Client,
    conn: &ConnInfo,
    slot: &str,
) -> Result<Option<i32>, PgError> {
    Ok(client
        .query_opt(
            "SELECT active_pid, pg_terminate_backend(active_pid) FROM pg_replication_slots \
             WHERE slot_name = $1 AND active_pid IS NOT NULL AND active_pid <> pg_backend_pid()",
            &[&slot],
        )
        .await
        .map_err(|e| PgError::query("ending the old walsender of the slot", conn, e))?
        .map(|r| r.get(0)))
}

/// How long [`drop`] waits for the slot's walsender to end: a `sync run` or agent that has just
/// stopped leaves its walsender on the source for a moment after it exits.
const RELEASE_WAIT: Duration = Duration::from_secs(5);

/// Drops the slot if it exists. Refuses while a process streams from it, after waiting up to
/// [`RELEASE_WAIT`] for it to let go.
pub async fn drop(client: &Client, conn: &ConnInfo, slot: &str) -> Result<bool, CdcError> {
    let deadline = Instant::now() + RELEASE_WAIT;
    loop {
        match state(client, conn, slot).await? {
            None => return Ok(false),
            Some(SlotState {
                active_pid: Some(pid),
                ..
            }) => {
                if Instant::now() >= deadline {
                    return Err(CdcError::SlotInUse {
                        slot: slot.to_string(),
                        target: conn.to_string(),
                        pid,
                    });
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Some(_) => {
                client
                    .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                    .await
                    .map_err(|e| PgError::query(format!("dropping slot {slot}"), conn, e))?;
                return Ok(true);
            }
        }
    }
}

/// The replication-connection settings for `conn`.
pub fn replication_config(
    conn: &ConnInfo,
    slot: &str,
    publication: &str,
) -> Result<ReplicationConfig, CdcError> {
    let c = conn.config();
    let host = match c.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_string(),
    };
    let port = c.get_ports().first().copied().unwrap_or(5432);
    let user = c.get_user().ok_or_else(|| {
        CdcError::Config(format!(
            "{conn}: the URL names no user; add USER@ before the host"
        ))
    })?;
    let password = match c.get_password() {
        Some(p) => String::from_utf8(p.to_vec())
            .map_err(|_| CdcError::Config(format!("{conn}: the password is not UTF-8")))?,
        None => String::new(),
    };
    let root = conn.root_cert().map(|p| p.to_path_buf());
    let tls = match conn.ssl_mode() {
        SslMode::Disable => TlsConfig::disabled(),
        SslMode::Prefer => TlsConfig {
            mode: pgwire_replication::SslMode::Prefer,
            ..TlsConfig::default()
        },
        SslMode::Require if root.is_none() => TlsConfig::require(),
        SslMode::Require | SslMode::VerifyCa => TlsConfig::verify_ca(root),
        SslMode::VerifyFull => TlsConfig::verify_full(root),
    };
    Ok(
        ReplicationConfig::new(host, user, password, conn.dbname(), slot, publication)
            .with_port(port)
            .with_tls(tls)
            .with_options(crate::pg::settings::text_form_options())
            .with_application_name(format!("invsync {slot}")),
    )
}

fn replication_error(conn: &ConnInfo, e: pgwire_replication::PgWireError) -> CdcError {
    use pgwire_replication::PgWireError as E;
    let reason = e.to_string();
    // The server's errors carry their SQLSTATE in the text: connection failures (08), shutdown
    // and termination (57P), and lack of resources (53) pass; an internal end of the client's
    // worker is a lost connection too.
    let transient = e.is_transient()
        || matches!(e, E::Internal(_))
        || (matches!(e, E::Server(_))
            && ["SQLSTATE 08", "SQLSTATE 57P", "SQLSTATE 53"]
                .iter()
                .any(|c| reason.contains(c)));
    CdcError::Replication {
        target: conn.to_string(),
        transient,
        reason,
    }
}

/// A slot just created, with the snapshot it exported. The snapshot stays usable (`SET
/// TRANSACTION SNAPSHOT`) while this value lives; dropping it ends the exporting session.
pub struct CreatedSlot {
    session: ReplicationClient,
    /// Changes committed after this point are streamed; the snapshot sees everything before.
    pub consistent_point: Lsn,
    /// The exported snapshot's name, when one was asked for.
    pub snapshot: Option<String>,
}

impl CreatedSlot {
    /// Ends the exporting session; the snapshot is gone afterwards.
    pub fn release(mut self) {
        self.session.abort();
    }
}

/// Creates the logical slot `slot` (plugin pgoutput). With `export`, the slot exports a
/// snapshot of the moment from which it decodes, for the initial copy.
pub async fn create(
    conn: &ConnInfo,
    slot: &str,
    publication: &str,
    export: bool,
) -> Result<CreatedSlot, CdcError> {
    let cfg = replication_config(conn, slot, publication)?;
    let mut session = ReplicationClient::connect_gated(cfg)
        .await
        .map_err(|e| replication_error(conn, e))?;
    let mode = if export { "export" } else { "nothing" };
    let (consistent_point, snapshot) = create_on(
        &mut session,
        conn,
        &format!("CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput (SNAPSHOT '{mode}')"),
    )
    .await?;
    Ok(CreatedSlot {
        session,
        consistent_point,
        snapshot: if export { snapshot } else { None },
    })
}

/// Runs `command` (a `CREATE_REPLICATION_SLOT`) on `session` and returns the slot's consistent
/// point and, if one was exported, its snapshot name.
async fn create_on(
    session: &mut ReplicationClient,
    conn: &ConnInfo,
    command: &str,
) -> Result<(Lsn, Option<String>), CdcError> {
    let rows = session
        .simple_query(command)
        .await
        .map_err(|e| replication_error(conn, e))?;
    let text = |col: usize| -> Option<String> {
        rows.first()
            .and_then(|r| r.get(col))
            .and_then(|v| v.as_ref())
            .map(|b| String::from_utf8_lossy(b).into_owned())
    };
    let consistent_point = text(1).and_then(|s| s.parse().ok()).ok_or_else(|| {
        CdcError::Protocol(format!(
            "{conn}: CREATE_REPLICATION_SLOT returned no consistent point"
        ))
    })?;
    Ok((consistent_point, text(2)))
}

/// Opens the replication stream of `slot` from `start`, reporting `confirmed` as flushed until
/// the caller reports more.
pub async fn stream(
    conn: &ConnInfo,
    slot: &str,
    publication: &str,
    start: Lsn,
    confirmed: Lsn,
) -> Result<ReplicationClient, CdcError> {
    let cfg = replication_config(conn, slot, publication)?
        .with_start_lsn(pgwire_replication::Lsn(start.0))
        .with_ack_lsn(pgwire_replication::Lsn(confirmed.0))
        .with_status_interval(Duration::from_millis(500))
        .with_buffer_size(4096);
    let mut client = ReplicationClient::connect(cfg)
        .await
        .map_err(|e| replication_error(conn, e))?;
    if let Err(e) = client.wait_started().await {
        // Another session took the slot between our check and the start.
        if e.to_string().contains("SQLSTATE 55006") {
            return Err(CdcError::SlotInUse {
                slot: slot.to_string(),
                target: conn.to_string(),
                pid: 0,
            });
        }
        return Err(replication_error(conn, e));
    }
    Ok(client)
}

/// A stream error as a [`CdcError`].
pub fn stream_error(conn: &ConnInfo, e: pgwire_replication::PgWireError) -> CdcError {
    replication_error(conn, e)
}

/// A temporary slot with the snapshot it exported: a cut of the source at a stream position.
/// The snapshot shows exactly the transactions committed before [`consistent_point`]; the slot
/// streams exactly those committed after it. The slot is TEMPORARY: it belongs to this session
/// and is dropped by the server when the session ends, on every path (dropping this value, the
/// process dying), and it never touches another slot.
///
/// [`consistent_point`]: TemporarySlot::consistent_point
pub struct TemporarySlot {
    session: ReplicationClient,
    conn: ConnInfo,
    /// Changes committed after this point are streamed; the snapshot sees everything before.
    pub consistent_point: Lsn,
    /// The exported snapshot's name, for `SET TRANSACTION SNAPSHOT`; usable until
    /// [`TemporarySlot::changes_until`] starts the stream.
    pub snapshot: String,
}

/// A slot name no other session uses: the prefix and a random suffix.
fn unique_slot_name(prefix: &str) -> String {
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let keep = prefix.len().min(63 - 13);
    format!("{}_{}", &prefix[..keep], &suffix[..12])
}

/// Creates a temporary slot (plugin pgoutput, streaming `publication`) named after `prefix`,
/// exporting its snapshot.
pub async fn create_temporary(
    conn: &ConnInfo,
    prefix: &str,
    publication: &str,
) -> Result<TemporarySlot, CdcError> {
    let name = unique_slot_name(prefix);
    // A logical slot starts from its confirmed position when asked to start at 0/0: the
    // consistent point.
    let cfg = replication_config(conn, &name, publication)?
        .with_status_interval(Duration::from_millis(500))
        .with_buffer_size(4096);
    let mut session = ReplicationClient::connect_gated(cfg)
        .await
        .map_err(|e| replication_error(conn, e))?;
    let (consistent_point, snapshot) = create_on(
        &mut session,
        conn,
        &format!("CREATE_REPLICATION_SLOT {name} TEMPORARY LOGICAL pgoutput (SNAPSHOT 'export')"),
    )
    .await?;
    let Some(snapshot) = snapshot else {
        return Err(CdcError::Protocol(format!(
            "{conn}: CREATE_REPLICATION_SLOT returned no snapshot"
        )));
    };
    Ok(TemporarySlot {
        session,
        conn: conn.clone(),
        consistent_point,
        snapshot,
    })
}

impl TemporarySlot {
    /// Streams the transactions committed after the consistent point up to `until` (the end
    /// of a source commit, as a pipeline's target records it), handing each of their decoded
    /// messages (each transaction's opening with its Begin) to `each` in commit order, then
    /// drops the slot. A transaction is included
    /// exactly when its commit ends at or before `until`. The exported snapshot is gone once
    /// this starts.
    pub async fn changes_until(
        self,
        until: Lsn,
        each: &mut (dyn FnMut(decoder::Message) -> Result<(), CdcError> + Send),
    ) -> Result<(), CdcError> {
        let (_end, end) = watch::channel(Some(until));
        self.changes_to(end, each).await
    }

    /// [`changes_until`](Self::changes_until) with the end told later: streams from the start
    /// while `end` holds `None`, and up to its LSN once it holds one (the sender dropped first
    /// ends the stream where it is).
    pub async fn changes_to(
        mut self,
        mut end: watch::Receiver<Option<Lsn>>,
        each: &mut (dyn FnMut(decoder::Message) -> Result<(), CdcError> + Send),
    ) -> Result<(), CdcError> {
        use pgwire_replication::ReplicationEvent as E;
        let known = *end.borrow();
        if known.is_some_and(|until| until <= self.consistent_point) {
            self.session.abort();
            return Ok(());
        }
        let conn = self.conn.clone();
        self.session
            .start()
            .await
            .map_err(|e| replication_error(&conn, e))?;
        self.session
            .wait_started()
            .await
            .map_err(|e| replication_error(&conn, e))?;
        let mut in_transaction = false;
        // Everything before this position has been sent.
        let mut reached = self.consistent_point;
        loop {
            let until = *end.borrow_and_update();
            if until.is_some_and(|until| !in_transaction && reached >= until) {
                break;
            }
            let received = tokio::select! {
                received = self.session.recv() => received,
                told = end.changed() => {
                    if told.is_err() {
                        break;
                    }
                    continue;
                }
            };
            let event = match received {
                Ok(Some(event)) => event,
                Ok(None) => {
                    return Err(CdcError::Replication {
                        target: conn.to_string(),
                        reason: "the replication stream ended".into(),
                        transient: true,
                    })
                }
                Err(e) => return Err(replication_error(&conn, e)),
            };
            match event {
                // Commits do not overlap: one that starts before `until` ends at or before it.
                E::Begin { final_lsn, .. } if until.is_some_and(|u| Lsn(final_lsn.0) >= u) => break,
                E::Begin {
                    final_lsn,
                    xid,
                    commit_time_micros,
                } => {
                    in_transaction = true;
                    each(decoder::Message::Begin {
                        final_lsn: final_lsn.0,
                        commit_time: commit_time_micros,
                        xid,
                    })?;
                }
                E::Commit { end_lsn, .. } => {
                    in_transaction = false;
                    reached = reached.max(Lsn(end_lsn.0));
                }
                E::XLogData { data, .. } => {
                    let message = decoder::decode(&data).map_err(|error| CdcError::Decode {
                        target: conn.to_string(),
                        error,
                    })?;
                    each(message)?;
                }
                E::KeepAlive { wal_end, .. } if !in_transaction => {
                    reached = reached.max(Lsn(wal_end.0));
                }
                E::KeepAlive { .. } | E::Message { .. } | E::StoppedAt { .. } => {}
            }
        }
        self.session.abort();
        Ok(())
    }

    /// Ends the session, which drops the slot and its snapshot.
    pub fn release(mut self) {
        self.session.abort();
    }
}
