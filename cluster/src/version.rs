//! Which nats-server releases cluster mode accepts, and reading a server's version.
//!
//! Fencing rests on the server checking an append's expected last subject sequence when it
//! applies the append, under every leader change. Releases before 2.9.21 accept two appends
//! with the same expectation in a replicated stream (nats-server #4320: Debian's 2.9.10 did,
//! 80 times in 100 pipelined pairs); 2.11.0 (#6194, #6485) and 2.14.4 (#8370, #8377) fixed
//! the rest of what this relies on. So a node refuses to start against an older server.

use std::fmt;

/// A nats-server release, as its `INFO` or `--version` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerVersion {
    pub major: u64,
    pub minor: u64,
    pub patch: u64,
    /// A prerelease (`-beta.1`) of that release, which comes before it.
    pub prerelease: bool,
}

/// The oldest release cluster mode runs on (see the module doc).
pub const MIN_SERVER_VERSION: ServerVersion = ServerVersion {
    major: 2,
    minor: 14,
    patch: 4,
    prerelease: false,
};

impl ServerVersion {
    /// `v2.15.1`, `2.15.1` or `2.14.4-beta.1`; a missing patch is 0. `None` for anything
    /// else.
    pub fn parse(text: &str) -> Option<Self> {
        let text = text.trim().trim_start_matches('v');
        let core = text.split(['-', '+']).next()?;
        let prerelease = text[core.len()..].starts_with('-');
        let mut parts = core.split('.');
        let mut number = || parts.next().map(str::parse::<u64>);
        let major = number()?.ok()?;
        let minor = number()?.ok()?;
        let patch = match number() {
            Some(patch) => patch.ok()?,
            None => 0,
        };
        Some(Self {
            major,
            minor,
            patch,
            prerelease,
        })
    }

    /// Whether cluster mode may run on this release (a prerelease of the minimum comes
    /// before it, and may lack its fixes).
    pub fn qualifies(self) -> bool {
        let number = |v: Self| (v.major, v.minor, v.patch);
        number(self) > number(MIN_SERVER_VERSION)
            || (number(self) == number(MIN_SERVER_VERSION) && !self.prerelease)
    }
}

impl fmt::Display for ServerVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_as_servers_print_them_and_order_by_number() {
        let v = |text| ServerVersion::parse(text).map(|v| v.to_string());
        assert_eq!(v("v2.15.1").as_deref(), Some("2.15.1"));
        assert_eq!(v("2.9.10").as_deref(), Some("2.9.10"));
        assert_eq!(v("v2.14.4-beta.1").as_deref(), Some("2.14.4"));
        assert_eq!(v("2.12").as_deref(), Some("2.12.0"));
        assert_eq!(v("nonsense"), None);
        assert_eq!(v("2.x.1"), None);
        let parse = |text| ServerVersion::parse(text).unwrap();
        assert!(!parse("2.9.10").qualifies(), "2.9.10 double-accepts");
        assert!(!parse("2.14.3").qualifies());
        assert!(parse("2.14.4").qualifies());
        assert!(
            !parse("2.14.4-beta.1").qualifies(),
            "a prerelease comes before"
        );
        assert!(parse("2.15.0-rc.2").qualifies());
        assert!(parse("2.15.1").qualifies());
        assert!(parse("2.100.0").qualifies(), "numbers, not text");
        assert!(!parse("2.9.100").qualifies(), "numbers, not text");
    }
}
