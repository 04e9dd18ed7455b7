//! Leases: which of the agents of a deployment runs a pipeline or a scheduled job.
//!
//! A lease is a row of `invsync.lease` (name, holder, epoch, expiry, renewal time) in the
//! *lease database* of its work: the database the pipeline or job reads from, or `[agent]
//! lease_db` for every lease ([`pipeline_lease`], [`schedule_lease`]), so that when one data
//! center is down the agents elsewhere keep running the work of the databases they can reach.
//! It is a row, not an advisory lock, so it does not vanish silently with a TCP connection, and
//! it carries an epoch that fences writes (see [`crate::pg::Fence`]).
//!
//! The database's side ([`LeaseStore`]), judged on the database's clock only:
//! - acquire succeeds only when the lease is free, expired, or already this holder's, and
//!   raises the epoch by one every time (a new term, also for the same holder);
//! - renew succeeds only for the holder with its epoch, and moves the expiry to `now() +
//!   duration`;
//! - release (on a clean stop) expires the lease at once, so a standby need not wait.
//!
//! The holder's side ([`Holder`], a pure state machine on the local monotonic clock): a
//! holder counts its lease as held only until `renew_deadline` after the moment it *sent* the
//! last request that succeeded, and the database set the expiry to `duration` after it
//! *received* it, which is later. With `renew_deadline < duration` the holder gives the lease
//! up (and the agent stops the work) before the database can let anyone else acquire it, as
//! Patroni and Kubernetes leader election do. A request that does not answer in time counts
//! as failed. What a holder stops too late (a process paused past its deadline) is caught by
//! the fence: the epoch is checked where writes become durable.
//!
//! A new holder of a pipeline does not wait for the old one's sessions to time out (a paused
//! process keeps its connections, and its walsender lives until `wal_sender_timeout`): it ends
//! them ([`take_over_pipeline`]), which its lease makes safe.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_postgres::Client;

use crate::cdc::{self, names};
use crate::config::{Config, LeaseTiming, ScheduleConfig};
use crate::pg::{ConnInfo, Fence, PgError};

const INSTALL: &str = "
CREATE SCHEMA IF NOT EXISTS invsync;
CREATE TABLE IF NOT EXISTS invsync.lease (
    name text PRIMARY KEY,
    holder text NOT NULL,
    epoch bigint NOT NULL,
    expires_at timestamptz NOT NULL,
    renewed_at timestamptz NOT NULL
);";

/// Everything that can go wrong with a lease. One line each, naming the lease's database.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error("{0}")]
    Config(String),
    #[error("lease {lease} on {database}: its row vanished while it was acquired; do not delete rows of invsync.lease while agents run")]
    Vanished { lease: String, database: String },
    #[error("lease {lease} on {database}: no answer before the renew deadline; the database may be unreachable")]
    Timeout { lease: String, database: String },
}

impl LeaseError {
    /// True when trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            LeaseError::Pg(e) => e.is_transient(),
            LeaseError::Config(_) => false,
            LeaseError::Vanished { .. } | LeaseError::Timeout { .. } => true,
        }
    }
}

/// Where a lease lives: its name and the database holding its row.
#[derive(Debug, Clone)]
pub struct LeasePlace {
    /// `pipeline/NAME` or `schedule/NAME`.
    pub name: String,
    /// The configured name of the lease database.
    pub database: String,
    pub conn: ConnInfo,
}

/// The lease of `pipeline`: in `[agent] lease_db`, else in the pipeline's source database.
pub fn pipeline_lease(config: &Config, pipeline: &str) -> Result<LeasePlace, LeaseError> {
    let p = config.pipeline(pipeline).map_err(LeaseError::Config)?;
    place(config, format!("pipeline/{pipeline}"), Some(&p.source))
}

/// The lease of `archive`: in `[agent] lease_db`, else in the archived database.
pub fn archive_lease(config: &Config, archive: &str) -> Result<LeasePlace, LeaseError> {
    let a = config
        .archives
        .get(archive)
        .ok_or_else(|| LeaseError::Config(format!("no archive named `{archive}`")))?;
    place(config, format!("archive/{archive}"), Some(&a.db))
}

/// The lease of `schedule`: in `[agent] lease_db`, else in the first database the job reads
/// from; a job that reads no database (forget, prune, verify of a repository) uses the first
/// database of the configuration by name.
pub fn schedule_lease(
    config: &Config,
    schedule: &ScheduleConfig,
) -> Result<LeasePlace, LeaseError> {
    let first = config.databases.keys().next();
    let database = schedule.databases.first().or(first);
    place(config, format!("schedule/{}", schedule.name), database)
}

fn place(config: &Config, name: String, own: Option<&String>) -> Result<LeasePlace, LeaseError> {
    let database = config.agent.lease_db.as_ref().or(own).ok_or_else(|| {
        LeaseError::Config(format!(
            "lease {name}: the configuration defines no database to hold it; add [agent] lease_db"
        ))
    })?;
    let conn = config
        .database(database)
        .map_err(LeaseError::Config)?
        .conn
        .clone();
    Ok(LeasePlace {
        name,
        database: database.clone(),
        conn,
    })
}

/// What an acquire found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// The caller holds the lease now, with this epoch.
    Won { epoch: i64 },
    /// Someone holds it (possibly the caller, under an epoch the caller no longer counts on).
    Held {
        holder: String,
        epoch: i64,
        expires_at: DateTime<Utc>,
    },
}

/// A lease's row as the database holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    pub holder: String,
    pub epoch: i64,
    pub expires_at: DateTime<Utc>,
    pub renewed_at: DateTime<Utc>,
}

/// The `invsync.lease` table of one database. Every method is one autocommit statement, so a
/// request lost with its connection either happened whole or not at all.
pub struct LeaseStore<'a> {
    pub client: &'a Client,
    pub conn: &'a ConnInfo,
}

impl LeaseStore<'_> {
    fn q(&self, what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> PgError + '_ {
        move |e| PgError::query(what, self.conn, e)
    }

    /// Creates the `invsync` schema and the lease table if missing.
    pub async fn install(&self) -> Result<(), LeaseError> {
        self.client
            .batch_execute(INSTALL)
            .await
            .map_err(self.q("creating the lease table"))?;
        Ok(())
    }

    /// Takes lease `name` for `holder` for `duration` if it is free, expired or `holder`'s
    /// already, raising its epoch; else says who holds it.
    pub async fn acquire(
        &self,
        name: &str,
        holder: &str,
        duration: Duration,
    ) -> Result<Acquired, LeaseError> {
        let secs = duration.as_secs_f64();
        let won = self
            .client
            .query_opt(
                "INSERT INTO invsync.lease AS l (name, holder, epoch, expires_at, renewed_at) \
                 VALUES ($1, $2, 1, now() + $3 * interval '1 second', now()) \
                 ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, epoch = l.epoch + 1, \
                     expires_at = excluded.expires_at, renewed_at = excluded.renewed_at \
                 WHERE l.expires_at <= now() OR l.holder = excluded.holder \
                 RETURNING epoch",
                &[&name, &holder, &secs],
            )
            .await
            .map_err(self.q("acquiring a lease"))?;
        if let Some(row) = won {
            return Ok(Acquired::Won { epoch: row.get(0) });
        }
        match self.read(name).await? {
            Some(row) => Ok(Acquired::Held {
                holder: row.holder,
                epoch: row.epoch,
                expires_at: row.expires_at,
            }),
            // Deleted between the two statements: not by invsync, which never deletes a lease.
            None => Err(LeaseError::Vanished {
                lease: name.to_string(),
                database: self.conn.to_string(),
            }),
        }
    }

    /// Extends lease `name` by `duration` from now, if `holder` still holds it with `epoch`;
    /// false if not (someone else took it over, or it was released).
    pub async fn renew(
        &self,
        name: &str,
        holder: &str,
        epoch: i64,
        duration: Duration,
    ) -> Result<bool, LeaseError> {
        let secs = duration.as_secs_f64();
        let n = self
            .client
            .execute(
                "UPDATE invsync.lease SET expires_at = now() + $4 * interval '1 second', \
                     renewed_at = now() \
                 WHERE name = $1 AND holder = $2 AND epoch = $3",
                &[&name, &holder, &epoch, &secs],
            )
            .await
            .map_err(self.q("renewing a lease"))?;
        Ok(n == 1)
    }

    /// Gives lease `name` up at once if `holder` holds it with `epoch`; the epoch stays, so
    /// the next holder's is higher.
    pub async fn release(&self, name: &str, holder: &str, epoch: i64) -> Result<(), LeaseError> {
        self.client
            .execute(
                "UPDATE invsync.lease SET expires_at = now() \
                 WHERE name = $1 AND holder = $2 AND epoch = $3 AND expires_at > now()",
                &[&name, &holder, &epoch],
            )
            .await
            .map_err(self.q("releasing a lease"))?;
        Ok(())
    }

    /// Lease `name`'s row, if it was ever acquired.
    pub async fn read(&self, name: &str) -> Result<Option<LeaseRow>, LeaseError> {
        let row = self
            .client
            .query_opt(
                "SELECT holder, epoch, expires_at, renewed_at FROM invsync.lease WHERE name = $1",
                &[&name],
            )
            .await
            .map_err(self.q("reading a lease"))?;
        Ok(row.map(|r| LeaseRow {
            holder: r.get(0),
            epoch: r.get(1),
            expires_at: r.get(2),
            renewed_at: r.get(3),
        }))
    }
}

/// What a holder does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Send an acquire request.
    Acquire,
    /// Send a renew request for `epoch`.
    Renew { epoch: i64 },
    /// Nothing until this moment (or until the lease lapses, whichever is first).
    Wait(Instant),
}

/// A holder's view of its lease. See the module documentation for the timing rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HolderState {
    /// Not holding; try to acquire at `next_try`. `seen`: the holder and epoch the last
    /// attempt found.
    Standby {
        next_try: Instant,
        seen: Option<(String, i64)>,
    },
    /// Holding with `epoch` until `valid_until` unless renewed; renew at `next_renew`.
    Holding {
        epoch: i64,
        valid_until: Instant,
        next_renew: Instant,
    },
}

/// The holder's state machine. It reads no clock: every call is given the moments it needs,
/// so the rule can be tested on any timeline.
#[derive(Debug, Clone)]
pub struct Holder {
    timing: LeaseTiming,
    state: HolderState,
}

impl Holder {
    /// A standby that tries to acquire at once.
    pub fn new(timing: LeaseTiming, now: Instant) -> Self {
        Holder {
            timing,
            state: HolderState::Standby {
                next_try: now,
                seen: None,
            },
        }
    }

    pub fn state(&self) -> &HolderState {
        &self.state
    }

    /// The epoch held at `now`, if any.
    pub fn held(&self, now: Instant) -> Option<i64> {
        match self.state {
            HolderState::Holding {
                epoch, valid_until, ..
            } if now < valid_until => Some(epoch),
            _ => None,
        }
    }

    /// The last moment a request sent at `sent` may answer and still count.
    pub fn answer_deadline(&self, sent: Instant) -> Instant {
        match self.state {
            HolderState::Holding { valid_until, .. } => valid_until,
            HolderState::Standby { .. } => sent + self.timing.renew_deadline,
        }
    }

    /// Gives the lease up if it lapsed by `now`; true if it did.
    pub fn expire(&mut self, now: Instant) -> bool {
        match self.state {
            HolderState::Holding { valid_until, .. } if now >= valid_until => {
                self.standby(now, None);
                true
            }
            _ => false,
        }
    }

    /// What to do at `now` (after [`Holder::expire`]).
    pub fn step(&self, now: Instant) -> Step {
        match self.state {
            HolderState::Standby { next_try, .. } if now >= next_try => Step::Acquire,
            HolderState::Standby { next_try, .. } => Step::Wait(next_try),
            HolderState::Holding {
                epoch, next_renew, ..
            } if now >= next_renew => Step::Renew { epoch },
            HolderState::Holding {
                next_renew,
                valid_until,
                ..
            } => Step::Wait(next_renew.min(valid_until)),
        }
    }

    /// The answer to an acquire sent at `sent`, received at `now` (`None`: failed or no answer).
    pub fn acquired(&mut self, sent: Instant, now: Instant, answer: Option<&Acquired>) {
        let valid_until = sent + self.timing.renew_deadline;
        match answer {
            Some(Acquired::Won { epoch }) if now < valid_until => {
                self.state = HolderState::Holding {
                    epoch: *epoch,
                    valid_until,
                    next_renew: sent + self.timing.renew_interval,
                };
            }
            // Won too late to count on it: the next attempt takes it again with a new epoch.
            Some(Acquired::Won { .. }) => self.standby(now, None),
            Some(Acquired::Held { holder, epoch, .. }) => {
                self.standby(now, Some((holder.clone(), *epoch)))
            }
            None => self.standby(now, None),
        }
    }

    /// The answer to a renew of `epoch` sent at `sent`, received at `now` (`None`: failed or no
    /// answer; `Some(false)`: the lease is no longer this holder's).
    pub fn renewed(&mut self, epoch: i64, sent: Instant, now: Instant, answer: Option<bool>) {
        let HolderState::Holding {
            epoch: held,
            valid_until,
            ..
        } = self.state
        else {
            return;
        };
        if held != epoch || self.expire(now) {
            return;
        }
        match answer {
            Some(true) => {
                self.state = HolderState::Holding {
                    epoch,
                    valid_until: valid_until.max(sent + self.timing.renew_deadline),
                    next_renew: sent + self.timing.renew_interval,
                }
            }
            Some(false) => self.standby(now, None),
            // Try again soon, while the lease still counts.
            None => {
                self.state = HolderState::Holding {
                    epoch,
                    valid_until,
                    next_renew: now + self.retry(),
                }
            }
        }
    }

    fn retry(&self) -> Duration {
        (self.timing.renew_interval / 4).max(Duration::from_millis(100))
    }

    /// Not holding from `now`; `seen` replaces what the last attempt found, if given.
    fn standby(&mut self, now: Instant, seen: Option<(String, i64)>) {
        let seen = seen.or_else(|| match &self.state {
            HolderState::Standby { seen, .. } => seen.clone(),
            HolderState::Holding { .. } => None,
        });
        self.state = HolderState::Standby {
            next_try: now + self.timing.renew_interval,
            seen,
        };
    }
}

/// What the agent shows of a lease (`/status`) and exports as metrics:
/// `invsync_lease_held{lease}` is [`LeaseStatus::held`] as 0/1, `invsync_lease_epoch{lease}` is
/// [`LeaseStatus::epoch`] (this agent's when it holds the lease, else the holder's last seen,
/// 0 if none).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LeaseStatus {
    pub lease: String,
    pub held: bool,
    pub epoch: i64,
    /// Who holds it, when another agent does (as last seen).
    pub holder: Option<String>,
    /// The lease's database has answered this keeper at least once, so `held` and `holder`
    /// say what the database holds rather than the keeper's starting guess.
    pub known: bool,
}

impl LeaseStatus {
    /// The fence for work done under the lease, while it is held.
    pub fn fence(&self) -> Option<Fence> {
        self.held.then(|| Fence {
            lease: self.lease.clone(),
            epoch: self.epoch,
        })
    }
}

/// This process's identity as a lease holder: `host:pid:random`, unique per process.
pub fn holder_id() -> String {
    format!(
        "{}:{}:{}",
        crate::backup::lock::hostname(),
        std::process::id(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Keeps one lease for `holder`: acquires it whenever it can, renews it while held, publishes
/// every change on `status`, and releases it when `stop` turns true (or its sender is dropped).
/// The work done under the lease must stop as soon as `status` says it is not held.
pub async fn keep(
    place: LeasePlace,
    holder: String,
    timing: LeaseTiming,
    status: watch::Sender<LeaseStatus>,
    mut stop: watch::Receiver<bool>,
) {
    let mut machine = Holder::new(timing, Instant::now());
    let mut db = Connection {
        place: place.clone(),
        client: None,
    };
    let (name, duration) = (place.name.as_str(), timing.duration);
    let mut known = false;
    loop {
        let now = Instant::now();
        if machine.expire(now) {
            tracing::warn!(lease = %place.name, database = %place.database, "lease lost: not renewed within the deadline; stopping its work");
        }
        publish(&place, &machine, now, known, &status);
        if *stop.borrow() {
            break;
        }
        match machine.step(now) {
            Step::Wait(until) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => {}
                    _ = stop.changed() => {}
                }
            }
            Step::Acquire => {
                let sent = Instant::now();
                let deadline = machine.answer_deadline(sent);
                let answer = db
                    .request(deadline, async |s| s.acquire(name, &holder, duration).await)
                    .await;
                match &answer {
                    Ok(Acquired::Won { epoch }) => {
                        tracing::info!(lease = %place.name, database = %place.database, epoch, "lease acquired")
                    }
                    Ok(Acquired::Held { .. }) => {}
                    Err(e) => {
                        tracing::warn!(lease = %place.name, database = %place.database, "cannot acquire the lease: {e}")
                    }
                }
                known |= answer.is_ok();
                machine.acquired(sent, Instant::now(), answer.as_ref().ok());
            }
            Step::Renew { epoch } => {
                let sent = Instant::now();
                let deadline = machine.answer_deadline(sent);
                let answer = db
                    .request(deadline, async |s| {
                        s.renew(name, &holder, epoch, duration).await
                    })
                    .await;
                match &answer {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(lease = %place.name, database = %place.database, epoch, "lease lost: another agent holds it now")
                    }
                    Err(e) => {
                        tracing::warn!(lease = %place.name, database = %place.database, epoch, "cannot renew the lease: {e}")
                    }
                }
                known |= answer.is_ok();
                machine.renewed(epoch, sent, Instant::now(), answer.ok());
            }
        }
    }
    let now = Instant::now();
    if let Some(epoch) = machine.held(now) {
        let deadline = machine.answer_deadline(now);
        let released = db
            .request(deadline, async |s| s.release(name, &holder, epoch).await)
            .await;
        match released {
            Ok(()) => tracing::info!(lease = %place.name, epoch, "lease released"),
            Err(e) => {
                tracing::warn!(lease = %place.name, epoch, "cannot release the lease (it expires by itself): {e}")
            }
        }
    }
    status.send_if_modified(|s| std::mem::replace(&mut s.held, false));
}

/// The keeper's connection to the lease database, made (with the lease table) when needed
/// and dropped after a request that failed or did not answer in time.
struct Connection {
    place: LeasePlace,
    client: Option<Client>,
}

impl Connection {
    /// Runs `request` on the lease table, answered by `deadline` or failed.
    async fn request<T>(
        &mut self,
        deadline: Instant,
        request: impl AsyncFnOnce(LeaseStore<'_>) -> Result<T, LeaseError>,
    ) -> Result<T, LeaseError> {
        let (place, client) = (&self.place, &mut self.client);
        let attempt = async {
            if client.as_ref().is_none_or(Client::is_closed) {
                let fresh = place.conn.connect().await?;
                LeaseStore {
                    client: &fresh,
                    conn: &place.conn,
                }
                .install()
                .await?;
                *client = Some(fresh);
            }
            let store = LeaseStore {
                client: client.as_ref().expect("connected above"),
                conn: &place.conn,
            };
            request(store).await
        };
        let result = tokio::time::timeout_at(deadline, attempt)
            .await
            .unwrap_or_else(|_| {
                Err(LeaseError::Timeout {
                    lease: place.name.clone(),
                    database: place.database.clone(),
                })
            });
        if result.is_err() {
            self.client = None;
        }
        result
    }
}

fn publish(
    place: &LeasePlace,
    machine: &Holder,
    now: Instant,
    known: bool,
    status: &watch::Sender<LeaseStatus>,
) {
    let next = match (machine.held(now), machine.state()) {
        (Some(epoch), _) => LeaseStatus {
            lease: place.name.clone(),
            held: true,
            epoch,
            holder: None,
            known,
        },
        (None, HolderState::Standby { seen, .. }) => LeaseStatus {
            lease: place.name.clone(),
            held: false,
            epoch: seen.as_ref().map_or(0, |s| s.1),
            holder: seen.as_ref().map(|s| s.0.clone()),
            known,
        },
        (None, HolderState::Holding { epoch, .. }) => LeaseStatus {
            lease: place.name.clone(),
            held: false,
            epoch: *epoch,
            holder: None,
            known,
        },
    };
    status.send_if_modified(|s| {
        if *s == next {
            false
        } else {
            *s = next;
            true
        }
    });
}

/// Waits until `status` says the lease is held; returns its fence.
pub async fn until_held(status: &mut watch::Receiver<LeaseStatus>) -> Option<Fence> {
    status
        .wait_for(|s| s.held)
        .await
        .ok()
        .and_then(|s| s.fence())
}

/// Waits until `status` says the lease is no longer held (or its keeper stopped).
pub async fn until_lost(status: &mut watch::Receiver<LeaseStatus>) {
    let _ = status.wait_for(|s| !s.held).await;
}

/// What [`take_over_pipeline`] ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct TakeOver {
    /// The process id of the walsender that served the pipeline's slot, if one was active.
    pub walsender: Option<i32>,
    /// Per target, the process ids of apply sessions of the pipeline that were ended.
    pub apply_sessions: Vec<(String, Vec<i32>)>,
}

/// Ends what an earlier holder of `pipeline` may still have open: the walsender of its slot on
/// the source (`pg_terminate_backend` of the slot's `active_pid`, rather than waiting for
/// `wal_sender_timeout`) and its apply sessions on the targets (found by their
/// `application_name`, the pipeline's replication origin there). Call it only while holding the
/// pipeline's lease, before running it. The role needs to be a member of the sessions' role
/// (the same role is enough) or of `pg_signal_backend`.
pub async fn take_over_pipeline(config: &Config, pipeline: &str) -> Result<TakeOver, LeaseError> {
    let p = config.pipeline(pipeline).map_err(LeaseError::Config)?;
    let conn = |db: &str| -> Result<ConnInfo, LeaseError> {
        Ok(config
            .database(db)
            .map_err(LeaseError::Config)?
            .conn
            .clone())
    };
    // Targets first: a live old run that loses its stream drops its target sessions itself.
    let mut apply_sessions = Vec::new();
    for target in &p.targets {
        let tconn = conn(target)?;
        let client = tconn.connect().await?;
        let origin = names::origin(pipeline, target);
        let pids: Vec<i32> = client
            .query(
                // The filter runs first (a qual's order is the planner's choice): only the
                // sessions found are signalled, never this one.
                "SELECT pid FROM (SELECT pid FROM pg_stat_activity \
                     WHERE application_name = $1 AND datname = current_database() \
                       AND pid <> pg_backend_pid() OFFSET 0) old \
                 WHERE pg_terminate_backend(pid)",
                &[&origin],
            )
            .await
            .map_err(|e| PgError::query("ending the old apply sessions", &tconn, e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if !pids.is_empty() {
            tracing::info!(
                pipeline,
                target,
                ?pids,
                "ended the previous holder's apply sessions"
            );
        }
        apply_sessions.push((target.clone(), pids));
    }
    let source = conn(&p.source)?;
    let client = source.connect().await?;
    let slot = names::slot(pipeline);
    let walsender = cdc::slot::end_walsender(&client, &source, &slot).await?;
    if let Some(pid) = walsender {
        tracing::info!(pipeline, slot, pid, "ended the previous holder's walsender");
    }
    Ok(TakeOver {
        walsender,
        apply_sessions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(agent: &str) -> Config {
        let text = format!(
            "[databases.maindc]\nurl = \"postgres://u@10.0.0.1/einvoice\"\n\
             [databases.cloud_a]\nurl = \"postgres://u@10.0.0.2/einvoice\"\n\
             [pipelines.up]\nsource = \"cloud_a\"\ntargets = [\"maindc\"]\ntables = [\"public.t\"]\n\
             [repositories.offsite]\nurl = \"file:///tmp/r\"\n{agent}\n\
             [[schedules]]\nname = \"b\"\ncron = \"0 0 2 * * *\"\njob = \"backup\"\ndb = \"maindc\"\n\
             [[schedules]]\nname = \"p\"\ncron = \"0 0 3 * * *\"\njob = \"prune\"\n"
        );
        Config::parse(std::path::Path::new("a.toml"), &text, &|_| None).unwrap()
    }

    #[test]
    fn each_lease_lives_with_its_work_unless_lease_db_says_otherwise() {
        let c = config("");
        let at = |p: Result<LeasePlace, LeaseError>| {
            let p = p.unwrap();
            (p.name, p.database)
        };
        assert_eq!(
            at(pipeline_lease(&c, "up")),
            ("pipeline/up".into(), "cloud_a".into())
        );
        assert_eq!(
            at(schedule_lease(&c, &c.schedules[0])),
            ("schedule/b".into(), "maindc".into())
        );
        // A job that reads no database: the first database by name.
        assert_eq!(
            at(schedule_lease(&c, &c.schedules[1])),
            ("schedule/p".into(), "cloud_a".into())
        );
        let c = config("[agent]\nlease_db = \"maindc\"");
        assert_eq!(at(pipeline_lease(&c, "up")).1, "maindc");
        assert_eq!(at(schedule_lease(&c, &c.schedules[1])).1, "maindc");
        assert!(pipeline_lease(&c, "down").is_err());
    }

    fn timing() -> LeaseTiming {
        LeaseTiming::default()
    }

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn a_standby_acquires_at_once_and_renews_every_interval() {
        let t0 = Instant::now();
        let mut h = Holder::new(timing(), t0);
        assert_eq!(h.step(t0), Step::Acquire);
        h.acquired(t0, t0 + s(1), Some(&Acquired::Won { epoch: 7 }));
        assert_eq!(h.held(t0 + s(1)), Some(7));
        assert_eq!(h.step(t0 + s(1)), Step::Wait(t0 + s(5)));
        assert_eq!(h.step(t0 + s(5)), Step::Renew { epoch: 7 });
        h.renewed(7, t0 + s(5), t0 + s(6), Some(true));
        // Valid for the deadline from when the renewal was sent, not when it answered.
        assert_eq!(h.held(t0 + s(14)), Some(7));
        assert_eq!(h.held(t0 + s(15)), None);
        assert_eq!(h.step(t0 + s(6)), Step::Wait(t0 + s(10)));
    }

    #[test]
    fn a_holder_whose_renewals_fail_gives_up_before_the_lease_can_expire() {
        let t = timing();
        let t0 = Instant::now();
        let mut h = Holder::new(t, t0);
        h.acquired(t0, t0, Some(&Acquired::Won { epoch: 1 }));
        // Renewals from t0+5 s on fail; each failure retries soon, while the lease counts.
        let mut now = t0 + t.renew_interval;
        while let Step::Renew { epoch } = h.step(now) {
            h.renewed(epoch, now, now + Duration::from_millis(10), None);
            now = match h.step(now) {
                Step::Wait(w) => w,
                other => panic!("{other:?}"),
            };
            assert!(now <= t0 + t.renew_deadline);
        }
        // The database expires the lease `duration` after it received the acquire, which was
        // at or after t0: the holder counts it held strictly less long.
        let last_held = t0 + t.renew_deadline - Duration::from_nanos(1);
        assert_eq!(h.held(last_held), Some(1));
        assert_eq!(h.held(t0 + t.renew_deadline), None);
        assert!(t.renew_deadline < t.duration);
        assert!(h.expire(t0 + t.renew_deadline));
        assert!(matches!(h.state(), HolderState::Standby { .. }));
        // It tries again after an interval, for a new epoch.
        assert_eq!(
            h.step(t0 + t.renew_deadline),
            Step::Wait(t0 + t.renew_deadline + t.renew_interval)
        );
    }

    #[test]
    fn an_answer_after_the_deadline_does_not_count() {
        let t0 = Instant::now();
        let mut h = Holder::new(timing(), t0);
        // A slow acquire: won in the database, but answered after the deadline.
        h.acquired(t0, t0 + s(10), Some(&Acquired::Won { epoch: 3 }));
        assert_eq!(h.held(t0 + s(10)), None);
        // A slow renewal answered after the lease lapsed locally.
        h.acquired(t0 + s(20), t0 + s(20), Some(&Acquired::Won { epoch: 4 }));
        h.renewed(4, t0 + s(25), t0 + s(31), Some(true));
        assert_eq!(h.held(t0 + s(31)), None);
        assert!(matches!(h.state(), HolderState::Standby { .. }));
    }

    #[test]
    fn a_renewal_refused_or_a_lease_held_elsewhere_means_standby() {
        let t0 = Instant::now();
        let mut h = Holder::new(timing(), t0);
        h.acquired(
            t0,
            t0,
            Some(&Acquired::Held {
                holder: "b:1:x".into(),
                epoch: 9,
                expires_at: Utc::now(),
            }),
        );
        assert_eq!(h.held(t0), None);
        assert_eq!(
            h.state(),
            &HolderState::Standby {
                next_try: t0 + s(5),
                seen: Some(("b:1:x".into(), 9))
            }
        );
        h.acquired(t0 + s(5), t0 + s(5), Some(&Acquired::Won { epoch: 10 }));
        h.renewed(10, t0 + s(10), t0 + s(10), Some(false));
        assert_eq!(h.held(t0 + s(10)), None);
        // A stale answer for an epoch no longer held changes nothing.
        h.acquired(t0 + s(15), t0 + s(15), Some(&Acquired::Won { epoch: 12 }));
        h.renewed(10, t0 + s(16), t0 + s(16), Some(false));
        assert_eq!(h.held(t0 + s(16)), Some(12));
    }
}
