//! [`Durability`]: when a write counts as safe (`always`, every interval, or `never`).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// When a write counts as safe. Chosen per data dir; see DESIGN.md "Identity, ordering,
/// durability".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// A write is acknowledged only after an fsync that covers it; concurrent writers share
    /// one fsync. Nothing acknowledged is lost by a crash.
    #[default]
    Always,
    /// Storage is fsynced on this period; a crash may lose up to one period of writes.
    Interval(Duration),
    /// Never fsync explicitly; the OS decides. For data that can be regenerated.
    Never,
}

impl FromStr for Durability {
    type Err = String;

    /// Accepts `always`, `never`, or a humantime period such as `100ms` (meaning interval).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "always" => Ok(Self::Always),
            "never" => Ok(Self::Never),
            other => {
                let period = other.strip_prefix("interval:").unwrap_or(other).trim();
                humantime::parse_duration(period)
                    .map_err(|e| {
                        format!(
                            "durability must be \"always\", \"never\" or a period such as \"100ms\", got {other:?}: {e}"
                        )
                    })
                    .and_then(|d| {
                        if d.is_zero() {
                            Err("durability interval must be greater than zero".to_string())
                        } else {
                            Ok(Self::Interval(d))
                        }
                    })
            }
        }
    }
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Always => f.write_str("always"),
            Self::Never => f.write_str("never"),
            Self::Interval(d) => write!(f, "{}", humantime::format_duration(*d)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_policy() {
        assert_eq!("always".parse::<Durability>().unwrap(), Durability::Always);
        assert_eq!("never".parse::<Durability>().unwrap(), Durability::Never);
        assert_eq!(
            "250ms".parse::<Durability>().unwrap(),
            Durability::Interval(Duration::from_millis(250))
        );
        assert_eq!(
            "interval:1s".parse::<Durability>().unwrap(),
            Durability::Interval(Duration::from_secs(1))
        );
        assert!("sometimes".parse::<Durability>().is_err());
        assert!("0s".parse::<Durability>().is_err());
    }
}
