//! Re-checking differing keys on fresh reads, so that rows still in flight through a pipeline
//! are not reported.
//!
//! The snapshot comparison finds candidate keys; each is read again from both sides until it is
//! equal (it was in flight: dropped), or its difference is proven (the target's pipeline has
//! confirmed past the point where the source row was read, and the source row did not change
//! between two reads), or the settle window ends: the row is then *undecided*, counted apart
//! and never reported as a difference, as a row the source rewrites faster than the target
//! catches up never reads equal on both sides and proves nothing either way. Without a slot to
//! follow, a row whose source image held still over the last two reads is reported at the
//! window's end (nothing known feeds the target), one still moving is undecided. With a window of
//! zero (no live source) every candidate is read once more and reported if it still differs.
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
pub(crate) const BATCH: usize = 500;

/// What re-reading a candidate key decided.
pub(crate) enum Verdict {
    /// The row differs: reported, and repaired by repair SQL.
    Proven(Difference),
    /// The row differed on every read but kept changing on the source until the window ended:
    /// the difference last seen, which may be lag.
    Undecided(Difference),
}

/// How long and how to wait for differences to settle.
#[derive(Debug, Clone)]
pub(crate) struct Settle {
    /// How long a key may keep differing before it is reported.
    pub window: Duration,
    /// Part of the replication slot name of the pipeline feeding the target, if known.
    pub slot_hint: Option<String>,
}

/// Re-reads `candidates` (in key order, for differences to come out in key order) until each
/// is equal, proven different, or the window ends; hands each proven difference and each
/// undecided row to `found` and returns how many candidates turned out equal (changes that were in flight). The
/// differences keep the source row only with `keep_source_rows` (repair SQL needs it).
pub(crate) async fn recheck(
    source: &Side,
    target: &Side,
    shape: &Shape,
    candidates: Vec<Key>,
    settle: &Settle,
    keep_source_rows: bool,
    found: &mut dyn FnMut(Verdict) -> Result<(), VerifyError>,
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
            // None: no slot shows how far the target has applied.
            let batch_caught_up = match source.current_lsn().await? {
                Some(lsn) if !settle.window.is_zero() => {
                    wait_for_slots(source, lsn, deadline, settle.slot_hint.as_deref()).await?
                }
                _ => None,
            };
            let followed = batch_caught_up.is_some();
            let batch_caught_up = batch_caught_up.unwrap_or(false);
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
                // At the window's end, a row that no pipeline feeds is proven once the source
                // holds still; one behind a pipeline that has not caught up may only lag.
                let proven = (batch_caught_up && stable)
                    || (last && (settle.window.is_zero() || (!followed && stable)));
                if proven || last {
                    previous.remove(key);
                    if !keep_source_rows {
                        diff.source_row = None;
                    }
                    found(if proven {
                        Verdict::Proven(diff)
                    } else {
                        Verdict::Undecided(diff)
                    })?;
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
/// everything read so far), or the deadline. False when time ran out, None when no slot is
/// in use.
async fn wait_for_slots(
    source: &Side,
    lsn: Lsn,
    deadline: Instant,
    hint: Option<&str>,
) -> Result<Option<bool>, PgError> {
    loop {
        match source.slots_confirmed(hint).await? {
            None => return Ok(None),
            Some(confirmed) if confirmed >= lsn => return Ok(Some(true)),
            Some(_) if Instant::now() >= deadline => return Ok(Some(false)),
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
