//! Re-checking differing keys on fresh reads, so that rows still in flight through a pipeline
//! are not reported.
//!
//! The snapshot comparison finds candidate keys; each is read again from both sides until it is
//! equal (it was in flight: dropped), or its difference is proven (the target's pipeline has
//! confirmed past the point where the source row was read, and the source row did not change
//! between two reads), or the settle window ends (reported as still different). With a window
//! of zero every candidate is read once more and reported if it still differs.
//! The source is always read before the target, so a target that only lags never looks ahead.
//! Differences are handed on as they are proven, never collected here.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use super::db::{ColumnChange, Difference, DifferenceKind};
use super::side::{RowText, Side};
use super::VerifyError;
use crate::pg::keyrange::{Key, Shape};
use crate::pg::{Lsn, PgError};

/// Keys read per query.
const BATCH: usize = 500;

/// How long and how to wait for differences to settle.
#[derive(Debug, Clone)]
pub(crate) struct Settle {
    /// How long a key may keep differing before it is reported.
    pub window: Duration,
    /// Part of the replication slot name of the pipeline feeding the target, if known.
    pub slot_hint: Option<String>,
}

/// Re-reads `candidates` (in key order, for differences to come out in key order) until each
/// is equal, proven different, or the window ends; hands each proven difference to `found`
/// and returns how many candidates turned out equal (changes that were in flight). The
/// differences keep the source row only with `keep_source_rows` (repair SQL needs it).
pub(crate) async fn recheck(
    source: &Side,
    target: &Side,
    shape: &Shape,
    candidates: Vec<Key>,
    settle: &Settle,
    keep_source_rows: bool,
    found: &mut dyn FnMut(Difference) -> Result<(), VerifyError>,
) -> Result<u64, VerifyError> {
    let deadline = Instant::now() + settle.window;
    let mut seen = HashSet::new();
    let mut pending: Vec<Key> = candidates
        .into_iter()
        .filter(|k| seen.insert(k.clone()))
        .collect();
    drop(seen);
    // A hash of each pending key's last source row, to tell a settled row from a moving one.
    let mut previous: HashMap<Key, u64> = HashMap::new();
    let mut in_flight = 0u64;
    let mut attempt: u32 = 0;
    while !pending.is_empty() {
        attempt += 1;
        let mut still = Vec::new();
        let mut caught_up = true;
        // Batch by batch, so memory holds one batch of rows.
        for chunk in pending.chunks(BATCH) {
            let mut src_rows = source.fetch_rows(shape, chunk).await?;
            let batch_caught_up = match source.current_lsn().await? {
                Some(lsn) if !settle.window.is_zero() => {
                    wait_for_slots(source, lsn, deadline, settle.slot_hint.as_deref()).await?
                }
                _ => false,
            };
            caught_up &= batch_caught_up;
            let mut dst_rows = target.fetch_rows(shape, chunk).await?;
            let last = Instant::now() >= deadline;
            for key in chunk {
                let s = src_rows.remove(key);
                let d = dst_rows.remove(key);
                let Some(mut diff) = difference(shape, key, s.as_ref(), d.as_ref()) else {
                    in_flight += 1;
                    previous.remove(key);
                    continue;
                };
                let seen = row_hash(s.as_ref());
                let stable = previous.get(key) == Some(&seen);
                if last || (batch_caught_up && stable) {
                    previous.remove(key);
                    if !keep_source_rows {
                        diff.source_row = None;
                    }
                    found(diff)?;
                } else {
                    previous.insert(key.clone(), seen);
                    still.push(key.clone());
                }
            }
        }
        pending = still;
        if !pending.is_empty() && !caught_up {
            // Without a slot to follow, back off: 100 ms doubling to 2 s, within the window.
            let pause = Duration::from_millis(100 << attempt.min(5)).min(Duration::from_secs(2));
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(pause.min(left)).await;
        }
    }
    Ok(in_flight)
}

fn row_hash(row: Option<&RowText>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    row.hash(&mut h);
    h.finish()
}

/// Waits until the source's logical slots have confirmed `lsn` (the pipeline has applied
/// everything read so far), or the deadline. False when no slot is in use or time ran out.
async fn wait_for_slots(
    source: &Side,
    lsn: Lsn,
    deadline: Instant,
    hint: Option<&str>,
) -> Result<bool, PgError> {
    loop {
        match source.slots_confirmed(hint).await? {
            None => return Ok(false),
            Some(confirmed) if confirmed >= lsn => return Ok(true),
            Some(_) if Instant::now() >= deadline => return Ok(false),
            Some(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The difference between the source's and target's row for `key`, if any.
pub(crate) fn difference(
    shape: &Shape,
    key: &Key,
    source: Option<&RowText>,
    target: Option<&RowText>,
) -> Option<Difference> {
    let (kind, changes) = match (source, target) {
        (None, None) => return None,
        (Some(_), None) => (DifferenceKind::Missing, Vec::new()),
        (None, Some(_)) => (DifferenceKind::Extra, Vec::new()),
        (Some(s), Some(t)) => {
            let changes: Vec<ColumnChange> = shape
                .columns
                .iter()
                .zip(s.iter().zip(t))
                .filter(|(_, (a, b))| a != b)
                .map(|(c, (a, b))| ColumnChange {
                    column: c.name.clone(),
                    source: a.clone(),
                    target: b.clone(),
                })
                .collect();
            if changes.is_empty() {
                return None;
            }
            (DifferenceKind::Changed, changes)
        }
    };
    Some(Difference::new(
        shape,
        key.clone(),
        kind,
        changes,
        source.cloned(),
    ))
}
