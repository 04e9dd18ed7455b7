//! Positions and times as the replication protocol gives them: log sequence numbers, written
//! `X/Y` by PostgreSQL, and commit times in microseconds since PostgreSQL's epoch.

use std::fmt;
use std::str::FromStr;

/// PostgreSQL counts time from 2000-01-01 UTC; this is that moment in Unix microseconds.
pub const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// A time the protocol sends (microseconds since 2000-01-01 UTC); `None` when out of range.
pub fn pg_time(micros: i64) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp_micros(micros.checked_add(PG_EPOCH_MICROS)?)
}

/// A WAL position. Ordered; `Lsn(0)` stands for "nothing yet".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl FromStr for Lsn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{s}` is not an LSN (expected hex `X/Y`, as in 0/16B3748)");
        let (hi, lo) = s.split_once('/').ok_or_else(bad)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| bad())?;
        Ok(Lsn(((hi as u64) << 32) | lo as u64))
    }
}

impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for s in ["0/0", "0/16B3748", "A/FFFFFFFF"] {
            assert_eq!(s.parse::<Lsn>().unwrap().to_string(), s);
        }
        assert_eq!("1/0".parse::<Lsn>().unwrap().0, 1 << 32);
        assert!("16B3748".parse::<Lsn>().is_err());
        assert!("G/0".parse::<Lsn>().is_err());
    }
}
