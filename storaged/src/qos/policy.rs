//! Which limits a volume gets: the `[qos]` configuration, the tier rates, a volume's overrides,
//! and the effective [`Limits`] computed from them.

use serde::{Deserialize, Serialize};

use crate::volume::Tier;
use size::ByteSize;

/// Bytes in the TB of the per-TB tier rates.
pub const TB: u64 = 1_000_000_000_000;

/// Unit the bandwidth bucket counts in: virtio-blk sectors.
pub const BANDWIDTH_UNIT: u64 = 512;

/// Smallest bandwidth limit accepted, in bytes/s.
pub const MIN_BANDWIDTH: u64 = 4096;

/// Longest burst accepted, in seconds.
pub const MAX_BURST_SECONDS: f64 = 60.0;

/// Errors in QoS settings, from the configuration or the API.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("{key} must be at least 1 (got 0)")]
    Zero { key: &'static str },
    #[error("{key} {value} is out of range: {reason}")]
    OutOfRange {
        key: &'static str,
        value: String,
        reason: &'static str,
    },
}

impl Error {
    /// The setting the error is about.
    pub fn key(&self) -> &'static str {
        match self {
            Error::Zero { key } | Error::OutOfRange { key, .. } => key,
        }
    }
}

/// IOPS per TB of volume size, per tier. `mass` has none unless configured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TierRates {
    pub essential: u64,
    pub standard: u64,
    pub premium: u64,
    pub enterprise: u64,
    pub ultra: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mass: Option<u64>,
}

impl Default for TierRates {
    fn default() -> Self {
        TierRates {
            essential: 500,
            standard: 1500,
            premium: 3000,
            enterprise: 7500,
            ultra: 15000,
            mass: None,
        }
    }
}

impl TierRates {
    /// IOPS per TB of a tier; `None`: no IOPS commitment, no limit.
    pub fn rate(&self, tier: Tier) -> Option<u64> {
        match tier {
            Tier::Essential => Some(self.essential),
            Tier::Standard => Some(self.standard),
            Tier::Premium => Some(self.premium),
            Tier::Enterprise => Some(self.enterprise),
            Tier::Ultra => Some(self.ultra),
            Tier::Mass => self.mass,
        }
    }
}

/// The `[qos]` section of the configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QosConfig {
    /// A read or write costs one operation per started unit of this many bytes. A multiple of
    /// 512, at least 4 KiB. Default: 256 KiB.
    pub io_size: ByteSize,
    /// Bucket capacity, in seconds of the limit. Default: 1.
    pub burst_seconds: f64,
    /// Lowest IOPS limit a tier gives (so small volumes stay usable); 0: none. Overrides may
    /// go below it. Default: 100.
    pub floor_iops: u64,
    pub tier_iops_per_tb: TierRates,
}

impl Default for QosConfig {
    fn default() -> Self {
        QosConfig {
            io_size: ByteSize(256 << 10),
            burst_seconds: 1.0,
            floor_iops: 100,
            tier_iops_per_tb: TierRates::default(),
        }
    }
}

impl QosConfig {
    /// Checks the section; the error names the key.
    pub fn validate(&self) -> Result<(), Error> {
        let io = self.io_size.0;
        if io < 4096 || !io.is_multiple_of(BANDWIDTH_UNIT) {
            return Err(Error::OutOfRange {
                key: "qos.io_size",
                value: io.to_string(),
                reason: "must be a multiple of 512 bytes and at least 4096",
            });
        }
        if !(self.burst_seconds > 0.0 && self.burst_seconds <= MAX_BURST_SECONDS) {
            return Err(Error::OutOfRange {
                key: "qos.burst_seconds",
                value: self.burst_seconds.to_string(),
                reason: "must be more than 0 and at most 60",
            });
        }
        let r = &self.tier_iops_per_tb;
        for (key, v) in [
            ("qos.tier_iops_per_tb.essential", Some(r.essential)),
            ("qos.tier_iops_per_tb.standard", Some(r.standard)),
            ("qos.tier_iops_per_tb.premium", Some(r.premium)),
            ("qos.tier_iops_per_tb.enterprise", Some(r.enterprise)),
            ("qos.tier_iops_per_tb.ultra", Some(r.ultra)),
            ("qos.tier_iops_per_tb.mass", r.mass),
        ] {
            if v == Some(0) {
                return Err(Error::Zero { key });
            }
        }
        Ok(())
    }
}

/// Per-volume overrides, as stored in the catalog and set through the API.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overrides {
    /// IOPS limit replacing the tier's.
    pub iops_limit: Option<u64>,
    /// Bandwidth limit in bytes/s.
    pub bandwidth_limit: Option<u64>,
}

impl Overrides {
    /// Checks override values: positive, bandwidth at least [`MIN_BANDWIDTH`].
    pub fn validate(&self) -> Result<(), Error> {
        if self.iops_limit == Some(0) {
            return Err(Error::Zero { key: "iops_limit" });
        }
        if let Some(b) = self.bandwidth_limit {
            if b == 0 {
                return Err(Error::Zero {
                    key: "bandwidth_limit",
                });
            }
            if b < MIN_BANDWIDTH {
                return Err(Error::OutOfRange {
                    key: "bandwidth_limit",
                    value: b.to_string(),
                    reason: "must be at least 4096 bytes/s",
                });
            }
        }
        Ok(())
    }
}

/// Where an effective limit comes from (the API's type: the data path applies what it shows).
pub use storaged_api::LimitSource as Source;

/// A volume's effective limits, as the data path applies them and the API shows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Operations per second; `None`: unlimited.
    pub iops: Option<u64>,
    pub iops_source: Source,
    /// Operations the bucket holds (the burst).
    pub iops_burst: Option<u64>,
    /// Bytes per second; `None`: unlimited.
    pub bandwidth_bytes_per_second: Option<u64>,
    pub bandwidth_source: Source,
    /// Bytes the bandwidth bucket holds.
    pub bandwidth_burst_bytes: Option<u64>,
    /// Bytes one operation covers.
    pub io_size: u64,
}

impl Limits {
    /// The effective limits of a volume of `tier` and `size_bytes` with `overrides`.
    pub fn compute(cfg: &QosConfig, tier: Tier, size_bytes: u64, overrides: Overrides) -> Limits {
        let (iops, iops_source) = match (overrides.iops_limit, cfg.tier_iops_per_tb.rate(tier)) {
            (Some(o), _) => (Some(o), Source::Override),
            (None, None) => (None, Source::Unlimited),
            (None, Some(rate)) => {
                let by_size = u128::from(rate) * u128::from(size_bytes) / u128::from(TB);
                let by_size = u64::try_from(by_size).unwrap_or(u64::MAX);
                if by_size < cfg.floor_iops {
                    (Some(cfg.floor_iops), Source::Floor)
                } else {
                    // A tiny volume with no floor still gets one operation a second.
                    (Some(by_size.max(1)), Source::Tier)
                }
            }
        };
        let (bandwidth, bandwidth_source) = match overrides.bandwidth_limit {
            Some(b) => (Some(b), Source::Override),
            None => (None, Source::Unlimited),
        };
        let burst = |per_second: u64, unit: u64| {
            let b = (per_second as f64 * cfg.burst_seconds / unit as f64).ceil() as u64;
            b.clamp(1, u64::from(u32::MAX)) * unit
        };
        Limits {
            iops,
            iops_source,
            iops_burst: iops.map(|i| burst(i, 1)),
            bandwidth_bytes_per_second: bandwidth,
            bandwidth_source,
            bandwidth_burst_bytes: bandwidth.map(|b| burst(b, BANDWIDTH_UNIT)),
            io_size: cfg.io_size.0,
        }
    }

    pub fn is_unlimited(&self) -> bool {
        self.iops.is_none() && self.bandwidth_bytes_per_second.is_none()
    }
}

impl From<Limits> for storaged_api::Limits {
    fn from(l: Limits) -> Self {
        storaged_api::Limits {
            iops: l.iops,
            iops_source: l.iops_source,
            iops_burst: l.iops_burst,
            bandwidth_bytes_per_second: l.bandwidth_bytes_per_second,
            bandwidth_source: l.bandwidth_source,
            bandwidth_burst_bytes: l.bandwidth_burst_bytes,
            io_size: l.io_size,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tier_limits_are_rate_times_size_in_decimal_terabytes() {
        let cfg = QosConfig::default();
        let l = Limits::compute(&cfg, Tier::Standard, TB / 2, Overrides::default());
        assert_eq!((l.iops, l.iops_source), (Some(750), Source::Tier));
        let l = Limits::compute(&cfg, Tier::Ultra, 10 * TB, Overrides::default());
        assert_eq!(l.iops, Some(150_000));
        for (tier, rate) in [
            (Tier::Essential, 500),
            (Tier::Premium, 3000),
            (Tier::Enterprise, 7500),
        ] {
            assert_eq!(
                Limits::compute(&cfg, tier, TB, Overrides::default()).iops,
                Some(rate)
            );
        }
        // 1 TiB is 1.0995 TB: the limit is rounded down, not up to a round number.
        let l = Limits::compute(&cfg, Tier::Premium, 1 << 40, Overrides::default());
        assert_eq!(l.iops, Some(3298));
        assert_eq!(l.iops_burst, Some(3298));
    }

    #[test]
    fn floor_override_and_mass_say_where_the_limit_comes_from() {
        let cfg = QosConfig::default();
        let l = Limits::compute(&cfg, Tier::Essential, 1 << 30, Overrides::default());
        assert_eq!((l.iops, l.iops_source), (Some(100), Source::Floor));
        let l = Limits::compute(&cfg, Tier::Mass, 10 * TB, Overrides::default());
        assert_eq!((l.iops, l.iops_source), (None, Source::Unlimited));
        assert!(l.is_unlimited());
        let o = Overrides {
            iops_limit: Some(40),
            bandwidth_limit: Some(10_000_000),
        };
        let l = Limits::compute(&cfg, Tier::Essential, 1 << 30, o);
        assert_eq!((l.iops, l.iops_source), (Some(40), Source::Override));
        assert_eq!(
            (l.bandwidth_bytes_per_second, l.bandwidth_source),
            (Some(10_000_000), Source::Override)
        );
        let mut cfg = QosConfig::default();
        cfg.tier_iops_per_tb.mass = Some(100);
        let l = Limits::compute(&cfg, Tier::Mass, 10 * TB, Overrides::default());
        assert_eq!((l.iops, l.iops_source), (Some(1000), Source::Tier));
    }

    #[test]
    fn bad_settings_and_overrides_are_refused_by_name() {
        let o = Overrides {
            iops_limit: Some(0),
            ..Default::default()
        };
        assert_eq!(o.validate(), Err(Error::Zero { key: "iops_limit" }));
        let o = Overrides {
            bandwidth_limit: Some(100),
            ..Default::default()
        };
        assert!(matches!(
            o.validate(),
            Err(Error::OutOfRange {
                key: "bandwidth_limit",
                ..
            })
        ));
        let mut c = QosConfig::default();
        c.tier_iops_per_tb.premium = 0;
        assert_eq!(
            c.validate(),
            Err(Error::Zero {
                key: "qos.tier_iops_per_tb.premium"
            })
        );
        let c = QosConfig {
            io_size: ByteSize(1000),
            ..Default::default()
        };
        assert!(c.validate().is_err());
        let c = QosConfig {
            burst_seconds: 0.0,
            ..Default::default()
        };
        assert!(c.validate().is_err());
        assert!(QosConfig::default().validate().is_ok());
    }
}
