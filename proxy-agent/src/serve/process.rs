//! The `process_*` metric family, as Prometheus' client libraries export it
//! (and kube-proxy with them): CPU time, memory, file descriptors, read
//! from `/proc/self`.
use std::path::Path;

/// One sample of the family: name, help, kind, value.
pub type ProcessSample = (&'static str, &'static str, &'static str, f64);

/// The process's samples now; a file that cannot be read leaves its
/// samples out.
pub fn samples() -> Vec<ProcessSample> {
    samples_from(Path::new("/proc/self"))
}

fn samples_from(proc_self: &Path) -> Vec<ProcessSample> {
    let mut out = Vec::new();
    if let Some(stat) = std::fs::read_to_string(proc_self.join("stat"))
        .ok()
        .and_then(|text| Stat::parse(&text))
    {
        // SAFETY: sysconf only reads a configuration value.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        // SAFETY: as above.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if ticks > 0 {
            out.push((
                "process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds.",
                "counter",
                (stat.utime + stat.stime) as f64 / ticks as f64,
            ));
        }
        out.push((
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            "gauge",
            stat.vsize as f64,
        ));
        if page > 0 {
            out.push((
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                "gauge",
                (stat.rss_pages * page as u64) as f64,
            ));
        }
    }
    if let Ok(fds) = std::fs::read_dir(proc_self.join("fd")) {
        out.push((
            "process_open_fds",
            "Number of open file descriptors.",
            "gauge",
            fds.count() as f64,
        ));
    }
    if let Ok(limits) = std::fs::read_to_string(proc_self.join("limits")) {
        if let Some(max) = soft_limit(&limits, "Max open files") {
            out.push((
                "process_max_fds",
                "Maximum number of open file descriptors.",
                "gauge",
                max,
            ));
        }
        if let Some(max) = soft_limit(&limits, "Max address space") {
            out.push((
                "process_virtual_memory_max_bytes",
                "Maximum amount of virtual memory available in bytes.",
                "gauge",
                max,
            ));
        }
    }
    out
}

/// The fields of `/proc/self/stat` the family needs.
#[derive(Debug, PartialEq, Eq)]
struct Stat {
    utime: u64,
    stime: u64,
    vsize: u64,
    rss_pages: u64,
}

impl Stat {
    /// Fields 14, 15, 23 and 24 (proc(5)), counted after the command name,
    /// which may hold spaces and parentheses: it ends at the last `)`.
    fn parse(text: &str) -> Option<Stat> {
        let rest = &text[text.rfind(')')? + 1..];
        // `rest` starts with field 3 (state).
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        Some(Stat {
            utime: field(14)?,
            stime: field(15)?,
            vsize: field(23)?,
            rss_pages: field(24)?,
        })
    }
}

/// The soft limit of `name` in `/proc/self/limits`; "unlimited" as -1, as
/// the Go client reports it.
fn soft_limit(limits: &str, name: &str) -> Option<f64> {
    let line = limits.lines().find(|l| l.starts_with(name))?;
    let soft = line[name.len()..].split_whitespace().next()?;
    if soft == "unlimited" {
        return Some(-1.0);
    }
    soft.parse::<f64>().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_last_parenthesis() {
        let text = "1234 (proxy (agent) x) S 1 1234 1234 0 -1 4194560 100 0 0 0 \
                    250 75 0 0 20 0 4 0 500 123456789 4096 18446744073709551615 0 0 0\n";
        assert_eq!(
            Stat::parse(text),
            Some(Stat {
                utime: 250,
                stime: 75,
                vsize: 123_456_789,
                rss_pages: 4096
            })
        );
        assert_eq!(Stat::parse("garbage"), None);
        assert_eq!(Stat::parse("1 (x) S 1 2"), None);
    }

    #[test]
    fn limits_are_read_soft_and_unlimited_is_minus_one() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max open files            1048576              1048576              files     \n\
                      Max address space         unlimited            unlimited            bytes     \n";
        assert_eq!(soft_limit(limits, "Max open files"), Some(1_048_576.0));
        assert_eq!(soft_limit(limits, "Max address space"), Some(-1.0));
        assert_eq!(soft_limit(limits, "Max processes"), None);
    }

    /// This process's own family: every sample there, and sane.
    #[test]
    fn this_process_has_the_whole_family() {
        let samples = samples();
        let value = |name: &str| {
            samples
                .iter()
                .find(|s| s.0 == name)
                .map(|s| s.3)
                .unwrap_or_else(|| panic!("{name} missing: {samples:?}"))
        };
        assert!(value("process_resident_memory_bytes") > 1_000_000.0);
        assert!(value("process_virtual_memory_bytes") >= value("process_resident_memory_bytes"));
        assert!(value("process_open_fds") >= 3.0);
        assert!(value("process_max_fds") >= value("process_open_fds"));
        assert!(value("process_cpu_seconds_total") >= 0.0);
        value("process_virtual_memory_max_bytes");
    }
}
