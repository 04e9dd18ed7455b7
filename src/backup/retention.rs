//! Retention: which snapshots `forget` keeps.
//!
//! Policies work as operators know them from restic and borg: `keep_last` keeps the N newest;
//! `keep_hourly` (daily, weekly, monthly) keeps the newest snapshot of each of the N most
//! recent hours (days, ISO weeks, months) that have one. A snapshot is kept if any rule keeps
//! it. Times are bucketed in UTC. An empty policy is refused rather than forgetting everything.

use std::collections::HashSet;

use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::Serialize;

use super::prune::{self, PruneReport};
use super::repository::Repository;
use super::snapshot;
use super::{fence, BackupError};
use crate::pg::Fence;

#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub keep_last: Option<usize>,
    pub keep_hourly: Option<usize>,
    pub keep_daily: Option<usize>,
    pub keep_weekly: Option<usize>,
    pub keep_monthly: Option<usize>,
}

impl Policy {
    pub fn is_empty(&self) -> bool {
        [
            self.keep_last,
            self.keep_hourly,
            self.keep_daily,
            self.keep_weekly,
            self.keep_monthly,
        ]
        .iter()
        .all(Option::is_none)
    }
}

/// The decision for one snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub id: String,
    pub time: DateTime<Utc>,
    pub keep: bool,
    /// The rules that keep it (`last`, `daily`, ...).
    pub reasons: Vec<String>,
}

/// Applies `policy` to snapshots given as (id, time); returns decisions newest first.
pub fn apply(policy: &Policy, snapshots: &[(String, DateTime<Utc>)]) -> Vec<Decision> {
    let mut sorted: Vec<&(String, DateTime<Utc>)> = snapshots.iter().collect();
    sorted.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
    type Bucket = fn(&DateTime<Utc>) -> (i32, u32, u32, u32);
    let rules: [(&str, Option<usize>, Bucket); 5] = [
        ("last", policy.keep_last, |_| (0, 0, 0, 0)),
        ("hourly", policy.keep_hourly, |t| {
            (t.year(), t.ordinal(), t.hour(), 0)
        }),
        ("daily", policy.keep_daily, |t| {
            (t.year(), t.ordinal(), 0, 0)
        }),
        ("weekly", policy.keep_weekly, |t| {
            (t.iso_week().year(), t.iso_week().week(), 0, 0)
        }),
        ("monthly", policy.keep_monthly, |t| {
            (t.year(), t.month(), 0, 0)
        }),
    ];
    let mut out: Vec<Decision> = sorted
        .iter()
        .map(|(id, time)| Decision {
            id: id.clone(),
            time: *time,
            keep: false,
            reasons: Vec::new(),
        })
        .collect();
    for (name, n, bucket) in rules {
        let Some(n) = n else { continue };
        let mut seen = HashSet::new();
        for d in out.iter_mut() {
            let b = if name == "last" {
                (seen.len() as i32, 0, 0, 0)
            } else {
                bucket(&d.time)
            };
            if seen.len() >= n {
                break;
            }
            if seen.insert(b) {
                d.keep = true;
                d.reasons.push(name.to_string());
            }
        }
    }
    out
}

/// Forgets (deletes the manifests of) the snapshots `policy` does not keep, unless `dry_run`.
/// The data they alone referenced stays until `prune`.
pub async fn forget(
    repo: &Repository,
    policy: &Policy,
    dry_run: bool,
) -> Result<Vec<Decision>, BackupError> {
    forget_fenced(repo, policy, dry_run, None).await
}

/// [`forget`] under a lease's `fence`: deletes nothing once a newer epoch of the lease is
/// recorded in the repository (checked after the decisions, right before the deletions).
pub async fn forget_fenced(
    repo: &Repository,
    policy: &Policy,
    dry_run: bool,
    fence: Option<&Fence>,
) -> Result<Vec<Decision>, BackupError> {
    if policy.is_empty() {
        return Err(BackupError::Invalid(
            "no --keep-* option given; refusing to forget every snapshot".into(),
        ));
    }
    let snaps = snapshot::list(repo).await?;
    let pairs: Vec<(String, DateTime<Utc>)> =
        snaps.iter().map(|(id, s)| (id.clone(), s.time)).collect();
    let decisions = apply(policy, &pairs);
    if let (false, Some(f)) = (dry_run, fence) {
        fence::check(repo, f).await?;
    }
    if !dry_run {
        for d in decisions.iter().filter(|d| !d.keep) {
            repo.delete(&format!("snapshots/{}", d.id)).await?;
        }
    }
    Ok(decisions)
}

/// What `invsync forget` did: the decision for every snapshot, and the prune after it.
#[derive(Debug, Clone, Serialize)]
pub struct ForgetReport {
    pub dry_run: bool,
    /// `None` unless a prune was asked for (and this was no dry run).
    pub prune: Option<PruneReport>,
    pub snapshots: Vec<Decision>,
}

/// [`forget`], then, when `then_prune` is set and this is no dry run, [`prune::prune`]; both
/// under `fence` when given (see [`forget_fenced`], [`prune::prune_fenced`]).
pub async fn forget_and_prune(
    repo: &Repository,
    policy: &Policy,
    dry_run: bool,
    then_prune: bool,
    fence: Option<&Fence>,
) -> Result<ForgetReport, BackupError> {
    let snapshots = forget_fenced(repo, policy, dry_run, fence).await?;
    let prune = if then_prune && !dry_run {
        Some(prune::prune_fenced(repo, false, fence).await?)
    } else {
        None
    };
    Ok(ForgetReport {
        dry_run,
        prune,
        snapshots,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn snaps(times: &[(u32, u32, u32)]) -> Vec<(String, DateTime<Utc>)> {
        times
            .iter()
            .enumerate()
            .map(|(i, (m, d, h))| {
                (
                    format!("s{i}"),
                    Utc.with_ymd_and_hms(2026, *m, *d, *h, 0, 0).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn daily_keeps_newest_of_each_day() {
        let s = snaps(&[(3, 1, 1), (3, 1, 5), (3, 2, 1), (3, 3, 1), (3, 3, 9)]);
        let d = apply(
            &Policy {
                keep_daily: Some(2),
                ..Default::default()
            },
            &s,
        );
        let kept: Vec<&str> = d.iter().filter(|d| d.keep).map(|d| d.id.as_str()).collect();
        assert_eq!(kept, vec!["s4", "s2"]);
    }

    #[test]
    fn rules_combine() {
        let s = snaps(&[(1, 10, 0), (2, 10, 0), (3, 10, 0), (3, 11, 0), (3, 12, 0)]);
        let p = Policy {
            keep_last: Some(1),
            keep_monthly: Some(3),
            ..Default::default()
        };
        let d = apply(&p, &s);
        let kept: Vec<&str> = d.iter().filter(|d| d.keep).map(|d| d.id.as_str()).collect();
        assert_eq!(kept, vec!["s4", "s1", "s0"]);
    }
}
