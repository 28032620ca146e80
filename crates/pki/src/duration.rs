//! Durations as people type them: `90s`, `30m`, `8h`, `7d`, `1h30m`.

use std::time::Duration;

/// Longest duration text accepted.
pub const MAX_DURATION_TEXT: usize = 32;

/// Why a duration was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DurationError {
    /// The text is empty.
    #[error("duration is empty; write e.g. 30m, 8h or 7d")]
    Empty,
    /// The text is longer than [`MAX_DURATION_TEXT`].
    #[error("duration text is {0} bytes long; at most {MAX_DURATION_TEXT} are allowed")]
    TooLong(usize),
    /// The text is not a sequence of `<number><unit>`.
    #[error(
        "duration {0:?} is not of the form <number><unit>..., units s, m, h, d; e.g. 8h or 1h30m"
    )]
    Malformed(String),
    /// The duration does not fit in 64-bit seconds.
    #[error("duration {0:?} is too large")]
    Overflow(String),
}

/// Parses `<number><unit>` groups (units `s`, `m`, `h`, `d`), e.g. `8h`,
/// `30m`, `7d`, `1h30m`. A bare number is refused: the unit is never guessed.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    if text.len() > MAX_DURATION_TEXT {
        return Err(DurationError::TooLong(text.len()));
    }
    let malformed = || DurationError::Malformed(text.to_owned());
    let overflow = || DurationError::Overflow(text.to_owned());
    let mut total: u64 = 0;
    let mut number: Option<u64> = None;
    for c in text.chars() {
        if let Some(d) = c.to_digit(10) {
            let n = number.unwrap_or(0);
            number = Some(
                n.checked_mul(10)
                    .and_then(|n| n.checked_add(u64::from(d)))
                    .ok_or_else(overflow)?,
            );
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(malformed()),
        };
        let n = number.take().ok_or_else(malformed)?;
        total = n
            .checked_mul(unit)
            .and_then(|s| total.checked_add(s))
            .ok_or_else(overflow)?;
    }
    if number.is_some() {
        return Err(malformed());
    }
    Ok(Duration::from_secs(total))
}

/// Formats whole seconds in the units [`parse_duration`] reads, largest
/// first: `7d`, `8h`, `1h30m`, `0s`.
pub fn format_duration(d: Duration) -> String {
    let mut secs = d.as_secs();
    if secs == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    for (unit, name) in [(86_400, 'd'), (3600, 'h'), (60, 'm'), (1, 's')] {
        if secs >= unit {
            out.push_str(&(secs / unit).to_string());
            out.push(name);
            secs %= unit;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn units() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("8h").unwrap(), Duration::from_secs(8 * 3600));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        for bad in ["", "8", "h", "8x", "-1h", "1.5h", "8 h", "1hh", "h8"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
        assert!(matches!(
            parse_duration("99999999999999999999d"),
            Err(DurationError::Overflow(_))
        ));
    }

    proptest! {
        #[test]
        fn format_then_parse_round_trips(secs in 0u64..10_000_000_000) {
            let d = Duration::from_secs(secs);
            prop_assert_eq!(parse_duration(&format_duration(d)).unwrap(), d);
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,40}") {
            let _ = parse_duration(&s);
        }
    }
}
