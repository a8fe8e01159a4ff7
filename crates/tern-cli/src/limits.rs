//! The resource-alarm settings of `tern serve`, `--vm-memory-high-watermark`
//! and `--disk-free-limit`, as RabbitMQ writes them: a memory watermark is a
//! fraction of the machine's memory (`0.4`) or a size (`2GiB`); a disk limit
//! is a size (`50MB`). Sizes take decimal (kB, MB, GB, TB) or binary (KiB,
//! MiB, GiB, TiB) units, or none for bytes.

use serde::{Deserialize, Serialize};
use tern_broker::alarm::{AlarmLimits, MemoryLimit};

/// RabbitMQ's defaults.
pub(crate) const DEFAULT_WATERMARK: &str = "0.4";
pub(crate) const DEFAULT_DISK_FREE_LIMIT: &str = "50MB";

/// A value a configuration file may give as a number or as text
/// (`vm_memory_high_watermark = 0.4` or `= "2GiB"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum NumberOrText {
    Integer(u64),
    Float(f64),
    Text(String),
}

impl NumberOrText {
    pub(crate) fn into_text(self) -> String {
        match self {
            NumberOrText::Integer(n) => n.to_string(),
            NumberOrText::Float(f) => f.to_string(),
            NumberOrText::Text(t) => t,
        }
    }
}

/// The alarm settings as given (shown by `--print-config`) and as the
/// broker's monitor takes them.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct AlarmSettings {
    pub(crate) vm_memory_high_watermark: String,
    pub(crate) disk_free_limit: String,
    #[serde(skip)]
    pub(crate) limits: AlarmLimits,
}

/// Parses a memory high-watermark: a plain number from 0 to 1 is a
/// fraction of total memory; a number with a unit is a size.
pub(crate) fn parse_watermark(text: &str) -> Result<MemoryLimit, String> {
    let text = text.trim();
    if let Ok(fraction) = text.parse::<f64>() {
        if !(0.0..=1.0).contains(&fraction) {
            return Err(format!(
                "{text:?} is not a fraction from 0 to 1; write a fraction such as \"0.4\" or a size with a unit such as \"2GiB\""
            ));
        }
        return Ok(MemoryLimit::Fraction(fraction));
    }
    parse_size(text).map(MemoryLimit::Bytes).map_err(|why| {
        format!("{why}; write a fraction such as \"0.4\" or a size such as \"2GiB\"")
    })
}

/// Parses a size: digits, then optionally a unit.
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let unit = unit.trim();
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size (a whole number, then a unit)"))?;
    let scale: u64 = match unit {
        "" | "B" | "b" => 1,
        "kB" | "KB" | "k" | "K" => 1_000,
        "MB" | "M" => 1_000_000,
        "GB" | "G" => 1_000_000_000,
        "TB" | "T" => 1_000_000_000_000,
        "KiB" | "kiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        other => {
            return Err(format!(
                "{other:?} in {text:?} is not a size unit (kB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            ))
        }
    };
    number
        .checked_mul(scale)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_decimal_and_binary_units() {
        assert_eq!(parse_size("50MB"), Ok(50_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size(" 3 kB "), Ok(3000));
        for bad in ["", "MB", "-1MB", "1.5GB", "5 parsecs", "99999999999999TB"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn watermarks_are_fractions_or_sizes() {
        assert_eq!(parse_watermark("0.4"), Ok(MemoryLimit::Fraction(0.4)));
        assert_eq!(parse_watermark("1"), Ok(MemoryLimit::Fraction(1.0)));
        assert_eq!(parse_watermark("2GiB"), Ok(MemoryLimit::Bytes(2 << 30)));
        for bad in ["1.5", "-0.1", "lots", "2 GiB of RAM"] {
            assert!(parse_watermark(bad).is_err(), "{bad}");
        }
    }
}
