//! Certificate and token lifetimes as people type them: `90s`, `30m`, `8h`,
//! `7d`, `1h30m`, in the compound syntax of [`nitrile_fs::duration`].

use std::time::Duration;

use nitrile_fs::duration::DurationSyntax;
pub use nitrile_fs::duration::{DurationError, MAX_DURATION_TEXT};

/// Parses `<number><unit>` groups (units `s`, `m`, `h`, `d`), e.g. `8h`,
/// `30m`, `7d`, `1h30m`. A bare number is refused: the unit is never guessed.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    nitrile_fs::duration::parse_duration(text, DurationSyntax::COMPOUND)
}

/// Formats whole seconds in the units [`parse_duration`] reads, largest
/// first: `7d`, `8h`, `1h30m`, `0s`.
pub fn format_duration(d: Duration) -> String {
    nitrile_fs::duration::format_duration(d, DurationSyntax::COMPOUND)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_take_several_groups_and_print_largest_first() {
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
        assert!(matches!(
            parse_duration("8"),
            Err(DurationError::Malformed(_))
        ));
    }
}
