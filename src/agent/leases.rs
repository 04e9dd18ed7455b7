//! The agent's leases: one keeper ([`lease::keep`]) per pipeline, schedule and archive, each in
//! the database its work lives in, and what each keeper sees mirrored into
//! `invsync_lease_held{lease}`, `invsync_lease_epoch{lease}` and `/status`.
//!
//! Invariants:
//! - The keepers stop on their own signal, sent only after every task doing work under a
//!   lease has stopped (see `agent::run`), so a lease is released after its work ended and a
//!   standby takes over at once, never while the work still writes.
//! - The keepers run apart from the work they license: a database that is down stops only the
//!   leases (and so the work) that live in it.
//! - A configuration without any database (only repository jobs) has nowhere to keep leases:
//!   its schedules hold a lease of epoch 0 that is never contested, and run no fence.

use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinSet;

use super::lease::{self, LeasePlace, LeaseStatus};
use super::metrics::Metrics;
use super::status::LeaseView;
use super::{AgentError, Shared};
use crate::config::Config;

/// The status of each pipeline's and each schedule's lease, published by its keeper.
pub struct Leases {
    pub pipelines: Vec<(String, watch::Receiver<LeaseStatus>)>,
    pub schedules: Vec<(String, watch::Receiver<LeaseStatus>)>,
    pub archives: Vec<(String, watch::Receiver<LeaseStatus>)>,
}

impl Leases {
    /// The lease of `pipeline`'s work.
    pub fn pipeline(&self, name: &str) -> watch::Receiver<LeaseStatus> {
        find(&self.pipelines, name)
    }

    /// The lease of `schedule`'s work.
    pub fn schedule(&self, name: &str) -> watch::Receiver<LeaseStatus> {
        find(&self.schedules, name)
    }

    /// The lease of `archive`'s work.
    pub fn archive(&self, name: &str) -> watch::Receiver<LeaseStatus> {
        find(&self.archives, name)
    }
}

fn find(
    all: &[(String, watch::Receiver<LeaseStatus>)],
    name: &str,
) -> watch::Receiver<LeaseStatus> {
    all.iter()
        .find(|(n, _)| n == name)
        .map(|(_, rx)| rx.clone())
        .expect("a keeper is started for every pipeline, schedule and archive of the configuration")
}

/// Starts a keeper for every pipeline and schedule of `config` on `tasks`, as `holder`,
/// released when `stop` turns true. Fails when a lease has no database to live in.
pub fn start(
    config: &Arc<Config>,
    holder: &str,
    shared: &Arc<Shared>,
    tasks: &mut JoinSet<()>,
    stop: &watch::Receiver<bool>,
) -> Result<Leases, AgentError> {
    let config_error = |e: lease::LeaseError| AgentError::Config(e.to_string());
    let keep = |place: LeasePlace, tasks: &mut JoinSet<()>| {
        let (tx, rx) = watch::channel(LeaseStatus {
            lease: place.name.clone(),
            held: false,
            epoch: 0,
            holder: None,
            known: false,
        });
        // Shown before any task runs, so `/readyz` never answers before the lease is listed.
        show(shared, &rx.borrow(), &place.database);
        tasks.spawn(mirror(rx.clone(), place.database.clone(), shared.clone()));
        tasks.spawn(lease::keep(
            place,
            holder.to_string(),
            config.agent.lease,
            tx,
            stop.clone(),
        ));
        rx
    };
    let mut pipelines = Vec::new();
    for name in config.pipelines.keys() {
        let place = lease::pipeline_lease(config, name).map_err(config_error)?;
        pipelines.push((name.clone(), keep(place, tasks)));
    }
    let mut schedules = Vec::new();
    for s in &config.schedules {
        let rx = if config.databases.is_empty() && config.agent.lease_db.is_none() {
            unleased(format!("schedule/{}", s.name), tasks, stop)
        } else {
            keep(
                lease::schedule_lease(config, s).map_err(config_error)?,
                tasks,
            )
        };
        schedules.push((s.name.clone(), rx));
    }
    let mut archives = Vec::new();
    for name in config.archives.keys() {
        let place = lease::archive_lease(config, name).map_err(config_error)?;
        archives.push((name.clone(), keep(place, tasks)));
    }
    Ok(Leases {
        pipelines,
        schedules,
        archives,
    })
}

/// A lease that is always held, with epoch 0 (no fence), for a configuration without any
/// database to keep leases in: its jobs run on every agent started with it.
fn unleased(
    name: String,
    tasks: &mut JoinSet<()>,
    stop: &watch::Receiver<bool>,
) -> watch::Receiver<LeaseStatus> {
    tracing::warn!(
        lease = %name,
        "the configuration has no database to keep this schedule's lease in: its job runs on every agent using this configuration"
    );
    let (tx, rx) = watch::channel(LeaseStatus {
        lease: name,
        held: true,
        epoch: 0,
        holder: None,
        known: true,
    });
    let mut stop = stop.clone();
    // The status stays held until the leases are released.
    tasks.spawn(async move {
        let _held = tx;
        let _ = stop.wait_for(|s| *s).await;
    });
    rx
}

/// Copies every change of one lease into the metrics and `/status`, until its keeper ends.
async fn mirror(mut status: watch::Receiver<LeaseStatus>, database: String, shared: Arc<Shared>) {
    loop {
        let now = status.borrow_and_update().clone();
        show(&shared, &now, &database);
        if status.changed().await.is_err() {
            return;
        }
    }
}

fn show(shared: &Shared, now: &LeaseStatus, database: &str) {
    let labels = Metrics::lease(&now.lease);
    shared
        .metrics
        .lease_held
        .get_or_create(&labels)
        .set(now.held.into());
    shared
        .metrics
        .lease_epoch
        .get_or_create(&labels)
        .set(now.epoch);
    shared.board.set_lease(LeaseView {
        lease: now.lease.clone(),
        database: database.to_string(),
        held: now.held,
        epoch: now.epoch,
        holder: now.holder.clone(),
        known: now.known,
    });
}
