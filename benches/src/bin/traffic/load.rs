//! The traffic itself: a light TCP server, a closed-loop generator of short
//! connections, iperf3 for one stream and small UDP packets, and the
//! machine's CPU time from `/proc/stat`.
use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use proxy_tests::netns::{ChildGuard, exec_in, in_netns, spawn_in};

/// The first port of [`ConnServer`]s in the backend pods. Each phase of a
/// run serves on a port of its own, so that the TIME_WAIT sockets one phase
/// leaves in the servers cannot clash with the next phase's connections.
pub const CONN_PORT_BASE: u16 = 9000;
/// The port of the iperf3 server in the first backend pod.
pub const IPERF_PORT: u16 = 5201;
/// A connect that takes this long has waited for a SYN retransmission.
pub const STALL: Duration = Duration::from_millis(900);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Answers every TCP connection with one short line and closes it first,
/// as an HTTP server without keep-alive does (the TIME_WAIT is the
/// server's, as with `ab` against nginx). Accept threads share one
/// listener; the server stops when dropped.
pub struct ConnServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    listener: TcpListener,
}

impl ConnServer {
    pub fn start(ns: &str, port: u16, threads: usize) -> Result<Self> {
        let bind = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
        let listener = in_netns(ns, || TcpListener::bind(bind))?
            .with_context(|| format!("binding {bind} in {ns}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        for _ in 0..threads.max(1) {
            let listener = listener.try_clone().context("sharing the listener")?;
            let stop = stop.clone();
            handles.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((mut stream, _)) = listener.accept() {
                        let _ = stream.write_all(b"ok\n");
                    }
                }
            }));
        }
        Ok(ConnServer {
            stop,
            threads: handles,
            listener,
        })
    }
}

impl Drop for ConnServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Shutting a listener down wakes every accept() blocked on it (the
        // namespace may be gone already, so no connection could).
        let _ = socket2::SockRef::from(&self.listener).shutdown(std::net::Shutdown::Both);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// What a run of short connections measured.
#[derive(Clone, Debug, Default)]
pub struct ConnRun {
    pub completed: u64,
    pub failed: u64,
    /// Connects that took [`STALL`] or longer.
    pub stalls: u64,
    pub elapsed: Duration,
    /// Connect latencies of the completed connections, sorted.
    pub connect: Vec<Duration>,
    pub cpu: CpuTime,
}

impl ConnRun {
    pub fn rate(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn percentile(&self, p: f64) -> Duration {
        if self.connect.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * self.connect.len() as f64).ceil() as usize;
        self.connect[rank.clamp(1, self.connect.len()) - 1]
    }

    pub fn max(&self) -> Duration {
        self.connect.last().copied().unwrap_or_default()
    }

    /// Busy CPU time of the whole machine per completed connection.
    pub fn cpu_per_conn(&self) -> (Duration, Duration) {
        let n = self.completed.max(1) as u32;
        (self.cpu.busy / n, self.cpu.softirq / n)
    }
}

/// `parallel` clients in namespace `ns`, each opening a connection to
/// `target`, reading the answer to the end and closing, again and again
/// for `duration`.
pub fn connections(
    ns: &str,
    target: SocketAddr,
    parallel: usize,
    duration: Duration,
) -> Result<ConnRun> {
    let before = CpuTime::read()?;
    let started = Instant::now();
    let runs = in_netns(ns, || {
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..parallel.max(1))
                .map(|_| scope.spawn(|| connect_loop(target, started + duration)))
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().unwrap_or_default())
                .collect::<Vec<ConnRun>>()
        })
    })?;
    let elapsed = started.elapsed();
    let cpu = CpuTime::read()?.since(&before);
    let mut total = ConnRun {
        elapsed,
        cpu,
        ..ConnRun::default()
    };
    for run in runs {
        total.completed += run.completed;
        total.failed += run.failed;
        total.stalls += run.stalls;
        total.connect.extend(run.connect);
    }
    total.connect.sort_unstable();
    Ok(total)
}

fn connect_loop(target: SocketAddr, deadline: Instant) -> ConnRun {
    let mut run = ConnRun::default();
    let mut buf = [0u8; 64];
    while Instant::now() < deadline {
        let t0 = Instant::now();
        let Ok(mut stream) = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) else {
            run.failed += 1;
            if t0.elapsed() >= STALL {
                run.stalls += 1;
            }
            continue;
        };
        let took = t0.elapsed();
        if took >= STALL {
            run.stalls += 1;
        }
        let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
        let answered = loop {
            match stream.read(&mut buf) {
                Ok(0) => break true,
                Ok(_) => continue,
                Err(_) => break false,
            }
        };
        if answered {
            run.completed += 1;
            run.connect.push(took);
        } else {
            run.failed += 1;
        }
    }
    run
}

/// An iperf3 server in `ns` on [`IPERF_PORT`], stopped when dropped.
pub fn iperf_server(ns: &str) -> Result<ChildGuard> {
    spawn_in(ns, "iperf3", &["-s", "-p", &IPERF_PORT.to_string()])
}

/// One TCP stream from `ns` to `target` for `seconds`: bits per second
/// received.
pub fn stream(ns: &str, target: SocketAddr, seconds: u32) -> Result<f64> {
    let out = iperf(ns, target, seconds, &[])?;
    number(&out, &["end", "sum_received", "bits_per_second"])
}

/// 64-byte UDP packets from `ns` to `target` as fast as iperf3 sends them
/// for `seconds`: packets per second received.
pub fn udp(ns: &str, target: SocketAddr, seconds: u32) -> Result<f64> {
    let out = iperf(ns, target, seconds, &["-u", "-l", "64", "-b", "0"])?;
    let packets = number(&out, &["end", "sum_received", "packets"])?;
    let lost = number(&out, &["end", "sum_received", "lost_packets"])?;
    let secs = number(&out, &["end", "sum_received", "seconds"])?;
    Ok((packets - lost).max(0.0) / secs.max(1e-9))
}

fn iperf(ns: &str, target: SocketAddr, seconds: u32, extra: &[&str]) -> Result<serde_json::Value> {
    // A test that cannot finish (a path that loses the control connection)
    // must not hang the run.
    let mut args = vec![
        "-k".to_string(),
        "3".to_string(),
        format!("{}", seconds + 10),
        "iperf3".to_string(),
        "-c".to_string(),
        target.ip().to_string(),
        "-p".to_string(),
        target.port().to_string(),
        "-t".to_string(),
        seconds.to_string(),
        "-J".to_string(),
        // The control connection must not wait forever on a broken path.
        "--connect-timeout".to_string(),
        "3000".to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    // iperf3 refuses a test while the previous one is still closing down.
    let mut last = None;
    for _ in 0..5 {
        match exec_in(ns, "timeout", &args) {
            Ok(stdout) => {
                let value: serde_json::Value =
                    serde_json::from_str(&stdout).context("parsing iperf3 -J output")?;
                if let Some(error) = value.get("error") {
                    bail!("iperf3 to {target}: {error}");
                }
                return Ok(value);
            }
            Err(e) => {
                eprintln!("iperf3 to {target} from {ns}: {e:#}");
                last = Some(e);
                std::thread::sleep(Duration::from_millis(300));
            }
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("iperf3 did not run")))
}

fn number(value: &serde_json::Value, path: &[&str]) -> Result<f64> {
    let mut at = value;
    for key in path {
        at = at
            .get(key)
            .with_context(|| format!("iperf3 output has no {}", path.join(".")))?;
    }
    at.as_f64()
        .with_context(|| format!("iperf3 output: {} is not a number", path.join(".")))
}

/// The machine's CPU time from `/proc/stat` (every CPU, every namespace:
/// the client, the node's translation and the server all run here).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTime {
    /// Everything but idle and iowait.
    pub busy: Duration,
    pub softirq: Duration,
}

impl CpuTime {
    pub fn read() -> Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let line = stat
            .lines()
            .find(|l| l.starts_with("cpu "))
            .context("/proc/stat has no cpu line")?;
        let ticks: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|t| t.parse().ok())
            .collect();
        if ticks.len() < 7 {
            bail!("/proc/stat cpu line too short: {line}");
        }
        // user nice system idle iowait irq softirq steal ...
        let total: u64 = ticks.iter().take(8).sum();
        let busy = total - ticks[3] - ticks[4];
        let time = |ticks: u64| Duration::from_micros(ticks * 1_000_000 / USER_HZ);
        Ok(CpuTime {
            busy: time(busy),
            softirq: time(ticks[6]),
        })
    }

    pub fn since(&self, before: &CpuTime) -> CpuTime {
        CpuTime {
            busy: self.busy.saturating_sub(before.busy),
            softirq: self.softirq.saturating_sub(before.softirq),
        }
    }
}

/// The unit of `/proc/stat`: 100 on every Linux architecture this runs on.
const USER_HZ: u64 = 100;
