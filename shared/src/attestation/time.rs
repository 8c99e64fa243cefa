//! RFC 3339 rendering of times, shared by error messages and the CLI so
//! both print a certificate's validity the same way.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Formats `t` as RFC 3339 UTC (`2024-09-07T14:37:39Z`, with `.mmm` when
/// the time has milliseconds). Times outside 1970..9999 fall back to a
/// seconds-since-epoch rendering instead of failing.
pub fn rfc3339(t: &SystemTime) -> String {
    let Ok(since) = t.duration_since(UNIX_EPOCH) else {
        return "(before 1970)".to_owned();
    };
    let whole = Duration::from_secs(since.as_secs());
    match der::DateTime::from_unix_duration(whole) {
        Ok(dt) => {
            let millis = since.subsec_millis();
            if millis == 0 {
                dt.to_string()
            } else {
                // `DateTime` renders `...SSZ`; insert the fraction before `Z`.
                let s = dt.to_string();
                let body = s.strip_suffix('Z').unwrap_or(&s);
                format!("{body}.{millis:03}Z")
            }
        }
        Err(_) => format!("{}s after 1970", since.as_secs()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_seconds_and_millis() {
        let t = UNIX_EPOCH + Duration::from_millis(1_725_719_859_545);
        assert_eq!(rfc3339(&t), "2024-09-07T14:37:39.545Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_725_719_859);
        assert_eq!(rfc3339(&t), "2024-09-07T14:37:39Z");
        let t = UNIX_EPOCH - Duration::from_secs(1);
        assert_eq!(rfc3339(&t), "(before 1970)");
    }
}
