//! Human-readable byte sizes: `"500GiB"`, `"2TiB"`, `"4096"`, `"1.5TB"`, with one meaning for
//! every daemon of the workspace (storaged's volume sizes, limits and pool capacity; vmm's
//! `--memory` and `--serial-log-max`).
//!
//! - Binary suffixes are powers of 1024: `KiB`, `MiB`, `GiB`, `TiB`, `PiB`, and the bare letters
//!   `K`, `M`, `G`, `T`, `P` (as `dd` and QEMU read them).
//! - Decimal suffixes are powers of 1000, as a datasheet reads them: `kB`, `MB`, `GB`, `TB`, `PB`.
//! - A bare number, or one with `B`, is bytes: `"4096"` is 4096 bytes.
//!
//! Units are case-insensitive, a space may separate number and unit, `_` may group digits, and a
//! fraction is accepted when it makes a whole number of bytes (`"1.5GiB"`, not `"1.3B"`). In JSON
//! and TOML a size may be a string or an integer number of bytes; it is written as the largest
//! binary unit that divides it exactly (`"4KiB"`, `"1000B"`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Errors parsing a size.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("Size is empty")]
    Empty,
    #[error("Size '{0}' is not a number followed by an optional unit (B, KiB, MiB, GiB, TiB, kB, MB, GB, TB)")]
    Malformed(String),
    #[error("Size '{0}' has an unknown unit '{1}'")]
    UnknownUnit(String, String),
    #[error("Size '{0}' does not fit in 64 bits")]
    Overflow(String),
    #[error("Size '{0}' is not a whole number of bytes")]
    Fractional(String),
}

/// A size in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }
}

fn unit_multiplier(unit: &str) -> Option<u64> {
    Some(match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "p" | "pib" => 1 << 50,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "pb" => 1_000_000_000_000_000,
        _ => return None,
    })
}

impl FromStr for ByteSize {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let t = s.trim();
        if t.is_empty() {
            return Err(Error::Empty);
        }
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let num: String = num.chars().filter(|&c| c != '_').collect();
        let unit = unit.trim();
        if num.is_empty() {
            return Err(Error::Malformed(s.to_string()));
        }
        let mult = unit_multiplier(unit)
            .ok_or_else(|| Error::UnknownUnit(s.to_string(), unit.to_string()))?;
        if let Some((whole, frac)) = num.split_once('.') {
            // Exact decimal arithmetic: whole * mult + frac * mult / 10^digits.
            if frac.contains('.') || frac.is_empty() || frac.len() > 18 {
                return Err(Error::Malformed(s.to_string()));
            }
            let whole: u128 = if whole.is_empty() {
                0
            } else {
                whole.parse().map_err(|_| Error::Malformed(s.to_string()))?
            };
            let frac_val: u128 = frac.parse().map_err(|_| Error::Malformed(s.to_string()))?;
            let scale = 10u128.pow(frac.len() as u32);
            let frac_bytes = frac_val * u128::from(mult);
            if !frac_bytes.is_multiple_of(scale) {
                return Err(Error::Fractional(s.to_string()));
            }
            let total = whole
                .checked_mul(u128::from(mult))
                .and_then(|w| w.checked_add(frac_bytes / scale))
                .ok_or_else(|| Error::Overflow(s.to_string()))?;
            u64::try_from(total)
                .map(ByteSize)
                .map_err(|_| Error::Overflow(s.to_string()))
        } else {
            let n: u64 = num.parse().map_err(|_| Error::Overflow(s.to_string()))?;
            n.checked_mul(mult)
                .map(ByteSize)
                .ok_or_else(|| Error::Overflow(s.to_string()))
        }
    }
}

impl fmt::Display for ByteSize {
    /// The largest binary unit that divides the size exactly: `2TiB`, `4096B` is `4KiB`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 5] = [
            ("PiB", 1 << 50),
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ];
        for (name, mult) in UNITS {
            if self.0 >= mult && self.0.is_multiple_of(mult) {
                return write!(f, "{}{}", self.0 / mult, name);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"500GiB\" or a number of bytes")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("size {v} is negative")))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<ByteSize, E> {
                Err(E::custom(format!(
                    "size {v} is not a whole number of bytes"
                )))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_and_decimal_units() {
        assert_eq!("500GiB".parse(), Ok(ByteSize(500 << 30)));
        assert_eq!("2 TiB".parse(), Ok(ByteSize(2 << 40)));
        assert_eq!("4096".parse(), Ok(ByteSize(4096)));
        assert_eq!("1TB".parse(), Ok(ByteSize(1_000_000_000_000)));
        assert_eq!("0.5TB".parse(), Ok(ByteSize(500_000_000_000)));
        assert_eq!("1.5GiB".parse(), Ok(ByteSize(3 << 29)));
        assert_eq!("64m".parse(), Ok(ByteSize(64 << 20)));
    }

    #[test]
    fn gb_and_tb_are_powers_of_ten_gib_tib_and_letters_powers_of_two() {
        assert_eq!("1GB".parse(), Ok(ByteSize(1_000_000_000)));
        assert_eq!("1gb".parse(), Ok(ByteSize(1_000_000_000)));
        assert_eq!("1GiB".parse(), Ok(ByteSize(1 << 30)));
        assert_eq!("1G".parse(), Ok(ByteSize(1 << 30)));
        assert_eq!("1TB".parse(), Ok(ByteSize(1_000_000_000_000)));
        assert_eq!("1TiB".parse(), Ok(ByteSize(1 << 40)));
        assert_eq!("4096".parse(), Ok(ByteSize(4096)));
        assert_eq!("4096B".parse(), Ok(ByteSize(4096)));
    }

    #[test]
    fn rejects_garbage_units_overflow_and_fractions_of_bytes() {
        assert!(matches!("".parse::<ByteSize>(), Err(Error::Empty)));
        assert!(matches!(
            "GiB".parse::<ByteSize>(),
            Err(Error::Malformed(_))
        ));
        assert!(matches!(
            "5 apples".parse::<ByteSize>(),
            Err(Error::UnknownUnit(..))
        ));
        assert!(matches!(
            "20000000PiB".parse::<ByteSize>(),
            Err(Error::Overflow(_))
        ));
        assert!(matches!(
            "1.3B".parse::<ByteSize>(),
            Err(Error::Fractional(_))
        ));
        assert!(matches!("-5".parse::<ByteSize>(), Err(Error::Malformed(_))));
    }

    #[test]
    fn displays_largest_exact_binary_unit() {
        assert_eq!(ByteSize(2 << 40).to_string(), "2TiB");
        assert_eq!(ByteSize(4096).to_string(), "4KiB");
        assert_eq!(ByteSize(1_000_000_000_000).to_string(), "976562500KiB");
        assert_eq!(ByteSize(1000).to_string(), "1000B");
    }

    #[test]
    fn deserializes_strings_and_integers() {
        let v: ByteSize = serde_json::from_str("\"1GiB\"").unwrap();
        assert_eq!(v, ByteSize(1 << 30));
        let v: ByteSize = serde_json::from_str("8192").unwrap();
        assert_eq!(v, ByteSize(8192));
        assert!(serde_json::from_str::<ByteSize>("-1").is_err());
    }
}
