//! Prometheus metrics, at `GET /metrics` (the admin's token: the series name tenants and
//! their VMs). The agent's own counters (launches, restarts, launch latency) live in one
//! registry for the daemon's life; the VMs by state and each running VM's counters, read
//! from its vmm's API, are gathered at each scrape.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use agent_api::Vm;
use vmm_api::Counters;

/// Errors registering or encoding metrics (only a programming error: duplicate names).
#[derive(Debug, thiserror::Error)]
#[error("Metrics")]
pub struct Error(#[from] prometheus::Error);

/// The VM states a scrape always names (0 where no VM is in it).
const STATES: [&str; 5] = ["running", "stopping", "stopped", "restarting", "failed"];

/// The agent's counters.
pub struct Metrics {
    registry: Registry,
    pub launches: IntCounter,
    pub restarts: IntCounter,
    /// From the launch of a vmm to its API answering.
    pub launch_seconds: Histogram,
    /// VM ends, by whether the policy counts them a failure.
    pub ends: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Metrics, Error> {
        let registry = Registry::new();
        let launches = IntCounter::new("agent_vm_launches_total", "vmm processes started")?;
        let restarts = IntCounter::new(
            "agent_vm_restarts_total",
            "vmm processes started again by a restart policy",
        )?;
        let launch_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "agent_vm_launch_seconds",
                "From a vmm's launch to its API answering",
            )
            .buckets(vec![
                0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
            ]),
        )?;
        let ends = IntCounterVec::new(
            Opts::new("agent_vm_ends_total", "vmm processes that ended"),
            &["failure"],
        )?;
        registry.register(Box::new(launches.clone()))?;
        registry.register(Box::new(restarts.clone()))?;
        registry.register(Box::new(launch_seconds.clone()))?;
        registry.register(Box::new(ends.clone()))?;
        Ok(Metrics {
            registry,
            launches,
            restarts,
            launch_seconds,
            ends,
        })
    }

    /// The scrape: the agent's counters, `vms` by state, and each running VM's counters.
    pub fn encode(&self, vms: &[Vm], counters: &[(&Vm, Counters)]) -> Result<String, Error> {
        let scrape = Registry::new();
        let by_state = IntGaugeVec::new(Opts::new("agent_vms", "VMs by state"), &["state"])?;
        for s in STATES {
            by_state.with_label_values(&[s]).set(0);
        }
        for vm in vms {
            by_state.with_label_values(&[vm.state.as_str()]).inc();
        }
        let exits = IntCounterVec::new(
            Opts::new(
                "agent_vm_vcpu_exits_total",
                "A running VM's vCPU exits, by kind",
            ),
            &["tenant", "vm", "kind"],
        )?;
        let disk = IntGaugeVec::new(
            Opts::new(
                "agent_vm_disk_completed_requests_mod_65536",
                "A running VM's disk requests completed (the used ring's index, which wraps at 65536)",
            ),
            &["tenant", "vm", "disk"],
        )?;
        for (vm, c) in counters {
            for (kind, n) in &c.vcpu_exits {
                exits
                    .with_label_values(&[&vm.tenant, &vm.id, kind.name()])
                    .inc_by(*n);
            }
            for (i, d) in c.disks.iter().enumerate() {
                if let Some(n) = d.completed_requests_mod_65536 {
                    disk.with_label_values(&[
                        &vm.tenant,
                        &vm.id,
                        &format!("vd{}", (b'a' + i as u8) as char),
                    ])
                    .set(i64::from(n));
                }
            }
        }
        scrape.register(Box::new(by_state))?;
        scrape.register(Box::new(exits))?;
        scrape.register(Box::new(disk))?;
        let mut families = self.registry.gather();
        families.extend(scrape.gather());
        let mut out = Vec::new();
        TextEncoder::new().encode(&families, &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}
