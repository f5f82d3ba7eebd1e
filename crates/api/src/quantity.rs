//! Kubernetes quantities (`500m`, `2`, `256Mi`, `1G`) and durations (`30s`).

use serde::{Serialize, Serializer};

use crate::decode::{Cx, Decode, parse_scalar};
use crate::yaml::{Node, Plain, Value, plain_scalar};

/// A quantity in thousandths of its unit, as written. CPU `500m` is 500
/// millicores; memory `256Mi` is 268435456 bytes (× 1000 milli-units).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Quantity {
    milli: u128,
    text: String,
}

impl Quantity {
    /// Parses Kubernetes notation: a decimal number and an optional suffix
    /// (`m`, `k`, `M`, `G`, `T`, `P`, `E`, `Ki`, `Mi`, `Gi`, `Ti`, `Pi`, `Ei`).
    pub fn parse(text: &str) -> Result<Self, String> {
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, suffix) = text.split_at(split);
        let factor_milli: u128 = match suffix {
            "m" => 1,
            "" => 1_000,
            "k" => 1_000_000,
            "M" => 1_000_000_000,
            "G" => 1_000_000_000_000,
            "T" => 1_000_000_000_000_000,
            "P" => 1_000_000_000_000_000_000,
            "E" => 1_000_000_000_000_000_000_000,
            "Ki" => 1_000 << 10,
            "Mi" => 1_000 << 20,
            "Gi" => 1_000 << 30,
            "Ti" => 1_000 << 40,
            "Pi" => 1_000 << 50,
            "Ei" => 1_000 << 60,
            _ => {
                return Err(format!(
                    "unknown suffix `{suffix}`; use m, k, M, G, T, Ki, Mi, Gi or Ti"
                ));
            }
        };
        let (int, frac) = number.split_once('.').unwrap_or((number, ""));
        if int.is_empty() && frac.is_empty() || frac.contains('.') || number.is_empty() {
            return Err("expected a number such as 500m, 2, 0.5 or 256Mi".to_string());
        }
        if frac.len() > 9 {
            return Err("at most 9 decimal places".to_string());
        }
        let scale = 10u128.pow(frac.len() as u32);
        let digits = format!("{int}{frac}");
        let value: u128 = digits
            .parse()
            .map_err(|_| "number is too large".to_string())?;
        let milli = value
            .checked_mul(factor_milli)
            .ok_or_else(|| "number is too large".to_string())?;
        if milli % scale != 0 {
            return Err(format!("`{text}` is finer than the smallest unit (1m)"));
        }
        Ok(Quantity {
            milli: milli / scale,
            text: text.to_string(),
        })
    }

    /// The value in thousandths: millicores for CPU.
    pub fn milli(&self) -> u128 {
        self.milli
    }

    /// The value in whole units, rounded up: bytes for memory.
    pub fn units_ceil(&self) -> u128 {
        self.milli.div_ceil(1000)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl Serialize for Quantity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl Decode for Quantity {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        parse_scalar(node, cx, |text| {
            Quantity::parse(text).map_err(|why| format!("invalid quantity {text:?}: {why}"))
        })
    }
}

/// A duration written as `250ms`, `30s`, `5m`, `1h`, or combinations (`1m30s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut rest = text;
        let mut total = std::time::Duration::ZERO;
        if rest.is_empty() {
            return Err("empty duration".to_string());
        }
        while !rest.is_empty() {
            let n = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            if n == 0 {
                return Err(format!(
                    "expected a duration such as 250ms, 30s, 5m or 1h, found {text:?}"
                ));
            }
            let value: u64 = rest[..n]
                .parse()
                .map_err(|_| "number is too large".to_string())?;
            rest = &rest[n..];
            let u = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            let unit = match &rest[..u] {
                "ms" => std::time::Duration::from_millis(value),
                "s" => std::time::Duration::from_secs(value),
                "m" => std::time::Duration::from_secs(value.saturating_mul(60)),
                "h" => std::time::Duration::from_secs(value.saturating_mul(3600)),
                other => {
                    return Err(format!(
                        "unknown unit `{other}` in {text:?}; use ms, s, m or h"
                    ));
                }
            };
            total = total.saturating_add(unit);
            rest = &rest[u..];
        }
        Ok(Duration(total))
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let ms = self.0.as_millis();
        if ms.is_multiple_of(1000) {
            s.serialize_str(&format!("{}s", ms / 1000))
        } else {
            s.serialize_str(&format!("{ms}ms"))
        }
    }
}

impl Decode for Duration {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let text = node.as_scalar().unwrap_or_default();
        if let Value::Scalar { quoted: false, .. } = node.value
            && let Plain::Int(_) = plain_scalar(text)
        {
            cx.error(
                node.mark,
                format!("a duration needs a unit: write {text}s or {text}ms"),
            );
            return None;
        }
        parse_scalar(node, cx, Duration::parse)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kubernetes_notation() {
        assert_eq!(Quantity::parse("500m").unwrap().milli(), 500);
        assert_eq!(Quantity::parse("2").unwrap().milli(), 2000);
        assert_eq!(Quantity::parse("0.5").unwrap().milli(), 500);
        assert_eq!(Quantity::parse("256Mi").unwrap().units_ceil(), 256 << 20);
        assert_eq!(Quantity::parse("1G").unwrap().units_ceil(), 1_000_000_000);
        assert_eq!(Quantity::parse("1.5Gi").unwrap().units_ceil(), 3 << 29);
        assert!(Quantity::parse("0.0001").is_err());
        assert!(Quantity::parse("12Q").is_err());
        assert!(Quantity::parse("abc").is_err());
        assert!(Quantity::parse("").is_err());
        assert!(Quantity::parse("1.2.3").is_err());
    }

    #[test]
    fn parses_durations() {
        assert_eq!(Duration::parse("1m30s").unwrap().0.as_secs(), 90);
        assert_eq!(Duration::parse("250ms").unwrap().0.as_millis(), 250);
        assert!(Duration::parse("10").is_err());
        assert!(Duration::parse("5d").is_err());
    }
}
