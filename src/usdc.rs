//! USDC amounts: integer atomic units (6 decimals) and their exact decimal-string form.
//!
//! Money never touches a float. Config files and API bodies carry decimal strings such as `"39.00"`; they are
//! parsed digit by digit into atomic units and printed back the same way.

use std::fmt;
use std::str::FromStr;

/// Number of decimals of USDC.
pub const DECIMALS: u32 = 6;
const SCALE: i64 = 1_000_000;

/// An amount of USDC in atomic units (1 USDC = 1,000,000). Signed so ledger debits can be expressed; amounts
/// that are prices or payments are never negative.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Usdc(pub i64);

/// Why a decimal string is not a USDC amount.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseUsdcError {
    #[error("empty amount")]
    Empty,
    #[error(
        "`{0}` is not a decimal amount (expected digits with an optional `.` and up to 6 decimals, e.g. \"39.00\")"
    )]
    Malformed(String),
    #[error("`{0}` has more than 6 decimals; USDC has 6")]
    TooPrecise(String),
    #[error("`{0}` is too large")]
    TooLarge(String),
    #[error("`{0}` is negative")]
    Negative(String),
}

impl Usdc {
    pub const ZERO: Usdc = Usdc(0);

    pub fn atomic(self) -> i64 {
        self.0
    }

    /// Whole USDC, for tests and examples.
    pub fn whole(n: i64) -> Usdc {
        Usdc(n * SCALE)
    }

    /// `"39.00"` style: at least two decimals, more only when needed.
    pub fn to_decimal_string(self) -> String {
        self.to_string()
    }
}

impl FromStr for Usdc {
    type Err = ParseUsdcError;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let s = raw.trim();
        if s.is_empty() {
            return Err(ParseUsdcError::Empty);
        }
        if s.starts_with('-') {
            return Err(ParseUsdcError::Negative(raw.to_string()));
        }
        let (int_part, frac_part) = match s.split_once('.') {
            Some((i, f)) => (i, f),
            None => (s, ""),
        };
        let digits_only = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
        if int_part.is_empty() && frac_part.is_empty()
            || !digits_only(int_part)
            || !digits_only(frac_part)
            || (s.contains('.') && frac_part.is_empty() && int_part.is_empty())
        {
            return Err(ParseUsdcError::Malformed(raw.to_string()));
        }
        if frac_part.len() > DECIMALS as usize {
            return Err(ParseUsdcError::TooPrecise(raw.to_string()));
        }
        let int_value: i64 = if int_part.is_empty() {
            0
        } else {
            int_part
                .parse::<i64>()
                .map_err(|_| ParseUsdcError::TooLarge(raw.to_string()))?
        };
        let mut frac_value: i64 = 0;
        for i in 0..DECIMALS as usize {
            let digit = frac_part
                .as_bytes()
                .get(i)
                .map_or(0, |b| i64::from(b - b'0'));
            frac_value = frac_value * 10 + digit;
        }
        int_value
            .checked_mul(SCALE)
            .and_then(|v| v.checked_add(frac_value))
            .map(Usdc)
            .ok_or_else(|| ParseUsdcError::TooLarge(raw.to_string()))
    }
}

impl fmt::Display for Usdc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let whole = abs / SCALE as u64;
        let frac = abs % SCALE as u64;
        let mut frac_str = format!("{frac:06}");
        while frac_str.len() > 2 && frac_str.ends_with('0') {
            frac_str.pop();
        }
        write!(f, "{sign}{whole}.{frac_str}")
    }
}

impl serde::Serialize for Usdc {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for Usdc {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exactly() {
        assert_eq!("39.00".parse::<Usdc>(), Ok(Usdc(39_000_000)));
        assert_eq!("0.000001".parse::<Usdc>(), Ok(Usdc(1)));
        assert_eq!("10".parse::<Usdc>(), Ok(Usdc(10_000_000)));
        assert_eq!(".5".parse::<Usdc>(), Ok(Usdc(500_000)));
        assert_eq!("7.".parse::<Usdc>(), Ok(Usdc(7_000_000)));
    }

    #[test]
    fn rejects_what_is_not_an_amount() {
        assert!(matches!("".parse::<Usdc>(), Err(ParseUsdcError::Empty)));
        assert!(matches!(
            "1.2345678".parse::<Usdc>(),
            Err(ParseUsdcError::TooPrecise(_))
        ));
        assert!(matches!(
            "-1".parse::<Usdc>(),
            Err(ParseUsdcError::Negative(_))
        ));
        assert!(matches!(
            "1e3".parse::<Usdc>(),
            Err(ParseUsdcError::Malformed(_))
        ));
        assert!(matches!(
            ".".parse::<Usdc>(),
            Err(ParseUsdcError::Malformed(_))
        ));
        assert!(matches!(
            "1.2.3".parse::<Usdc>(),
            Err(ParseUsdcError::Malformed(_))
        ));
        assert!(matches!(
            "99999999999999999999".parse::<Usdc>(),
            Err(ParseUsdcError::TooLarge(_))
        ));
    }

    #[test]
    fn prints_at_least_two_decimals() {
        assert_eq!(Usdc(39_000_000).to_string(), "39.00");
        assert_eq!(Usdc(1).to_string(), "0.000001");
        assert_eq!(Usdc(1_500_000).to_string(), "1.50");
        assert_eq!(Usdc(-2_250_000).to_string(), "-2.25");
    }
}
