//! Watching processes: their logs, CPU time and memory, and the client addresses load
//! comes from. Shared by the integration tests (`tests/common`) and the benchmarks
//! (`examples/*-bench.rs`, as `#[path]` modules), so it uses nothing test-only.

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::process::Child;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Generous bound for anything that should take milliseconds: machines are shared.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The value of `key=value` in a log line (up to the next whitespace), parsed; `None` if
/// the line has no such field or its value does not parse.
pub fn log_field<T: std::str::FromStr>(line: &str, key: &str) -> Option<T> {
    let rest = line.split(&format!("{key}=")).nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

/// Lines a child wrote to stderr, collected by a thread, waitable.
#[derive(Clone, Default)]
pub struct Log(Arc<(Mutex<Vec<String>>, Condvar)>);

impl Log {
    /// Starts collecting `child`'s stderr (which must be piped).
    pub fn capture(child: &mut Child, tag: &'static str) -> Log {
        let log = Log::default();
        let stderr = child.stderr.take().expect("stderr is piped");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("TEST_VERBOSE").is_some() {
                    eprintln!("[{tag}] {line}");
                }
                let (lines, ready) = &*sink.0;
                lines.lock().unwrap().push(line);
                ready.notify_all();
            }
        });
        log
    }

    /// Waits for a line containing every one of `parts`; returns it.
    pub fn wait_for(&self, parts: &[&str]) -> String {
        self.wait_lines(parts, 1, PATIENCE)
            .unwrap_or_else(|err| panic!("{err}"))
    }

    /// Waits until `n` lines contain every one of `parts`.
    pub fn wait_count(&self, parts: &[&str], n: usize) {
        self.wait_lines(parts, n, PATIENCE)
            .unwrap_or_else(|err| panic!("{err}"));
    }

    /// Waits up to `patience` until `n` lines contain every one of `parts`; returns the
    /// first of them, or what the log holds.
    pub fn wait_lines(
        &self,
        parts: &[&str],
        n: usize,
        patience: Duration,
    ) -> Result<String, String> {
        let (lines, ready) = &*self.0;
        let deadline = Instant::now() + patience;
        let mut guard = lines.lock().unwrap();
        loop {
            let mut matching = guard.iter().filter(|l| parts.iter().all(|p| l.contains(p)));
            if let Some(first) = matching.next() {
                if 1 + matching.count() >= n {
                    return Ok(first.clone());
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "fewer than {n} log lines with {parts:?} within {patience:?}; log:\n{}",
                    guard.join("\n")
                ));
            }
            guard = ready.wait_timeout(guard, left).unwrap().0;
        }
    }

    /// How many lines so far contain every one of `parts`.
    pub fn count(&self, parts: &[&str]) -> usize {
        let lines = self.0 .0.lock().unwrap();
        lines
            .iter()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .count()
    }

    pub fn text(&self) -> String {
        self.0 .0.lock().unwrap().join("\n")
    }
}

/// The `n`-th distinct client source address: 127.1.0.1, 127.1.0.2, … (never 127.0.0.1).
pub fn client_ip(n: u32) -> Ipv4Addr {
    let n = n + 1;
    Ipv4Addr::new(127, 1 + (n >> 16) as u8, (n >> 8) as u8, n as u8)
}

/// CPU time (user + system) a process has used, from /proc/<pid>/stat; `None` once it is
/// gone.
pub fn cpu_time(pid: i32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line; `fields[0]` is field 3.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    Some(Duration::from_micros(ticks * 1_000_000 / hz as u64))
}

/// A `VmHWM`/`VmRSS`-style field of /proc/<pid>/status, in KiB; `None` once it is gone.
pub fn status_kib(pid: i32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix(field)?
            .trim_start_matches(':')
            .trim()
            .strip_suffix(" kB")?
            .parse()
            .ok()
    })
}
