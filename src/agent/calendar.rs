//! The peak calendar: when the blackout windows of `[[blackouts]]` are open, and what a run
//! meets when it would start.
//!
//! Rules:
//! - A window is open from its start (inclusive) to its end (exclusive), on the wall clock of
//!   its time zone; the instants follow `local_time` (a window's end that exists twice is its
//!   later instant, so a window never shrinks when clocks go back).
//! - A monthly window opens in each month it lists, on `start_day` at `start_time`, and closes
//!   on `end_day` at `end_time`, in the next month when `end_day` is below `start_day`. A day
//!   past the end of a month means its last day; an occurrence that this leaves empty does not
//!   happen.
//! - A window covers the databases it lists, or every database when it lists none. A job that
//!   reads no database (forget, prune, verify of a repository) is never blocked.
//! - A run blocked at an instant is blocked until every window covering its databases has
//!   closed: when one closes while another is open, the block lasts to the end of that one too.
//!   A chain of windows is followed for at most [`LONGEST_BLOCK`].

use chrono::{DateTime, Datelike, Duration, Months, NaiveDate, Utc};
use serde::Serialize;

use super::local_time::{self, Ambiguous};
use crate::config::{BlackoutConfig, BlackoutWhen};

/// How far a chain of overlapping windows is followed: a calendar that never opens in a year
/// blocks a run for a year, and the next run meets the calendar again.
pub const LONGEST_BLOCK: Duration = Duration::days(366);

/// How many months ahead a monthly window is looked for before it is taken as never opening
/// again (every occurrence of a window can be empty, e.g. days 30 to 31 in February only).
const MONTHS_SEARCHED: u32 = 12 * 50;

/// The blackout windows of a configuration.
#[derive(Debug, Clone)]
pub struct Calendar {
    windows: Vec<BlackoutConfig>,
}

/// One opening of a window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Occurrence {
    pub window: String,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

/// What a run starting at an instant meets: the windows that keep it from starting, and when
/// the last of them closes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Block {
    pub until: DateTime<Utc>,
    /// The windows open at the instant asked about.
    pub open: Vec<String>,
    /// Those and the windows chained to them up to `until`, in the order they were met.
    pub windows: Vec<String>,
}

impl Calendar {
    pub fn new(windows: Vec<BlackoutConfig>) -> Calendar {
        Calendar { windows }
    }

    /// The windows of the calendar.
    pub fn windows(&self) -> &[BlackoutConfig] {
        &self.windows
    }

    /// What a job reading `databases` meets if it starts at `at`; `None`: nothing, it may start.
    pub fn block(&self, at: DateTime<Utc>, databases: &[String]) -> Option<Block> {
        let covering: Vec<&BlackoutConfig> = self
            .windows
            .iter()
            .filter(|w| covers(w, databases))
            .collect();
        let mut until = at;
        let mut windows: Vec<String> = Vec::new();
        let mut open_at_start = None;
        loop {
            let open: Vec<Occurrence> = covering
                .iter()
                .filter_map(|w| occurrences(w, until).next().filter(|o| o.start <= until))
                .collect();
            let Some(end) = open.iter().map(|o| o.end).max() else {
                break;
            };
            open_at_start.get_or_insert_with(|| open.iter().map(|o| o.window.clone()).collect());
            for o in open {
                if !windows.contains(&o.window) {
                    windows.push(o.window);
                }
            }
            until = end;
            if until - at >= LONGEST_BLOCK {
                break;
            }
        }
        open_at_start.map(|open| Block {
            until,
            open,
            windows,
        })
    }

    /// The windows open at `at`, whatever they cover.
    pub fn open_at(&self, at: DateTime<Utc>) -> Vec<Occurrence> {
        self.windows
            .iter()
            .filter_map(|w| occurrences(w, at).next().filter(|o| o.start <= at))
            .collect()
    }
}

/// True when `window` covers one of `databases`.
fn covers(window: &BlackoutConfig, databases: &[String]) -> bool {
    match &window.databases {
        None => !databases.is_empty(),
        Some(list) => list.iter().any(|d| databases.contains(d)),
    }
}

/// The openings of `window` that have not closed at `from` (end after `from`), in order.
pub fn occurrences(
    window: &BlackoutConfig,
    from: DateTime<Utc>,
) -> Box<dyn Iterator<Item = Occurrence> + '_> {
    let zone = window.time_zone;
    let open = move |start, end| {
        let start = local_time::instant(zone, start, Ambiguous::Earlier);
        let end = local_time::instant(zone, end, Ambiguous::Later);
        (end > start && end > from).then(|| Occurrence {
            window: window.name.clone(),
            start,
            end,
        })
    };
    match &window.when {
        BlackoutWhen::Dated { start, end } => Box::new(open(*start, *end).into_iter()),
        BlackoutWhen::Monthly {
            months,
            start_day,
            start_time,
            end_day,
            end_time,
        } => {
            // An opening that has not closed at `from` started at most two months before it.
            let here = local_time::local(zone, from).date();
            let first = NaiveDate::from_ymd_opt(here.year(), here.month(), 1)
                .and_then(|d| d.checked_sub_months(Months::new(2)))
                .unwrap_or(here);
            Box::new(
                (0..MONTHS_SEARCHED)
                    .filter_map(move |i| first.checked_add_months(Months::new(i)))
                    .filter(move |month| months[month.month0() as usize])
                    .filter_map(move |month| {
                        let end_month = if end_day < start_day {
                            month.checked_add_months(Months::new(1))?
                        } else {
                            month
                        };
                        open(
                            start_time.on(day_in(month, *start_day)),
                            end_time.on(day_in(end_month, *end_day)),
                        )
                    }),
            )
        }
    }
}

/// Day `day` of the month of `first`, or its last day when the month is shorter.
fn day_in(first: NaiveDate, day: u32) -> NaiveDate {
    (1..=day)
        .rev()
        .find_map(|d| first.with_day(d))
        .unwrap_or(first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TimeOfDay;
    use chrono_tz::Tz;

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    fn monthly(
        name: &str,
        months: &[u32],
        (start_day, start): (u32, &str),
        (end_day, end): (u32, &str),
        zone: Tz,
        databases: Option<&[&str]>,
    ) -> BlackoutConfig {
        let mut m = [false; 12];
        for &n in months {
            m[n as usize - 1] = true;
        }
        BlackoutConfig {
            name: name.into(),
            when: BlackoutWhen::Monthly {
                months: m,
                start_day,
                start_time: TimeOfDay::parse(start).unwrap(),
                end_day,
                end_time: TimeOfDay::parse(end).unwrap(),
            },
            time_zone: zone,
            databases: databases.map(|d| d.iter().map(|s| s.to_string()).collect()),
        }
    }

    const ODD: &[u32] = &[1, 3, 5, 7, 9, 11];
    const TAIPEI: Tz = chrono_tz::Asia::Taipei;

    fn dbs(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn prize_draw_in_odd_months_only() {
        let w = monthly("draw", ODD, (24, "00:00"), (26, "24:00"), TAIPEI, None);
        let got: Vec<_> = occurrences(&w, utc("2026-01-01T00:00:00Z"))
            .take(3)
            .map(|o| (o.start, o.end))
            .collect();
        assert_eq!(
            got,
            vec![
                (utc("2026-01-23T16:00:00Z"), utc("2026-01-26T16:00:00Z")),
                (utc("2026-03-23T16:00:00Z"), utc("2026-03-26T16:00:00Z")),
                (utc("2026-05-23T16:00:00Z"), utc("2026-05-26T16:00:00Z")),
            ]
        );
        let cal = Calendar::new(vec![w]);
        let main = dbs(&["maindc"]);
        // Taipei is UTC+8: the 24th opens at 16:00 UTC on the 23rd.
        assert_eq!(cal.block(utc("2026-01-23T15:59:59Z"), &main), None);
        assert_eq!(
            cal.block(utc("2026-01-23T16:00:00Z"), &main).unwrap().until,
            utc("2026-01-26T16:00:00Z")
        );
        // The end is exclusive, and even months are clear.
        assert_eq!(cal.block(utc("2026-01-26T16:00:00Z"), &main), None);
        assert_eq!(cal.block(utc("2026-02-25T00:00:00Z"), &main), None);
        // A job reading no database is never blocked.
        assert_eq!(cal.block(utc("2026-01-25T00:00:00Z"), &[]), None);
    }

    #[test]
    fn window_crossing_midnight_and_the_month_end() {
        // From the 30th at 22:00 to the 2nd at 06:00, opening in odd months.
        let w = monthly(
            "close",
            ODD,
            (30, "22:00"),
            (2, "06:00"),
            chrono_tz::UTC,
            None,
        );
        let got: Vec<_> = occurrences(&w, utc("2026-01-01T00:00:00Z"))
            .take(2)
            .collect();
        assert_eq!(got[0].start, utc("2026-01-30T22:00:00Z"));
        assert_eq!(got[0].end, utc("2026-02-02T06:00:00Z"));
        assert_eq!(got[1].start, utc("2026-03-30T22:00:00Z"));
        assert_eq!(got[1].end, utc("2026-04-02T06:00:00Z"));
        let cal = Calendar::new(vec![w]);
        let main = dbs(&["maindc"]);
        // Open in February because it opened in January.
        assert_eq!(
            cal.block(utc("2026-02-01T12:00:00Z"), &main).unwrap().until,
            utc("2026-02-02T06:00:00Z")
        );
        assert_eq!(cal.block(utc("2026-02-02T06:00:00Z"), &main), None);
        // November's opening closes in December; January is clear until the 30th.
        assert_eq!(
            cal.block(utc("2026-12-01T12:00:00Z"), &main).unwrap().until,
            utc("2026-12-02T06:00:00Z")
        );
        assert_eq!(cal.block(utc("2027-01-01T12:00:00Z"), &main), None);
        // Across the year end: December's opening closes in January.
        let new_year = monthly(
            "new-year",
            &[12],
            (31, "20:00"),
            (1, "06:00"),
            chrono_tz::UTC,
            None,
        );
        assert_eq!(
            Calendar::new(vec![new_year])
                .block(utc("2027-01-01T03:00:00Z"), &main)
                .unwrap()
                .until,
            utc("2027-01-01T06:00:00Z")
        );
    }

    #[test]
    fn day_past_the_month_end_is_its_last_day() {
        let w = monthly(
            "eom",
            &[2, 4],
            (31, "20:00"),
            (31, "24:00"),
            chrono_tz::UTC,
            None,
        );
        let got: Vec<_> = occurrences(&w, utc("2027-01-01T00:00:00Z"))
            .take(2)
            .collect();
        assert_eq!(got[0].start, utc("2027-02-28T20:00:00Z"));
        assert_eq!(got[0].end, utc("2027-03-01T00:00:00Z"));
        assert_eq!(got[1].start, utc("2027-04-30T20:00:00Z"));
        // A leap year's February has 29 days.
        let next = occurrences(&w, utc("2028-02-01T00:00:00Z")).next().unwrap();
        assert_eq!(next.start, utc("2028-02-29T20:00:00Z"));
    }

    #[test]
    fn windows_cover_their_databases_only() {
        let cal = Calendar::new(vec![monthly(
            "tax",
            ODD,
            (13, "00:00"),
            (15, "24:00"),
            TAIPEI,
            Some(&["maindc"]),
        )]);
        let t = utc("2026-03-14T00:00:00Z");
        assert!(cal.block(t, &dbs(&["cloud_a"])).is_none());
        assert!(cal.block(t, &dbs(&["cloud_a", "maindc"])).is_some());
        assert_eq!(cal.open_at(t).len(), 1);
    }

    #[test]
    fn overlapping_and_adjacent_windows_chain() {
        let cal = Calendar::new(vec![
            monthly(
                "a",
                &[3],
                (13, "00:00"),
                (15, "12:00"),
                chrono_tz::UTC,
                None,
            ),
            monthly(
                "b",
                &[3],
                (15, "12:00"),
                (16, "06:00"),
                chrono_tz::UTC,
                None,
            ),
            monthly(
                "c",
                &[3],
                (16, "00:00"),
                (17, "00:00"),
                chrono_tz::UTC,
                None,
            ),
        ]);
        let block = cal
            .block(utc("2026-03-14T00:00:00Z"), &dbs(&["maindc"]))
            .unwrap();
        assert_eq!(block.until, utc("2026-03-17T00:00:00Z"));
        assert_eq!(block.windows, vec!["a", "b", "c"]);
    }

    #[test]
    fn a_calendar_that_never_opens_blocks_for_a_bounded_time() {
        let always = monthly(
            "always",
            &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
            (1, "00:00"),
            (31, "24:00"),
            chrono_tz::UTC,
            None,
        );
        let at = utc("2026-03-14T00:00:00Z");
        let block = Calendar::new(vec![always]).block(at, &dbs(&["x"])).unwrap();
        assert!(
            block.until - at >= LONGEST_BLOCK
                && block.until - at < LONGEST_BLOCK + Duration::days(32)
        );
    }

    #[test]
    fn dated_window_and_dst_ends() {
        let ny = chrono_tz::America::New_York;
        let night = |d: u32| NaiveDate::from_ymd_opt(2026, 11, d).unwrap();
        let w = BlackoutConfig {
            name: "migration".into(),
            when: BlackoutWhen::Dated {
                start: TimeOfDay::parse("00:30").unwrap().on(night(1)),
                // 01:30 happens twice on 1 November in New York: the later one closes it.
                end: TimeOfDay::parse("01:30").unwrap().on(night(1)),
            },
            time_zone: ny,
            databases: None,
        };
        let o: Vec<_> = occurrences(&w, utc("2026-10-01T00:00:00Z")).collect();
        assert_eq!(o.len(), 1);
        assert_eq!(o[0].start, utc("2026-11-01T04:30:00Z"));
        assert_eq!(o[0].end, utc("2026-11-01T06:30:00Z"));
        assert!(occurrences(&w, utc("2026-11-01T06:30:00Z"))
            .next()
            .is_none());
        // A window starting in the spring gap opens when the clocks jump.
        let berlin = monthly(
            "gap",
            &[3],
            (29, "02:30"),
            (29, "05:00"),
            chrono_tz::Europe::Berlin,
            None,
        );
        let o = occurrences(&berlin, utc("2026-03-01T00:00:00Z"))
            .next()
            .unwrap();
        assert_eq!(o.start, utc("2026-03-29T01:00:00Z"));
        assert_eq!(o.end, utc("2026-03-29T03:00:00Z"));
    }
}
