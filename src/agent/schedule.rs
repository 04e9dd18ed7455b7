//! Schedules: when each job falls due, what the peak calendar says about a run, and the state
//! that keeps a job from overlapping itself.
//!
//! Nothing here reads the system clock: the caller passes `now`, so every rule is tested
//! against a controlled clock. Rules:
//!
//! - A cron expression is read on the wall clock of the schedule's time zone. A wall-clock
//!   time that does not exist (clocks going forward) runs once, when the clocks jump; one that
//!   exists twice (clocks going back) runs once, the first time. See `local_time`.
//! - A run due while a blackout window covering one of the job's databases is open is, by the
//!   schedule's `during_blackout`: deferred to run once when the window (and any window
//!   chained to it) closes, skipped, or run anyway (`ignore`). The calendar is asked when the
//!   run would start, so a deferred run meeting a new window is deferred again. At most one
//!   deferred run waits: a later run that would be deferred too is skipped and counted.
//! - A job never overlaps itself: while it runs, a run that falls due is skipped and counted.
//! - Runs missed while the agent was down (due after the instant it last recorded and before
//!   it started again) run once when it starts (`missed = "run-once"`), through the same
//!   calendar and overlap rules, or are skipped and counted (`"skip"`). A first start, with
//!   nothing recorded, has missed nothing.
//! - When the caller ticks late and several runs fell due since the last tick, they are one
//!   run, the latest; the others are counted as missed.

use chrono::{DateTime, TimeZone, Utc};
use serde::Serialize;

use super::calendar::{Block, Calendar};
use super::local_time::{self, Ambiguous};
use crate::config::{DuringBlackout, MissedRuns, ScheduleConfig};

/// The instants a schedule falls due strictly after `after`, in order.
pub fn runs_after(
    schedule: &ScheduleConfig,
    after: DateTime<Utc>,
) -> impl Iterator<Item = DateTime<Utc>> + '_ {
    let zone = schedule.time_zone;
    // The cron crate walks wall-clock times when handed them as UTC; each is then placed on
    // the zone's real clock, which maps a gap's times to one instant (kept once) and puts a
    // repeated hour's times before `after` once it has passed (dropped).
    let wall = Utc.from_utc_datetime(&local_time::local(zone, after));
    let mut last = None;
    schedule
        .cron
        .after_owned(wall)
        .map(move |t| local_time::instant(zone, t.naive_utc(), Ambiguous::Earlier))
        .filter(move |t| {
            let new = *t > after && last != Some(*t);
            if new {
                last = Some(*t);
            }
            new
        })
}

/// What the peak calendar makes of a run that would start at an instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Decision {
    /// No window covers the job's databases: it starts.
    Run,
    /// Windows are open, and the schedule says `ignore`: it starts.
    RunInWindow { windows: Vec<String> },
    /// It runs at `until`, when the windows open now and those chained to them close.
    Defer {
        until: DateTime<Utc>,
        windows: Vec<String>,
    },
    /// It does not run, because of the windows open now.
    Skip { windows: Vec<String> },
}

/// The decision for a run of `schedule` that would start at `at`.
pub fn decide(schedule: &ScheduleConfig, calendar: &Calendar, at: DateTime<Utc>) -> Decision {
    match calendar.block(at, &schedule.databases) {
        None => Decision::Run,
        Some(Block {
            until,
            open,
            windows,
        }) => match schedule.during_blackout {
            DuringBlackout::Ignore => Decision::RunInWindow { windows: open },
            DuringBlackout::Defer => Decision::Defer { until, windows },
            DuringBlackout::Skip => Decision::Skip { windows: open },
        },
    }
}

/// What the agent is to do about a schedule, and what it is to log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// Start the job now, for the run due at `due`. `catch_up`: it stands for runs missed
    /// while the agent was down.
    Start { due: DateTime<Utc>, catch_up: bool },
    /// The run due at `due` starts at `until`, when `windows` close.
    Deferred {
        due: DateTime<Utc>,
        until: DateTime<Utc>,
        windows: Vec<String>,
    },
    /// The run due at `due` does not happen.
    Skipped {
        due: DateTime<Utc>,
        reason: SkipReason,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum SkipReason {
    /// The job was still running.
    Overlap,
    /// A window was open and the schedule says `skip`.
    Blackout { windows: Vec<String> },
    /// A deferred run was waiting already; it runs instead.
    AlreadyDeferred,
    /// `count` runs fell due while the agent was down (or between two late ticks).
    Missed { count: u64 },
}

/// How often each thing happened to a schedule since the agent started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub started: u64,
    pub deferred: u64,
    pub skipped_overlap: u64,
    pub skipped_blackout: u64,
    pub missed: u64,
}

/// A run waiting for its windows to close.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DeferredRun {
    pub due: DateTime<Utc>,
    pub until: DateTime<Utc>,
}

/// Missed runs not yet dealt with.
#[derive(Debug, Clone, Copy)]
struct Missed {
    latest: DateTime<Utc>,
    count: u64,
}

/// One schedule's state in a running agent: the runs it has dealt with, the run it is waiting
/// to start, whether its job is running.
#[derive(Debug, Clone)]
pub struct ScheduleState {
    schedule: ScheduleConfig,
    /// Every run due at or before this instant has been dealt with.
    handled_until: DateTime<Utc>,
    missed: Option<Missed>,
    deferred: Option<DeferredRun>,
    /// When the running job started.
    running_since: Option<DateTime<Utc>>,
    counters: Counters,
}

impl ScheduleState {
    /// The state of a schedule when the agent starts at `now`; `handled_until` is the instant
    /// recorded when it last ran (`None` on a first start).
    pub fn resume(
        schedule: ScheduleConfig,
        handled_until: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> ScheduleState {
        let missed = handled_until.and_then(|since| {
            let mut count = 0;
            let mut latest = None;
            for due in runs_after(&schedule, since).take_while(|t| *t <= now) {
                count += 1;
                latest = Some(due);
            }
            latest.map(|latest| Missed { latest, count })
        });
        ScheduleState {
            schedule,
            handled_until: now,
            missed,
            deferred: None,
            running_since: None,
            counters: Counters::default(),
        }
    }

    /// Keeps waiting for a run deferred before the agent restarted (as the state file recorded
    /// it): it is offered when its windows close, as if the agent had not stopped, and the
    /// calendar is asked again then.
    pub fn with_deferred(mut self, run: Option<DeferredRun>) -> ScheduleState {
        self.deferred = run;
        self
    }

    pub fn schedule(&self) -> &ScheduleConfig {
        &self.schedule
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The run waiting for its windows to close, if any.
    pub fn deferred(&self) -> Option<DeferredRun> {
        self.deferred
    }

    /// When the running job started, if it is running.
    pub fn running_since(&self) -> Option<DateTime<Utc>> {
        self.running_since
    }

    /// Every run due at or before this instant has been dealt with: what to record so that a
    /// restarted agent knows what it missed.
    pub fn handled_until(&self) -> DateTime<Utc> {
        self.handled_until
    }

    /// Deals with everything due at or before `now`: missed runs, a deferred run whose windows
    /// have closed, and runs due since the last tick, in that order.
    pub fn tick(&mut self, now: DateTime<Utc>, calendar: &Calendar) -> Vec<Event> {
        let mut events = Vec::new();
        if let Some(Missed { latest, count }) = self.missed.take() {
            match self.schedule.missed {
                MissedRuns::RunOnce => self.offer(latest, true, now, calendar, &mut events),
                MissedRuns::Skip => {
                    self.counters.missed += count;
                    events.push(Event::Skipped {
                        due: latest,
                        reason: SkipReason::Missed { count },
                    });
                }
            }
        }
        if let Some(d) = self.deferred.filter(|d| d.until <= now) {
            self.deferred = None;
            self.offer(d.due, false, now, calendar, &mut events);
        }
        if now > self.handled_until {
            let due: Vec<DateTime<Utc>> = runs_after(&self.schedule, self.handled_until)
                .take_while(|t| *t <= now)
                .collect();
            self.handled_until = now;
            if let [earlier @ .., latest] = due.as_slice() {
                if let Some(first) = earlier.first() {
                    let count = earlier.len() as u64;
                    self.counters.missed += count;
                    events.push(Event::Skipped {
                        due: *first,
                        reason: SkipReason::Missed { count },
                    });
                }
                self.offer(*latest, false, now, calendar, &mut events);
            }
        }
        events
    }

    /// The job starts again at `now` outside the schedule's runs (a retry after a failure):
    /// runs falling due while it runs are overlaps.
    pub fn start_retry(&mut self, now: DateTime<Utc>) {
        self.running_since = Some(now);
    }

    /// The job started by the last `Start` event has ended (whatever its result).
    pub fn finished(&mut self) {
        self.running_since = None;
    }

    /// When the agent next has something to do for this schedule: a deferred run's windows
    /// closing or the next run falling due (or now, for missed runs not yet dealt with).
    pub fn next_wake(&self) -> Option<DateTime<Utc>> {
        if self.missed.is_some() {
            return Some(self.handled_until);
        }
        let next = runs_after(&self.schedule, self.handled_until).next();
        match (next, self.deferred) {
            (Some(n), Some(d)) => Some(n.min(d.until)),
            (n, d) => n.or(d.map(|d| d.until)),
        }
    }

    /// A run due at `due` would start at `now`: start it, defer it or skip it.
    fn offer(
        &mut self,
        due: DateTime<Utc>,
        catch_up: bool,
        now: DateTime<Utc>,
        calendar: &Calendar,
        events: &mut Vec<Event>,
    ) {
        if self.running_since.is_some() {
            self.counters.skipped_overlap += 1;
            events.push(Event::Skipped {
                due,
                reason: SkipReason::Overlap,
            });
            return;
        }
        match decide(&self.schedule, calendar, now) {
            Decision::Run | Decision::RunInWindow { .. } => {
                self.running_since = Some(now);
                self.counters.started += 1;
                events.push(Event::Start { due, catch_up });
            }
            Decision::Defer { until, windows } => {
                if let Some(waiting) = &mut self.deferred {
                    waiting.until = waiting.until.max(until);
                    self.counters.skipped_blackout += 1;
                    events.push(Event::Skipped {
                        due,
                        reason: SkipReason::AlreadyDeferred,
                    });
                    return;
                }
                self.deferred = Some(DeferredRun { due, until });
                self.counters.deferred += 1;
                events.push(Event::Deferred {
                    due,
                    until,
                    windows,
                });
            }
            Decision::Skip { windows } => {
                self.counters.skipped_blackout += 1;
                events.push(Event::Skipped {
                    due,
                    reason: SkipReason::Blackout { windows },
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use chrono_tz::Tz;

    use super::*;
    use crate::config::{BlackoutConfig, BlackoutWhen, JobSpec, TimeOfDay};

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn utcs(list: &[&str]) -> Vec<DateTime<Utc>> {
        list.iter().map(|s| utc(s)).collect()
    }

    const TAIPEI: Tz = chrono_tz::Asia::Taipei;
    const NEW_YORK: Tz = chrono_tz::America::New_York;
    const BERLIN: Tz = chrono_tz::Europe::Berlin;

    fn schedule(cron: &str, zone: Tz) -> ScheduleConfig {
        ScheduleConfig {
            name: "nightly".into(),
            cron: cron::Schedule::from_str(cron).unwrap(),
            time_zone: zone,
            job: JobSpec::Backup {
                repo: "offsite".into(),
                db: Some("maindc".into()),
                tables: Vec::new(),
                config_dirs: Vec::new(),
                tags: Vec::new(),
            },
            databases: vec!["maindc".into()],
            missed: MissedRuns::RunOnce,
            during_blackout: DuringBlackout::Defer,
        }
    }

    fn next(s: &ScheduleConfig, from: &str, n: usize) -> Vec<DateTime<Utc>> {
        runs_after(s, utc(from)).take(n).collect()
    }

    /// The prize draw: the 24th to the 26th of odd months, all day, in Taipei.
    fn prize_draw() -> Calendar {
        let mut months = [false; 12];
        for m in (0..12).step_by(2) {
            months[m] = true;
        }
        Calendar::new(vec![BlackoutConfig {
            name: "prize-draw".into(),
            when: BlackoutWhen::Monthly {
                months,
                start_day: 24,
                start_time: TimeOfDay::MIDNIGHT,
                end_day: 26,
                end_time: TimeOfDay::END_OF_DAY,
            },
            time_zone: TAIPEI,
            databases: Some(vec!["maindc".into()]),
        }])
    }

    #[test]
    fn taipei_runs_across_a_month_end() {
        let s = schedule("0 30 2 * * *", TAIPEI);
        assert_eq!(
            next(&s, "2026-01-30T00:00:00Z", 3),
            utcs(&[
                "2026-01-30T18:30:00Z",
                "2026-01-31T18:30:00Z",
                "2026-02-01T18:30:00Z"
            ])
        );
        // No DST in Taipei: runs stay 24 h apart through March.
        let march = next(&s, "2026-03-01T00:00:00Z", 40);
        assert!(march
            .windows(2)
            .all(|w| w[1] - w[0] == chrono::Duration::days(1)));
        // The 31st exists in some months only.
        let s = schedule("0 0 3 31 * *", TAIPEI);
        assert_eq!(
            next(&s, "2026-01-01T00:00:00Z", 3),
            utcs(&[
                "2026-01-30T19:00:00Z",
                "2026-03-30T19:00:00Z",
                "2026-05-30T19:00:00Z"
            ])
        );
        // The instant a run is due at is not "after" it.
        assert_eq!(
            next(&s, "2026-01-30T19:00:00Z", 1),
            utcs(&["2026-03-30T19:00:00Z"])
        );
    }

    #[test]
    fn new_york_spring_gap_runs_once_when_clocks_jump() {
        let s = schedule("0 30 2 * * *", NEW_YORK);
        assert_eq!(
            next(&s, "2026-03-07T12:00:00Z", 2),
            utcs(&["2026-03-08T07:00:00Z", "2026-03-09T06:30:00Z"])
        );
        // Every 15 minutes: 02:00 to 02:45 do not exist; they and 03:00 are one run.
        let s = schedule("0 */15 * * * *", NEW_YORK);
        assert_eq!(
            next(&s, "2026-03-08T06:40:00Z", 3),
            utcs(&[
                "2026-03-08T06:45:00Z",
                "2026-03-08T07:00:00Z",
                "2026-03-08T07:15:00Z"
            ])
        );
    }

    #[test]
    fn new_york_repeated_hour_runs_once() {
        let s = schedule("0 30 1 * * *", NEW_YORK);
        assert_eq!(
            next(&s, "2026-10-31T12:00:00Z", 2),
            utcs(&["2026-11-01T05:30:00Z", "2026-11-02T06:30:00Z"])
        );
        let s = schedule("0 */15 * * * *", NEW_YORK);
        assert_eq!(
            next(&s, "2026-11-01T05:40:00Z", 2),
            utcs(&["2026-11-01T05:45:00Z", "2026-11-01T07:00:00Z"])
        );
        // From inside the second 01:00-02:00, its times have passed already.
        assert_eq!(
            next(&s, "2026-11-01T06:10:00Z", 1),
            utcs(&["2026-11-01T07:00:00Z"])
        );
    }

    #[test]
    fn berlin_both_transitions() {
        let s = schedule("0 0 2 * * *", BERLIN);
        assert_eq!(
            next(&s, "2026-03-28T12:00:00Z", 2),
            utcs(&["2026-03-29T01:00:00Z", "2026-03-30T00:00:00Z"])
        );
        let s = schedule("0 30 2 * * *", BERLIN);
        assert_eq!(
            next(&s, "2026-10-24T12:00:00Z", 2),
            utcs(&["2026-10-25T00:30:00Z", "2026-10-26T01:30:00Z"])
        );
    }

    #[test]
    fn decisions_follow_during_blackout() {
        let cal = prize_draw();
        let mut s = schedule("0 30 2 * * *", TAIPEI);
        let at = utc("2026-01-24T18:30:00Z"); // 25 January 02:30 in Taipei
        assert_eq!(
            decide(&s, &cal, at),
            Decision::Defer {
                until: utc("2026-01-26T16:00:00Z"),
                windows: vec!["prize-draw".into()]
            }
        );
        s.during_blackout = DuringBlackout::Skip;
        assert!(matches!(decide(&s, &cal, at), Decision::Skip { .. }));
        s.during_blackout = DuringBlackout::Ignore;
        assert!(matches!(decide(&s, &cal, at), Decision::RunInWindow { .. }));
        // A window covering other databases does not concern it.
        s.databases = vec!["cloud_a".into()];
        assert_eq!(decide(&s, &cal, at), Decision::Run);
    }

    /// Ticks `state` at every instant it asks to be woken until `end`; a started job ends at
    /// once. Returns each event with the instant of its tick.
    fn drive(
        state: &mut ScheduleState,
        cal: &Calendar,
        end: DateTime<Utc>,
    ) -> Vec<(DateTime<Utc>, Event)> {
        let mut seen = Vec::new();
        while let Some(now) = state.next_wake().filter(|t| *t <= end) {
            for e in state.tick(now, cal) {
                if matches!(e, Event::Start { .. }) {
                    state.finished();
                }
                seen.push((now, e));
            }
        }
        seen
    }

    #[test]
    fn runs_in_a_window_are_deferred_to_its_end_once() {
        let cal = prize_draw();
        let s = schedule("0 30 2 * * *", TAIPEI);
        let mut state = ScheduleState::resume(s, None, utc("2026-01-23T00:00:00Z"));
        let events = drive(&mut state, &cal, utc("2026-01-27T00:00:00Z"));
        let window = vec!["prize-draw".to_string()];
        assert_eq!(
            events,
            vec![
                // 24 January 02:30 Taipei falls in the window: deferred to 27 January 00:00.
                (
                    utc("2026-01-23T18:30:00Z"),
                    Event::Deferred {
                        due: utc("2026-01-23T18:30:00Z"),
                        until: utc("2026-01-26T16:00:00Z"),
                        windows: window.clone()
                    }
                ),
                (
                    utc("2026-01-24T18:30:00Z"),
                    Event::Skipped {
                        due: utc("2026-01-24T18:30:00Z"),
                        reason: SkipReason::AlreadyDeferred
                    }
                ),
                (
                    utc("2026-01-25T18:30:00Z"),
                    Event::Skipped {
                        due: utc("2026-01-25T18:30:00Z"),
                        reason: SkipReason::AlreadyDeferred
                    }
                ),
                (
                    utc("2026-01-26T16:00:00Z"),
                    Event::Start {
                        due: utc("2026-01-23T18:30:00Z"),
                        catch_up: false
                    }
                ),
                (
                    utc("2026-01-26T18:30:00Z"),
                    Event::Start {
                        due: utc("2026-01-26T18:30:00Z"),
                        catch_up: false
                    }
                ),
            ]
        );
        assert_eq!(
            state.counters(),
            &Counters {
                started: 2,
                deferred: 1,
                skipped_blackout: 2,
                ..Counters::default()
            }
        );
        // February is an even month: nothing deferred.
        let feb = drive(&mut state, &cal, utc("2026-02-28T00:00:00Z"));
        assert!(feb.iter().all(|(_, e)| matches!(e, Event::Start { .. })));
    }

    #[test]
    fn skip_policy_skips_in_the_window() {
        let cal = prize_draw();
        let mut s = schedule("0 30 2 * * *", TAIPEI);
        s.during_blackout = DuringBlackout::Skip;
        let mut state = ScheduleState::resume(s, None, utc("2026-03-23T00:00:00Z"));
        let events = drive(&mut state, &cal, utc("2026-03-27T00:00:00Z"));
        let kinds: Vec<bool> = events
            .iter()
            .map(|(_, e)| matches!(e, Event::Start { .. }))
            .collect();
        // 24, 25, 26 skipped; 27 (18:30 UTC on the 26th) runs.
        assert_eq!(kinds, vec![false, false, false, true]);
        assert_eq!(state.counters().skipped_blackout, 3);
        assert_eq!(state.deferred(), None);
    }

    #[test]
    fn a_running_job_is_not_started_again() {
        let cal = Calendar::new(Vec::new());
        let s = schedule("0 */10 * * * *", TAIPEI);
        let mut state = ScheduleState::resume(s, None, utc("2026-05-01T00:00:00Z"));
        let t = |m: u32| utc(&format!("2026-05-01T00:{m:02}:00Z"));
        assert!(matches!(state.tick(t(10), &cal)[..], [Event::Start { .. }]));
        assert_eq!(state.running_since(), Some(t(10)));
        assert_eq!(
            state.tick(t(20), &cal),
            vec![Event::Skipped {
                due: t(20),
                reason: SkipReason::Overlap
            }]
        );
        assert_eq!(state.counters().skipped_overlap, 1);
        state.finished();
        assert_eq!(state.next_wake(), Some(t(30)));
        assert!(matches!(state.tick(t(30), &cal)[..], [Event::Start { .. }]));
    }

    #[test]
    fn runs_missed_while_down() {
        let cal = Calendar::new(Vec::new());
        let s = schedule("0 30 2 * * *", TAIPEI);
        // Down from 1 May 00:00 UTC to 4 May 00:00 UTC: the runs of 2, 3 and 4 May 02:30 in
        // Taipei (18:30 UTC the day before) were missed; one runs, standing for the latest.
        let (down, up) = (utc("2026-05-01T00:00:00Z"), utc("2026-05-04T00:00:00Z"));
        let mut state = ScheduleState::resume(s.clone(), Some(down), up);
        assert_eq!(state.next_wake(), Some(up));
        assert_eq!(
            state.tick(up, &cal),
            vec![Event::Start {
                due: utc("2026-05-03T18:30:00Z"),
                catch_up: true
            }]
        );
        state.finished();
        assert_eq!(
            state.tick(up, &cal),
            vec![],
            "missed runs are dealt with once"
        );
        assert_eq!(state.next_wake(), Some(utc("2026-05-04T18:30:00Z")));

        let mut skip = s.clone();
        skip.missed = MissedRuns::Skip;
        let mut state = ScheduleState::resume(skip, Some(down), up);
        assert_eq!(
            state.tick(up, &cal),
            vec![Event::Skipped {
                due: utc("2026-05-03T18:30:00Z"),
                reason: SkipReason::Missed { count: 3 }
            }]
        );
        assert_eq!(state.counters().missed, 3);

        // A first start has missed nothing.
        let mut state = ScheduleState::resume(s.clone(), None, up);
        assert_eq!(state.tick(up, &cal), vec![]);

        // A missed run caught up inside a window waits for its end.
        let mut state = ScheduleState::resume(
            s,
            Some(utc("2026-01-22T00:00:00Z")),
            utc("2026-01-24T12:00:00Z"),
        );
        assert_eq!(
            state.tick(utc("2026-01-24T12:00:00Z"), &prize_draw()),
            vec![Event::Deferred {
                due: utc("2026-01-23T18:30:00Z"),
                until: utc("2026-01-26T16:00:00Z"),
                windows: vec!["prize-draw".into()]
            }]
        );
    }

    #[test]
    fn a_deferred_run_kept_across_a_restart_runs_at_the_window_end() {
        let cal = prize_draw();
        let mut s = schedule("0 30 2 * * *", TAIPEI);
        // So that only the kept deferral can make a run at the window's end.
        s.missed = MissedRuns::Skip;
        let mut before = ScheduleState::resume(s.clone(), None, utc("2026-01-23T00:00:00Z"));
        drive(&mut before, &cal, utc("2026-01-24T00:00:00Z"));
        let kept = before.deferred();
        assert_eq!(
            kept,
            Some(DeferredRun {
                due: utc("2026-01-23T18:30:00Z"),
                until: utc("2026-01-26T16:00:00Z"),
            })
        );
        // Down from 24 January, restarted inside the window on the 25th.
        let mut after =
            ScheduleState::resume(s, Some(before.handled_until()), utc("2026-01-25T00:00:00Z"))
                .with_deferred(kept);
        let events = drive(&mut after, &cal, utc("2026-01-26T17:00:00Z"));
        let starts: Vec<_> = events
            .iter()
            .filter(|(_, e)| matches!(e, Event::Start { .. }))
            .collect();
        assert_eq!(
            starts,
            vec![&(
                utc("2026-01-26T16:00:00Z"),
                Event::Start {
                    due: utc("2026-01-23T18:30:00Z"),
                    catch_up: false
                }
            )],
            "{events:?}"
        );
    }

    #[test]
    fn a_deferred_run_meeting_a_new_window_waits_again() {
        let s = schedule("0 30 2 * * *", TAIPEI);
        let mut state = ScheduleState::resume(s, None, utc("2026-01-23T00:00:00Z"));
        let seen = drive(&mut state, &prize_draw(), utc("2026-01-26T00:00:00Z"));
        assert_eq!(seen.len(), 3, "deferred, then two runs skipped: {seen:?}");
        assert_eq!(state.deferred().unwrap().until, utc("2026-01-26T16:00:00Z"));
        // The calendar changed (a reloaded configuration) and a window is open at the end.
        let late = Calendar::new(
            prize_draw()
                .windows()
                .iter()
                .cloned()
                .chain([BlackoutConfig {
                    name: "maintenance".into(),
                    when: BlackoutWhen::Dated {
                        start: TimeOfDay::parse("23:00")
                            .unwrap()
                            .on(chrono::NaiveDate::from_ymd_opt(2026, 1, 26).unwrap()),
                        end: TimeOfDay::parse("04:00")
                            .unwrap()
                            .on(chrono::NaiveDate::from_ymd_opt(2026, 1, 27).unwrap()),
                    },
                    time_zone: TAIPEI,
                    databases: None,
                }])
                .collect(),
        );
        assert_eq!(
            state.tick(utc("2026-01-26T16:00:00Z"), &late),
            vec![Event::Deferred {
                due: utc("2026-01-23T18:30:00Z"),
                until: utc("2026-01-26T20:00:00Z"),
                windows: vec!["maintenance".into()]
            }]
        );
        assert_eq!(state.next_wake(), Some(utc("2026-01-26T18:30:00Z")));
    }

    #[test]
    fn a_late_tick_runs_once() {
        let cal = Calendar::new(Vec::new());
        let s = schedule("0 */10 * * * *", TAIPEI);
        let mut state = ScheduleState::resume(s, None, utc("2026-05-01T00:00:00Z"));
        assert_eq!(
            state.tick(utc("2026-05-01T00:35:00Z"), &cal),
            vec![
                Event::Skipped {
                    due: utc("2026-05-01T00:10:00Z"),
                    reason: SkipReason::Missed { count: 2 }
                },
                Event::Start {
                    due: utc("2026-05-01T00:30:00Z"),
                    catch_up: false
                }
            ]
        );
        assert_eq!(state.handled_until(), utc("2026-05-01T00:35:00Z"));
    }
}
