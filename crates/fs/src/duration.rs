//! Durations as people write them: `90s`, `30m`, `8h`, `7d`, `1h30m`.
//!
//! One grammar, `(<digits><unit>)+` with units `s`, `m`, `h`, `d` (ASCII
//! digits, lowercase units, nothing else: no sign, space, fraction or bare
//! number, so a unit is never guessed), read by one parser. What differs
//! between the places that read durations is explicit in the
//! [`DurationSyntax`] each passes:
//!
//! | syntax | groups | zero | longest |
//! |---|---|---|---|
//! | [`DurationSyntax::COMPOUND`] (certificate and token lifetimes) | one or more (`1h30m`) | yes | `u64` seconds |
//! | [`DurationSyntax::SINGLE`] (quota windows, Sigma `timespan`) | exactly one (`90m`) | yes | `u64` seconds |
//!
//! narrowed with [`DurationSyntax::positive`] and [`DurationSyntax::at_most`]
//! (a quota window is positive and at most 31 days, a Sigma timespan
//! positive and at most 7 days). Sigma's timespan is one number and one
//! unit, so the single syntax stays apart from the compound one.

use std::time::Duration;

/// Longest duration text accepted, in bytes.
pub const MAX_DURATION_TEXT: usize = 32;

/// The units, largest first: (letter, seconds).
const UNITS: [(char, u64); 4] = [('d', 86_400), ('h', 3600), ('m', 60), ('s', 1)];

/// Which durations a caller accepts, beyond the one grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationSyntax {
    compound: bool,
    zero: bool,
    max: Duration,
}

impl DurationSyntax {
    /// One or more `<number><unit>` groups, added up (`1h30m`), zero
    /// allowed, up to `u64::MAX` seconds.
    pub const COMPOUND: Self = Self {
        compound: true,
        zero: true,
        max: Duration::from_secs(u64::MAX),
    };

    /// Exactly one `<number><unit>` group (`90m`), zero allowed, up to
    /// `u64::MAX` seconds.
    pub const SINGLE: Self = Self {
        compound: false,
        zero: true,
        max: Duration::from_secs(u64::MAX),
    };

    /// The same, refusing zero ([`DurationError::Zero`]).
    pub const fn positive(self) -> Self {
        Self {
            zero: false,
            ..self
        }
    }

    /// The same, refusing more than `max` ([`DurationError::AboveMax`]).
    pub const fn at_most(self, max: Duration) -> Self {
        Self { max, ..self }
    }

    /// Whether several groups are accepted.
    pub const fn is_compound(self) -> bool {
        self.compound
    }

    /// The longest duration accepted.
    pub const fn max(self) -> Duration {
        self.max
    }
}

/// Why a duration was refused.
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
    /// Several groups where the syntax takes exactly one.
    #[error("duration {0:?} must be one <number><unit>, e.g. 90m, not several")]
    NotSingle(String),
    /// The duration does not fit in 64-bit seconds.
    #[error("duration {0:?} is too large")]
    Overflow(String),
    /// Zero where the syntax takes only positive durations.
    #[error("duration {0:?} is zero; it must be positive")]
    Zero(String),
    /// Longer than the syntax's maximum.
    #[error("duration {text:?} is longer than the maximum {}", format_duration(*max, DurationSyntax::COMPOUND))]
    AboveMax {
        /// The text.
        text: String,
        /// The maximum.
        max: Duration,
    },
}

/// Parses `text` in the grammar of this module, accepting what `syntax`
/// accepts. Whole seconds only.
pub fn parse_duration(text: &str, syntax: DurationSyntax) -> Result<Duration, DurationError> {
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    if text.len() > MAX_DURATION_TEXT {
        return Err(DurationError::TooLong(text.len()));
    }
    let malformed = || DurationError::Malformed(text.to_owned());
    let overflow = || DurationError::Overflow(text.to_owned());
    let mut total: u64 = 0;
    let mut groups = 0usize;
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
        let (_, unit) = UNITS
            .iter()
            .find(|(letter, _)| *letter == c)
            .ok_or_else(malformed)?;
        let n = number.take().ok_or_else(malformed)?;
        total = n
            .checked_mul(*unit)
            .and_then(|s| total.checked_add(s))
            .ok_or_else(overflow)?;
        groups += 1;
    }
    if number.is_some() {
        return Err(malformed());
    }
    if groups > 1 && !syntax.compound {
        return Err(DurationError::NotSingle(text.to_owned()));
    }
    let d = Duration::from_secs(total);
    if total == 0 && !syntax.zero {
        return Err(DurationError::Zero(text.to_owned()));
    }
    if d > syntax.max {
        return Err(DurationError::AboveMax {
            text: text.to_owned(),
            max: syntax.max,
        });
    }
    Ok(d)
}

/// Formats the whole seconds of `d` as `syntax` reads them: largest units
/// first for the compound syntax (`7d`, `1h30m`), the largest unit that
/// divides it for the single one (`90m`, `2h`); zero is `0s`.
pub fn format_duration(d: Duration, syntax: DurationSyntax) -> String {
    let mut secs = d.as_secs();
    if secs == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    for (letter, unit) in UNITS {
        if syntax.compound && secs >= unit {
            out.push_str(&(secs / unit).to_string());
            out.push(letter);
            secs %= unit;
        } else if !syntax.compound && secs.is_multiple_of(unit) {
            out.push_str(&(secs / unit).to_string());
            out.push(letter);
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const C: DurationSyntax = DurationSyntax::COMPOUND;
    const S: DurationSyntax = DurationSyntax::SINGLE;

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn every_unit_in_both_syntaxes() {
        for syntax in [C, S] {
            assert_eq!(parse_duration("90s", syntax), Ok(secs(90)));
            assert_eq!(parse_duration("30m", syntax), Ok(secs(1800)));
            assert_eq!(parse_duration("8h", syntax), Ok(secs(8 * 3600)));
            assert_eq!(parse_duration("7d", syntax), Ok(secs(7 * 86_400)));
            assert_eq!(parse_duration("0s", syntax), Ok(secs(0)));
            assert_eq!(parse_duration("01h", syntax), Ok(secs(3600)));
        }
    }

    #[test]
    fn compound_adds_groups_in_any_order() {
        assert_eq!(parse_duration("1h30m", C), Ok(secs(5400)));
        assert_eq!(parse_duration("30m1h", C), Ok(secs(5400)));
        assert_eq!(parse_duration("1d1h1m1s", C), Ok(secs(90_061)));
        assert_eq!(parse_duration("1h1h", C), Ok(secs(7200)));
    }

    #[test]
    fn single_refuses_several_groups() {
        for text in ["1h30m", "1h1h", "0s0s"] {
            assert_eq!(
                parse_duration(text, S),
                Err(DurationError::NotSingle(text.into()))
            );
        }
    }

    #[test]
    fn malformed_text_is_refused_in_both_syntaxes() {
        for syntax in [C, S] {
            assert_eq!(parse_duration("", syntax), Err(DurationError::Empty));
            for bad in [
                "8", "h", "8x", "-1h", "+1h", "1.5h", "8 h", " 8h", "8h ", "1hh", "h8", "1H", "1w",
                "1M", "1h30", "٣h", "8ｈ",
            ] {
                assert_eq!(
                    parse_duration(bad, syntax),
                    Err(DurationError::Malformed(bad.into())),
                    "{bad:?}"
                );
            }
            let long = format!("{}s", "0".repeat(MAX_DURATION_TEXT));
            assert_eq!(
                parse_duration(&long, syntax),
                Err(DurationError::TooLong(MAX_DURATION_TEXT + 1))
            );
            for huge in ["99999999999999999999d", "18446744073709551616s"] {
                assert_eq!(
                    parse_duration(huge, syntax),
                    Err(DurationError::Overflow(huge.into()))
                );
            }
        }
        assert_eq!(
            parse_duration("18446744073709551615s1s", C),
            Err(DurationError::Overflow("18446744073709551615s1s".into()))
        );
    }

    #[test]
    fn narrowed_syntaxes_refuse_zero_and_above_their_maximum() {
        let week = S.positive().at_most(secs(7 * 86_400));
        assert_eq!(parse_duration("7d", week), Ok(secs(7 * 86_400)));
        assert_eq!(parse_duration("1s", week), Ok(secs(1)));
        assert_eq!(
            parse_duration("0m", week),
            Err(DurationError::Zero("0m".into()))
        );
        assert_eq!(
            parse_duration("8d", week),
            Err(DurationError::AboveMax {
                text: "8d".into(),
                max: secs(7 * 86_400)
            })
        );
        assert_eq!(
            parse_duration("604801s", week),
            Err(DurationError::AboveMax {
                text: "604801s".into(),
                max: secs(7 * 86_400)
            })
        );
        let e = parse_duration("8d", week).unwrap_err().to_string();
        assert!(e.contains("7d"), "{e}");
        let c = C.positive().at_most(secs(3600));
        assert_eq!(parse_duration("59m60s", c), Ok(secs(3600)));
        assert!(matches!(
            parse_duration("59m61s", c),
            Err(DurationError::AboveMax { .. })
        ));
        assert!(matches!(
            parse_duration("0h0m", c),
            Err(DurationError::Zero(_))
        ));
        assert!(week.max() == secs(7 * 86_400) && !week.is_compound() && C.is_compound());
    }

    #[test]
    fn formats_in_the_units_each_syntax_reads() {
        assert_eq!(format_duration(secs(0), C), "0s");
        assert_eq!(format_duration(secs(5400), C), "1h30m");
        assert_eq!(format_duration(secs(7 * 86_400), C), "7d");
        assert_eq!(format_duration(secs(90_061), C), "1d1h1m1s");
        assert_eq!(format_duration(secs(0), S), "0s");
        assert_eq!(format_duration(secs(5400), S), "90m");
        assert_eq!(format_duration(secs(7200), S), "2h");
        assert_eq!(format_duration(secs(45), S), "45s");
        assert_eq!(format_duration(secs(31 * 86_400), S), "31d");
        assert_eq!(format_duration(Duration::from_millis(1500), S), "1s");
    }

    /// A unit letter and its seconds.
    fn unit() -> impl Strategy<Value = (char, u64)> {
        proptest::sample::select(UNITS.to_vec())
    }

    proptest! {
        #[test]
        fn format_then_parse_round_trips(n in 0u64..10_000_000_000) {
            for syntax in [C, S] {
                let d = secs(n);
                prop_assert_eq!(parse_duration(&format_duration(d, syntax), syntax), Ok(d));
            }
        }

        #[test]
        fn format_then_parse_round_trips_near_the_top(n in (u64::MAX - 10_000_000_000)..=u64::MAX) {
            for syntax in [C, S] {
                let d = secs(n);
                prop_assert_eq!(parse_duration(&format_duration(d, syntax), syntax), Ok(d));
            }
        }

        #[test]
        fn groups_add_up_and_only_compound_takes_several(
            groups in proptest::collection::vec((0u64..100_000, unit()), 1..4)
        ) {
            let text: String = groups.iter().map(|(n, (c, _))| format!("{n}{c}")).collect();
            let sum: u64 = groups.iter().map(|(n, (_, u))| n * u).sum();
            prop_assert_eq!(parse_duration(&text, C), Ok(secs(sum)));
            if groups.len() == 1 {
                prop_assert_eq!(parse_duration(&text, S), Ok(secs(sum)));
            } else {
                prop_assert_eq!(parse_duration(&text, S), Err(DurationError::NotSingle(text)));
            }
        }

        #[test]
        fn bounds_are_kept(n in 0u64..2_000_000, max in 1u64..1_000_000) {
            let syntax = S.positive().at_most(secs(max));
            match parse_duration(&format!("{n}s"), syntax) {
                Ok(d) => prop_assert!(n > 0 && n <= max && d == secs(n)),
                Err(DurationError::Zero(_)) => prop_assert_eq!(n, 0),
                Err(DurationError::AboveMax { .. }) => prop_assert!(n > max),
                Err(e) => prop_assert!(false, "{e}"),
            }
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,40}") {
            let _ = parse_duration(&s, C);
            let _ = parse_duration(&s, S.positive().at_most(secs(60)));
        }
    }
}
