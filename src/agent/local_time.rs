//! Wall-clock times to instants: the one place where the daylight-saving rules of schedules
//! and blackout windows live.
//!
//! A wall-clock time can exist once, twice (when clocks go back, e.g. 01:30 on the first Sunday
//! of November in America/New_York) or not at all (when they go forward, e.g. 02:30 on the
//! second Sunday of March there). The rules:
//!
//! - a time that does not exist stands for the instant the clocks jump, the first one after the
//!   gap (02:30 in the New York spring gap is 03:00 EDT), as cron daemons run such jobs;
//! - a time that exists twice is read as the earlier instant, or as the later one where the
//!   caller says so (the end of a blackout window, so that a window never shrinks).
//!
//! Zones without daylight saving time (Asia/Taipei, UTC) map every time to exactly one instant.

use chrono::{DateTime, Duration, LocalResult, NaiveDateTime, TimeZone, Timelike, Utc};
use chrono_tz::Tz;

/// Which instant an ambiguous wall-clock time stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ambiguous {
    Earlier,
    Later,
}

/// The longest gap searched for the instant the clocks jump: tz data has gaps of up to a day
/// (Samoa skipped 30 December 2011).
const LONGEST_GAP_MINUTES: i64 = 2 * 24 * 60;

/// The instant `local` stands for in `zone`, by the rules of the module docs.
pub fn instant(zone: Tz, local: NaiveDateTime, ambiguous: Ambiguous) -> DateTime<Utc> {
    match zone.from_local_datetime(&local) {
        LocalResult::Single(t) => t.with_timezone(&Utc),
        LocalResult::Ambiguous(earlier, later) => match ambiguous {
            Ambiguous::Earlier => earlier.with_timezone(&Utc),
            Ambiguous::Later => later.with_timezone(&Utc),
        },
        LocalResult::None => gap_end(zone, local),
    }
}

/// The first instant after the gap `local` falls in. Transitions are on whole minutes in every
/// zone of the tz database, so the first wall-clock minute that exists again is the jump.
fn gap_end(zone: Tz, local: NaiveDateTime) -> DateTime<Utc> {
    let minute = local
        .with_second(0)
        .and_then(|t| t.with_nanosecond(0))
        .unwrap_or(local);
    (1..=LONGEST_GAP_MINUTES)
        .find_map(|m| {
            zone.from_local_datetime(&(minute + Duration::minutes(m)))
                .earliest()
        })
        .map(|t| t.with_timezone(&Utc))
        // No zone has a longer gap; should one appear, read the time as UTC rather than fail.
        .unwrap_or_else(|| Utc.from_utc_datetime(&local))
}

/// The wall-clock time of `at` in `zone`.
pub fn local(zone: Tz, at: DateTime<Utc>) -> NaiveDateTime {
    at.with_timezone(&zone).naive_local()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> NaiveDateTime {
        NaiveDate::from_ymd_opt(y, mo, d)
            .unwrap()
            .and_hms_opt(h, mi, 0)
            .unwrap()
    }

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn taipei_has_one_instant_for_every_time() {
        let t = at(2026, 3, 8, 2, 30);
        let z = chrono_tz::Asia::Taipei;
        assert_eq!(
            instant(z, t, Ambiguous::Earlier),
            utc("2026-03-07T18:30:00Z")
        );
        assert_eq!(instant(z, t, Ambiguous::Later), utc("2026-03-07T18:30:00Z"));
    }

    #[test]
    fn spring_gap_is_the_jump() {
        let ny = chrono_tz::America::New_York;
        // 2026-03-08 02:00 EST -> 03:00 EDT (07:00 UTC).
        for m in [0, 1, 30, 59] {
            assert_eq!(
                instant(ny, at(2026, 3, 8, 2, m), Ambiguous::Earlier),
                utc("2026-03-08T07:00:00Z"),
                "02:{m:02}"
            );
        }
        let berlin = chrono_tz::Europe::Berlin;
        // 2026-03-29 02:00 CET -> 03:00 CEST (01:00 UTC).
        assert_eq!(
            instant(berlin, at(2026, 3, 29, 2, 30), Ambiguous::Later),
            utc("2026-03-29T01:00:00Z")
        );
    }

    #[test]
    fn autumn_repeat_picks_the_side_asked_for() {
        let ny = chrono_tz::America::New_York;
        // 2026-11-01 01:30 happens at 05:30 UTC (EDT) and 06:30 UTC (EST).
        let t = at(2026, 11, 1, 1, 30);
        assert_eq!(
            instant(ny, t, Ambiguous::Earlier),
            utc("2026-11-01T05:30:00Z")
        );
        assert_eq!(
            instant(ny, t, Ambiguous::Later),
            utc("2026-11-01T06:30:00Z")
        );
        assert_eq!(local(ny, utc("2026-11-01T06:30:00Z")), t);
    }
}
