//! Value types of the config file: durations ("250ms"), sizes ("64KiB"), shares ("20%"),
//! rates ("100/min") and strings with `${VAR}` expanded from the environment.
//!
//! Each parses in its `Deserialize` impl, so a bad value is reported by the TOML reader with the
//! value's own position and a message that says what is allowed.

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Replaces every `${NAME}` in `raw` with the environment variable NAME; an unset variable is an
/// error. `$$` stands for a literal `$`.
pub fn expand_env(raw: &str) -> Result<String, String> {
    if !raw.contains('$') {
        return Ok(raw.to_owned());
    }
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some(after) = tail.strip_prefix("${") {
            let end = after
                .find('}')
                .ok_or_else(|| format!("unclosed `${{` in {raw:?}: write ${{NAME}}"))?;
            let name = &after[..end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!(
                    "invalid variable name {name:?}: use letters, digits and _"
                ));
            }
            let value = std::env::var(name).map_err(|_| {
                format!("environment variable {name} is not set (used as ${{{name}}})")
            })?;
            out.push_str(&value);
            rest = &after[end + 1..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn expanded<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let raw = String::deserialize(d)?;
    expand_env(&raw).map_err(de::Error::custom)
}

/// A string with `${VAR}` references expanded.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(transparent)]
pub struct Text(pub String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        expanded(d).map(Text)
    }
}

impl std::ops::Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A length of time written as "250ms", "30s", "5m", "1h 30m".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    /// Builds a duration from whole seconds (for defaults).
    pub const fn secs(s: u64) -> Self {
        Duration(std::time::Duration::from_secs(s))
    }
    /// Builds a duration from milliseconds (for defaults).
    pub const fn millis(ms: u64) -> Self {
        Duration(std::time::Duration::from_millis(ms))
    }
}

impl std::str::FromStr for Duration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s.trim()).map(Duration).map_err(|e| {
            format!(
                "invalid duration {s:?} ({e}): write a number with a unit, like \"250ms\", \"30s\", \"5m\" or \"1h\""
            )
        })
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        expanded(d)?.parse().map_err(de::Error::custom)
    }
}

impl Serialize for Duration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

/// A size in bytes written as "512", "64KiB", "256MiB", "1GiB" (or decimal "10MB").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid size {s:?}: write a whole number with an optional unit B, KiB, MiB, GiB (or KB, MB, GB), like \"64KiB\""
            )
        };
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| bad())?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "K" | "k" => 1 << 10,
            "MiB" | "M" => 1 << 20,
            "GiB" | "G" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            _ => return Err(bad()),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(bad)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"64KiB\" or a whole number of bytes")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("invalid size {v}: must not be negative")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                expand_env(v).and_then(|s| s.parse()).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if n >= size && n.is_multiple_of(size) {
                return write!(f, "{}{unit}", n / size);
            }
        }
        write!(f, "{n}B")
    }
}

/// A share written as "20%" (0 to 100).
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize)]
pub struct Percent(pub f64);

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = expanded(d)?;
        let bad = || {
            de::Error::custom(format!(
                "invalid share {s:?}: write a percentage from 0% to 100%, like \"20%\""
            ))
        };
        let n: f64 = s
            .trim()
            .strip_suffix('%')
            .ok_or_else(bad)?
            .trim()
            .parse()
            .map_err(|_| bad())?;
        if !(0.0..=100.0).contains(&n) {
            return Err(bad());
        }
        Ok(Percent(n / 100.0))
    }
}

/// A request rate written as "100/s", "100/min" or "100/h".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Rate {
    /// Requests allowed per period.
    pub count: u64,
    /// The period.
    pub per: std::time::Duration,
}

impl std::str::FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!(
                "invalid rate {s:?}: {why}; write N/s, N/min or N/h with N ≥ 1, like \"100/min\""
            )
        };
        let (n, unit) = s.split_once('/').ok_or_else(|| bad("no `/`"))?;
        let count: i64 = n
            .trim()
            .parse()
            .map_err(|_| bad("the count is not a whole number"))?;
        if count < 1 {
            return Err(bad("the count must be at least 1"));
        }
        let per = match unit.trim() {
            "s" | "sec" | "second" => 1,
            "m" | "min" | "minute" => 60,
            "h" | "hour" => 3600,
            _ => return Err(bad("the period must be s, min or h")),
        };
        Ok(Rate {
            count: count as u64,
            per: std::time::Duration::from_secs(per),
        })
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        expanded(d)?.parse().map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!("64KiB".parse::<ByteSize>().unwrap().0, 65536);
        assert_eq!("10MB".parse::<ByteSize>().unwrap().0, 10_000_000);
        assert_eq!("7".parse::<ByteSize>().unwrap().0, 7);
        assert!("10 fortnights".parse::<ByteSize>().is_err());
        assert!("-1KiB".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(32 << 10).to_string(), "32KiB");
    }

    #[test]
    fn durations() {
        assert_eq!("250ms".parse::<Duration>().unwrap(), Duration::millis(250));
        assert_eq!("5m".parse::<Duration>().unwrap(), Duration::secs(300));
        let e = "5".parse::<Duration>().unwrap_err();
        assert!(e.contains("\"30s\""), "{e}");
    }

    #[test]
    fn rates() {
        let r: Rate = "100/min".parse().unwrap();
        assert_eq!((r.count, r.per.as_secs()), (100, 60));
        assert!("0/s".parse::<Rate>().unwrap_err().contains("at least 1"));
        assert!("-1/min".parse::<Rate>().is_err());
        assert!(
            "10/fortnight"
                .parse::<Rate>()
                .unwrap_err()
                .contains("s, min or h")
        );
    }

    #[test]
    fn env_expansion() {
        // SAFETY: test-only; no other thread in this test reads this variable.
        unsafe { std::env::set_var("PALISADE_TEST_VALUE", "abc") };
        assert_eq!(expand_env("x${PALISADE_TEST_VALUE}y").unwrap(), "xabcy");
        assert_eq!(expand_env("$$5").unwrap(), "$5");
        let e = expand_env("${PALISADE_SURELY_UNSET_VAR}").unwrap_err();
        assert!(e.contains("PALISADE_SURELY_UNSET_VAR is not set"), "{e}");
    }
}
