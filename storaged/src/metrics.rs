//! Prometheus metrics: one registry for the daemon, per-volume series labelled `volume`.
//!
//! Data-path threads hold resolved counters ([`VolumeMetrics`]), so the hot path does no label
//! lookups. Deleting a volume removes its series.

use prometheus::{
    Counter, CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::blk::request::Operation;

/// Operation kinds, in the order of [`op_index`].
pub const OPS: [&str; 6] = [
    "read",
    "write",
    "flush",
    "discard",
    "write_zeroes",
    "get_id",
];

/// Index of an operation into [`OPS`].
pub fn op_index(op: &Operation) -> usize {
    match op {
        Operation::Read { .. } => 0,
        Operation::Write { .. } => 1,
        Operation::Flush => 2,
        Operation::Discard(_) => 3,
        Operation::WriteZeroes(_) => 4,
        Operation::GetId { .. } => 5,
    }
}

/// Errors registering metrics (only a programming error: duplicate names).
#[derive(Debug, thiserror::Error)]
#[error("Cannot register metrics")]
pub struct Error(#[from] prometheus::Error);

/// All of the daemon's metric families.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    bytes: IntCounterVec,
    errors: IntCounterVec,
    latency: HistogramVec,
    size: IntGaugeVec,
    attached: IntGaugeVec,
    inflight: IntGaugeVec,
    iops_limit: IntGaugeVec,
    bandwidth_limit: IntGaugeVec,
    throttled: IntCounterVec,
    throttled_seconds: CounterVec,
    throttle_wait: HistogramVec,
    failed: IntGaugeVec,
    replication: ReplicationFamilies,
}

/// The states a relationship's `storaged_volume_replication_state` can be in.
pub const REPLICATION_STATES: [&str; 5] = [
    "initial_sync",
    "replicating",
    "disconnected",
    "resync",
    "split_brain",
];

/// A replicated volume's series, as the link updates them.
#[derive(Clone)]
struct ReplicationFamilies {
    role: IntGaugeVec,
    state: IntGaugeVec,
    consistent: IntGaugeVec,
    lag: GaugeVec,
    rpo_exceeded: IntGaugeVec,
    sync_suspended: IntGaugeVec,
    pending: IntGaugeVec,
    resync: IntGaugeVec,
    sent: IntCounterVec,
    received: IntCounterVec,
    reconnects: IntCounterVec,
    sync_suspensions: IntCounterVec,
}

/// What a replicated volume's gauges show.
pub struct ReplicationGauges<'a> {
    pub role: &'a str,
    pub state: &'a str,
    pub consistent: bool,
    pub lag_seconds: Option<f64>,
    pub rpo_exceeded: bool,
    /// A sync relationship running async (its secondary did not commit in time).
    pub sync_suspended: bool,
    /// Bytes the primary's log holds, not yet sent.
    pub pending_bytes: u64,
    /// Bytes the dirty map names: what a resync would send.
    pub resync_bytes: u64,
}

/// One volume's resolved series.
pub struct VolumeMetrics {
    pub requests: [IntCounter; 6],
    pub bytes: [IntCounter; 6],
    pub latency: [prometheus::Histogram; 6],
    /// Requests refused by validation (malformed, out of range, unsupported).
    pub invalid_requests: IntCounter,
    /// Requests that failed in the backing storage.
    pub io_errors: IntCounter,
    pub size: IntGauge,
    pub attached: IntGauge,
    pub inflight: IntGauge,
    /// Effective IOPS limit, 0 when unlimited.
    pub iops_limit: IntGauge,
    /// Effective bandwidth limit in bytes/s, 0 when unlimited.
    pub bandwidth_limit: IntGauge,
    /// Requests that had to wait for the volume's limits.
    pub throttled: IntCounter,
    /// Seconds requests spent waiting for the limits.
    pub throttled_seconds: Counter,
    pub throttle_wait: prometheus::Histogram,
    /// 1 while the volume is failed (a FLUSH failed; see [`crate::blk::failure`]).
    pub failed: IntGauge,
}

impl Metrics {
    pub fn new() -> Result<Self, Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "storaged_volume_requests_total",
                "Requests completed, by operation",
            ),
            &["volume", "op"],
        )?;
        let bytes = IntCounterVec::new(
            Opts::new(
                "storaged_volume_bytes_total",
                "Bytes transferred (read, write) or covered (discard, write_zeroes), by operation",
            ),
            &["volume", "op"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "storaged_volume_errors_total",
                "Requests answered with an error status, by kind (invalid_request, io)",
            ),
            &["volume", "kind"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "storaged_volume_request_duration_seconds",
                "Time from taking a request off the virtqueue to completing it",
            )
            .buckets(vec![
                0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01,
                0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            &["volume", "op"],
        )?;
        let size = IntGaugeVec::new(
            Opts::new("storaged_volume_size_bytes", "Volume capacity"),
            &["volume"],
        )?;
        let attached = IntGaugeVec::new(
            Opts::new(
                "storaged_volume_attached",
                "1 while a vhost-user frontend is connected",
            ),
            &["volume"],
        )?;
        let inflight = IntGaugeVec::new(
            Opts::new(
                "storaged_volume_inflight_requests",
                "Requests submitted to the backing storage and not yet completed",
            ),
            &["volume"],
        )?;
        let iops_limit = IntGaugeVec::new(
            Opts::new(
                "storaged_volume_iops_limit",
                "Effective IOPS limit of the volume (0: unlimited)",
            ),
            &["volume"],
        )?;
        let bandwidth_limit = IntGaugeVec::new(
            Opts::new(
                "storaged_volume_bandwidth_limit_bytes_per_second",
                "Effective bandwidth limit of the volume (0: unlimited)",
            ),
            &["volume"],
        )?;
        let throttled = IntCounterVec::new(
            Opts::new(
                "storaged_volume_throttled_requests_total",
                "Requests that waited for the volume's IOPS or bandwidth limit",
            ),
            &["volume"],
        )?;
        let throttled_seconds = CounterVec::new(
            Opts::new(
                "storaged_volume_throttle_wait_seconds_total",
                "Time requests spent waiting for the volume's limits",
            ),
            &["volume"],
        )?;
        let throttle_wait = HistogramVec::new(
            HistogramOpts::new(
                "storaged_volume_throttle_wait_seconds",
                "Time a request that had to wait for the volume's limits waited",
            )
            .buckets(vec![
                0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["volume"],
        )?;
        let failed = IntGaugeVec::new(
            Opts::new(
                "storaged_volume_failed",
                "1 when a failed FLUSH (fdatasync) failed the volume: FLUSH and writes are \
                 answered IOERR until an operator clears it",
            ),
            &["volume"],
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new(
                "storaged_build_info",
                "Always 1; the labels say which storaged this is",
            ),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels)
        };
        let counter =
            |name: &str, help: &str| IntCounterVec::new(Opts::new(name, help), &["volume"]);
        let replication = ReplicationFamilies {
            role: gauge(
                "storaged_volume_replication_role",
                "1 for the volume's side of its replication (primary, secondary)",
                &["volume", "role"],
            )?,
            state: gauge(
                "storaged_volume_replication_state",
                "1 for the relationship's state (initial_sync, replicating, disconnected, resync, split_brain)",
                &["volume", "state"],
            )?,
            consistent: gauge(
                "storaged_volume_replication_consistent",
                "1 while the secondary's image is a consistent point",
                &["volume"],
            )?,
            lag: GaugeVec::new(
                Opts::new(
                    "storaged_volume_replication_lag_seconds",
                    "How far the secondary's consistent point is behind the primary (NaN: not known)",
                ),
                &["volume"],
            )?,
            rpo_exceeded: gauge(
                "storaged_volume_replication_rpo_exceeded",
                "1 while the lag is beyond the relationship's rpo_seconds (or not known)",
                &["volume"],
            )?,
            sync_suspended: gauge(
                "storaged_volume_replication_sync_suspended",
                "1 while a sync relationship runs async: its secondary did not commit within the sync timeout",
                &["volume"],
            )?,
            pending: gauge(
                "storaged_volume_replication_pending_bytes",
                "Bytes of completed writes the primary holds for the link, not yet sent",
                &["volume"],
            )?,
            resync: gauge(
                "storaged_volume_replication_resync_bytes",
                "Bytes of the regions the dirty map names: what a resync sends",
                &["volume"],
            )?,
            sent: counter(
                "storaged_volume_replication_sent_bytes_total",
                "Bytes of frames sent on the volume's replication link",
            )?,
            received: counter(
                "storaged_volume_replication_received_bytes_total",
                "Bytes of frames received on the volume's replication link",
            )?,
            reconnects: counter(
                "storaged_volume_replication_reconnects_total",
                "Times the primary's link to its secondary was made again after a break",
            )?,
            sync_suspensions: counter(
                "storaged_volume_replication_sync_suspensions_total",
                "Times a sync relationship fell back to async: its secondary did not commit within the sync timeout",
            )?,
        };
        for c in [
            &requests,
            &bytes,
            &errors,
            &throttled,
            &replication.sent,
            &replication.received,
            &replication.reconnects,
            &replication.sync_suspensions,
        ] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(replication.lag.clone()))?;
        registry.register(Box::new(throttled_seconds.clone()))?;
        for h in [&latency, &throttle_wait] {
            registry.register(Box::new(h.clone()))?;
        }
        for g in [
            &size,
            &attached,
            &inflight,
            &iops_limit,
            &bandwidth_limit,
            &failed,
            &build_info,
            &replication.role,
            &replication.state,
            &replication.consistent,
            &replication.rpo_exceeded,
            &replication.sync_suspended,
            &replication.pending,
            &replication.resync,
        ] {
            registry.register(Box::new(g.clone()))?;
        }
        Ok(Metrics {
            registry,
            requests,
            bytes,
            errors,
            latency,
            size,
            attached,
            inflight,
            iops_limit,
            bandwidth_limit,
            throttled,
            throttled_seconds,
            throttle_wait,
            failed,
            replication,
        })
    }

    /// Sets a replicated volume's gauges.
    pub fn set_replication(&self, volume: &str, g: &ReplicationGauges<'_>) {
        let r = &self.replication;
        for role in ["primary", "secondary"] {
            r.role
                .with_label_values(&[volume, role])
                .set(i64::from(role == g.role));
        }
        for state in REPLICATION_STATES {
            r.state
                .with_label_values(&[volume, state])
                .set(i64::from(state == g.state));
        }
        r.consistent
            .with_label_values(&[volume])
            .set(i64::from(g.consistent));
        r.lag
            .with_label_values(&[volume])
            .set(g.lag_seconds.unwrap_or(f64::NAN));
        r.rpo_exceeded
            .with_label_values(&[volume])
            .set(i64::from(g.rpo_exceeded));
        r.sync_suspended
            .with_label_values(&[volume])
            .set(i64::from(g.sync_suspended));
        r.pending
            .with_label_values(&[volume])
            .set(g.pending_bytes as i64);
        r.resync
            .with_label_values(&[volume])
            .set(g.resync_bytes as i64);
    }

    /// Counts bytes sent and received on a volume's replication link.
    pub fn count_replication_bytes(&self, volume: &str, sent: u64, received: u64) {
        let r = &self.replication;
        r.sent.with_label_values(&[volume]).inc_by(sent);
        r.received.with_label_values(&[volume]).inc_by(received);
    }

    /// Counts a reconnection of a volume's replication link.
    pub fn count_replication_reconnect(&self, volume: &str) {
        self.replication
            .reconnects
            .with_label_values(&[volume])
            .inc();
    }

    /// Counts a sync relationship's fallback to async.
    pub fn count_sync_suspension(&self, volume: &str) {
        self.replication
            .sync_suspensions
            .with_label_values(&[volume])
            .inc();
    }

    /// Resolves (creating at zero) the series of one volume.
    pub fn volume(&self, name: &str) -> VolumeMetrics {
        let per_op = |v: &IntCounterVec| OPS.map(|op| v.with_label_values(&[name, op]));
        VolumeMetrics {
            requests: per_op(&self.requests),
            bytes: per_op(&self.bytes),
            latency: OPS.map(|op| self.latency.with_label_values(&[name, op])),
            invalid_requests: self.errors.with_label_values(&[name, "invalid_request"]),
            io_errors: self.errors.with_label_values(&[name, "io"]),
            size: self.size.with_label_values(&[name]),
            attached: self.attached.with_label_values(&[name]),
            inflight: self.inflight.with_label_values(&[name]),
            iops_limit: self.iops_limit.with_label_values(&[name]),
            bandwidth_limit: self.bandwidth_limit.with_label_values(&[name]),
            throttled: self.throttled.with_label_values(&[name]),
            throttled_seconds: self.throttled_seconds.with_label_values(&[name]),
            throttle_wait: self.throttle_wait.with_label_values(&[name]),
            failed: self.failed.with_label_values(&[name]),
        }
    }

    /// Removes every series of a deleted volume.
    pub fn remove_volume(&self, name: &str) {
        for op in OPS {
            let _ = self.requests.remove_label_values(&[name, op]);
            let _ = self.bytes.remove_label_values(&[name, op]);
            let _ = self.latency.remove_label_values(&[name, op]);
        }
        for kind in ["invalid_request", "io"] {
            let _ = self.errors.remove_label_values(&[name, kind]);
        }
        for g in [
            &self.size,
            &self.attached,
            &self.inflight,
            &self.iops_limit,
            &self.bandwidth_limit,
            &self.failed,
        ] {
            let _ = g.remove_label_values(&[name]);
        }
        self.remove_replication(name);
        let _ = self.throttled.remove_label_values(&[name]);
        let _ = self.throttled_seconds.remove_label_values(&[name]);
        let _ = self.throttle_wait.remove_label_values(&[name]);
    }

    /// Removes the replication series of a volume that is no longer replicated.
    pub fn remove_replication(&self, name: &str) {
        let r = &self.replication;
        for role in ["primary", "secondary"] {
            let _ = r.role.remove_label_values(&[name, role]);
        }
        for state in REPLICATION_STATES {
            let _ = r.state.remove_label_values(&[name, state]);
        }
        for g in [
            &r.consistent,
            &r.rpo_exceeded,
            &r.sync_suspended,
            &r.pending,
            &r.resync,
        ] {
            let _ = g.remove_label_values(&[name]);
        }
        let _ = r.lag.remove_label_values(&[name]);
        for c in [&r.sent, &r.received, &r.reconnects, &r.sync_suspensions] {
            let _ = c.remove_label_values(&[name]);
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let families = self.registry.gather();
        if TextEncoder::new().encode(&families, &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_series_appear_and_disappear() {
        let m = Metrics::new().unwrap();
        let v = m.volume("db1");
        v.requests[0].inc_by(3);
        v.bytes[0].inc_by(12288);
        let text = m.render();
        assert!(
            text.contains(r#"storaged_volume_requests_total{op="read",volume="db1"} 3"#),
            "{text}"
        );
        assert!(text.contains(r#"storaged_volume_bytes_total{op="read",volume="db1"} 12288"#));
        assert!(text.contains(&format!(
            "storaged_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
        v.throttle_wait.observe(0.01);
        v.throttled_seconds.inc_by(0.01);
        m.remove_volume("db1");
        assert!(!m.render().contains("db1"));
    }
}
