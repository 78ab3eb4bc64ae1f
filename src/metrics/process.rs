//! The standard `process_*` metrics, with `process_cpu_seconds_total` in fractions of a second.
//!
//! The prometheus crate's process collector keeps CPU time in an integer counter and divides the
//! kernel's clock ticks by `CLK_TCK` with an integer division, so it moves in whole seconds: a
//! sidecar using 5 % of a core shows a rate of 0 for most of a minute, then a jump. This wraps
//! that collector, drops its CPU family, and exports the same name from the same ticks in f64
//! (resolution 1/`CLK_TCK`, 10 ms on Linux).

use prometheus::core::{Collector, Desc};
use prometheus::process_collector::ProcessCollector;
use prometheus::{proto, Counter, Opts};

const CPU: &str = "process_cpu_seconds_total";

pub struct ProcessMetrics {
    inner: ProcessCollector,
    cpu: Counter,
}

impl ProcessMetrics {
    pub fn for_self() -> ProcessMetrics {
        // A fixed, valid name and help text: construction cannot fail.
        let cpu = Counter::with_opts(Opts::new(CPU, "Total user and system CPU time spent in seconds."))
            .expect("valid metric name");
        ProcessMetrics { inner: ProcessCollector::for_self(), cpu }
    }
}

/// User plus system CPU time of every thread of this process, in seconds.
fn cpu_seconds() -> Option<f64> {
    let stat = procfs::process::Process::myself().ok()?.stat().ok()?;
    Some((stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64)
}

impl Collector for ProcessMetrics {
    fn desc(&self) -> Vec<&Desc> {
        let mut descs: Vec<&Desc> = self.inner.desc().into_iter().filter(|d| d.fq_name != CPU).collect();
        descs.extend(self.cpu.desc());
        descs
    }

    fn collect(&self) -> Vec<proto::MetricFamily> {
        let mut families: Vec<_> = self.inner.collect().into_iter().filter(|f| f.name() != CPU).collect();
        if let Some(now) = cpu_seconds() {
            // Two scrapes at once may both add: only ever move forward.
            let delta = now - self.cpu.get();
            if delta > 0.0 {
                self.cpu.inc_by(delta);
            }
            families.extend(self.cpu.collect());
        }
        families
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_has_fractions_of_a_second() {
        // Burn CPU until the kernel has counted some, but well under a second of it.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while cpu_seconds().unwrap() < 0.05 && start.elapsed() < std::time::Duration::from_secs(5) {
            for i in 0..100_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
        }
        std::hint::black_box(x);
        let metrics = ProcessMetrics::for_self();
        let families = metrics.collect();
        let cpu = families.iter().find(|f| f.name() == CPU).expect("one CPU family");
        assert_eq!(families.iter().filter(|f| f.name() == CPU).count(), 1);
        let value = cpu.get_metric()[0].get_counter().get_value();
        assert!(value > 0.0 && value.fract() != 0.0, "process_cpu_seconds_total = {value}");
        assert!(families.iter().any(|f| f.name() == "process_resident_memory_bytes"));
    }
}
