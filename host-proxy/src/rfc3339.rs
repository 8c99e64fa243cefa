//! Parsing RFC 3339 timestamps for `--at` (formatting lives in
//! `keystore_shared::attestation::rfc3339`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)` into a [`SystemTime`].
/// Only years 1970..=9999 are accepted: certificates cannot be older.
pub fn parse(s: &str) -> Result<SystemTime, String> {
    let bad = || format!("{s:?} is not an RFC 3339 time like 2024-09-07T14:37:39Z");
    let b = s.as_bytes();
    if b.len() < 20 || !s.is_ascii() {
        return Err(bad());
    }
    let num = |range: std::ops::Range<usize>| -> Result<u64, String> {
        let part = s.get(range).ok_or_else(bad)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        part.parse::<u64>().map_err(|_| bad())
    };
    let sep = |i: usize, allowed: &[u8]| b.get(i).is_some_and(|c| allowed.contains(c));
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":")) {
        return Err(bad());
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1970..=9999).contains(&year)
        || !(1..=12).contains(&month)
        || day == 0
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return Err(bad());
    }
    // Optional fraction, then the zone.
    let mut rest = s.get(19..).ok_or_else(bad)?;
    let mut nanos = 0u64;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let (d, tail) = frac.split_at(digits);
        // Nanosecond precision is plenty; extra digits are truncated.
        let kept: String = d.chars().chain(std::iter::repeat('0')).take(9).collect();
        nanos = kept.parse().map_err(|_| bad())?;
        rest = tail;
    }
    let offset_secs: i64 = match rest {
        "Z" | "z" => 0,
        zone if zone.len() == 6 && sep_at(zone, 3, b':') => {
            let sign = match zone.as_bytes().first() {
                Some(b'+') => 1,
                Some(b'-') => -1,
                _ => return Err(bad()),
            };
            let hh: i64 = zone
                .get(1..3)
                .and_then(|v| v.parse().ok())
                .ok_or_else(bad)?;
            let mm: i64 = zone
                .get(4..6)
                .and_then(|v| v.parse().ok())
                .ok_or_else(bad)?;
            if hh > 23 || mm > 59 {
                return Err(bad());
            }
            sign * (hh * 3600 + mm * 60)
        }
        _ => return Err(bad()),
    };
    let days = days_from_civil(year, month, day);
    let local = days * 86_400 + (hour * 3600 + minute * 60 + second) as i64;
    let utc = u64::try_from(local - offset_secs).map_err(|_| bad())?;
    UNIX_EPOCH
        .checked_add(Duration::from_secs(utc) + Duration::from_nanos(nanos))
        .ok_or_else(bad)
}

fn sep_at(s: &str, i: usize, c: u8) -> bool {
    s.as_bytes().get(i) == Some(&c)
}

fn is_leap(y: u64) -> bool {
    (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400)
}

fn days_in_month(y: u64, m: u64) -> u64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (year ≥ 1970).
fn days_from_civil(y: u64, m: u64, d: u64) -> i64 {
    let before_month: u64 = (1..m).map(|mm| days_in_month(y, mm)).sum();
    let leap_days = |y: u64| y / 4 - y / 100 + y / 400;
    let years = y - 1970;
    let days = years * 365 + (leap_days(y - 1) - leap_days(1969)) + before_month + (d - 1);
    days as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use keystore_shared::attestation::rfc3339;

    #[test]
    fn round_trips_with_the_formatter() {
        // Formatting comes from der::DateTime, an independent implementation.
        for ms in [
            0u64,
            951_782_400_000,   // 2000-02-29
            1_725_719_859_545, // 2024-09-07T14:37:39.545Z
            4_107_542_400_000, // 2100-03-01 (2100 is not a leap year)
            253_402_300_799_000,
        ] {
            let t = UNIX_EPOCH + Duration::from_millis(ms);
            assert_eq!(parse(&rfc3339(&t)), Ok(t), "{}", rfc3339(&t));
        }
    }

    #[test]
    fn accepts_offsets_and_fractions() {
        let z = parse("2024-09-07T14:37:39Z").unwrap();
        assert_eq!(parse("2024-09-07T16:37:39+02:00"), Ok(z));
        assert_eq!(parse("2024-09-07 09:37:39-05:00"), Ok(z));
        assert_eq!(
            parse("2024-09-07T14:37:39.5Z"),
            Ok(z + Duration::from_millis(500))
        );
        assert_eq!(
            parse("2024-09-07T14:37:39.123456789123Z"),
            Ok(z + Duration::from_nanos(123_456_789))
        );
    }

    #[test]
    fn rejects_nonsense() {
        for s in [
            "",
            "now",
            "2024-09-07",
            "2024-09-07T14:37:39",
            "2024-13-01T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2024-09-07T24:00:00Z",
            "2024-09-07T14:37:39.Z",
            "2024-09-07T14:37:39+2:00",
            "1969-12-31T23:59:59Z",
            "2024-09-07T14:37:39Zjunk",
            "２０２４-09-07T14:37:39Z",
        ] {
            assert!(parse(s).is_err(), "{s}");
        }
    }
}
