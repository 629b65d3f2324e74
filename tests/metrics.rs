//! Metrics and health, as an operator and a balancer use them: `GET /metrics` agrees with
//! what the clients saw, a stopped worker shows as down with its clients waiting,
//! `/health` turns 503 when the last worker stops and while stopping, the listener
//! withstands bad and idle clients while hand-offs go on, Debian's `promtool` accepts the
//! exposition, and a real Prometheus server scrapes it.

mod common;
#[path = "node/support.rs"]
mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

const WORKERS: u32 = 3;

/// A dispatcher with metrics on an ephemeral port, and its workers.
struct Observed {
    alone: Alone,
    metrics: SocketAddr,
    workers: Vec<Running>,
}

impl Observed {
    fn start(test: &'static str, extra_env: &[(&str, &str)]) -> Observed {
        let mut env = vec![("STICKY_DISPATCH_METRICS_LISTEN", "127.0.0.1:0")];
        env.extend_from_slice(extra_env);
        let alone = Alone::start(test, WORKERS, &env);
        let line = alone
            .dispatcher
            .log
            .wait_for(&["serving /metrics", "address="]);
        let metrics =
            log_field(&line, "address").unwrap_or_else(|| panic!("no metrics address in {line:?}"));
        let workers = (0..WORKERS).map(|i| alone.start_worker(i)).collect();
        Observed {
            alone,
            metrics,
            workers,
        }
    }

    fn get(&self, path: &str) -> (u16, String) {
        http(
            self.metrics,
            &format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n"),
        )
        .unwrap_or_else(|err| panic!("GET {path}: {err}"))
    }

    /// Every sample of `/metrics` by its series, e.g. `sticky_dispatch_waiting{worker="1"}`.
    /// `sticky-dispatch status` of this dispatcher: its exit code and its table (printed).
    fn status(&self) -> (Option<i32>, String) {
        let status = Command::new(DISPATCHER)
            .args(["status", "--metrics", &self.metrics.to_string()])
            .output()
            .unwrap();
        let table = String::from_utf8_lossy(&status.stdout).into_owned();
        eprintln!("{table}");
        (status.status.code(), table)
    }

    fn samples(&self) -> BTreeMap<String, f64> {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200, "{body}");
        body.lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                Some((series.to_owned(), value.parse().ok()?))
            })
            .collect()
    }

    fn worker_sample(&self, name: &str, worker: u32) -> f64 {
        let series = format!("sticky_dispatch_{name}{{worker=\"{worker}\"}}");
        *self
            .samples()
            .get(&series)
            .unwrap_or_else(|| panic!("no {series}"))
    }

    /// Waits until `check` holds for the samples.
    fn wait_samples(&self, what: &str, check: impl Fn(&BTreeMap<String, f64>) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let samples = self.samples();
            if check(&samples) {
                return;
            }
            assert!(Instant::now() < deadline, "no {what}: {samples:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_health(&self, status: u16) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let (code, body) = self.get("/health");
            if code == status {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "/health stayed {code} {body:?}, not {status}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Sends `request` and reads the whole answer: status and body.
fn http(to: SocketAddr, request: &str) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect_timeout(&to, PATIENCE).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream
        .write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| e.to_string())?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("not HTTP: {answer:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status: {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// The fd-passing path (the dispatcher's): for the tests of what it counts there.
const USERSPACE: (&str, &str) = ("STICKY_DISPATCH_DISPATCH", "userspace");

#[test]
fn handed_off_counts_match_what_the_clients_saw() {
    let observed = Observed::start("metrics-counts", &[USERSPACE]);
    let clients: Vec<_> = (0..120).map(client_ip).collect();
    let load = Load::start(observed.alone.addr, &clients, 6, 100);
    let outcomes = load.join();
    let tally = Tally::of(&outcomes, |ip| expected_worker(ip, WORKERS));
    assert_eq!((tally.failed, tally.misrouted), (0, 0), "{tally}");
    let mut answered = BTreeMap::new();
    for outcome in &outcomes {
        *answered
            .entry(outcome.answer.as_ref().unwrap().worker)
            .or_insert(0.0) += 1.0;
    }
    // A worker acknowledges before it answers, so the counters are complete by now.
    let samples = observed.samples();
    let mut total = 0.0;
    for worker in 0..WORKERS {
        let counted = samples[&format!("sticky_dispatch_handed_off_total{{worker=\"{worker}\"}}")];
        let seen = answered.get(&worker).copied().unwrap_or(0.0);
        eprintln!("worker {worker}: handed_off_total {counted}, answers seen {seen}");
        assert_eq!(counted, seen, "worker {worker}");
        assert_eq!(
            samples[&format!("sticky_dispatch_worker_up{{worker=\"{worker}\"}}")],
            1.0
        );
        total += counted;
    }
    assert_eq!(total, tally.ok as f64);
    let accepted: f64 = samples
        .iter()
        .filter(|(series, _)| series.starts_with("sticky_dispatch_accepted_total{"))
        .map(|(_, value)| value)
        .sum();
    assert_eq!(accepted, tally.total as f64);
    assert_eq!(
        samples["sticky_dispatch_handoff_seconds_count"],
        tally.ok as f64
    );
    // The status table agrees.
    let (code, table) = observed.status();
    assert_eq!(code, Some(0), "{table}");
    assert!(
        table.starts_with("health: 200 ok: 3/3 workers up"),
        "{table}"
    );
    // Which path each listener takes is the first thing it says after health: here the
    // dispatcher's, as configured (not refused).
    let listener_line = table.lines().nth(1).unwrap_or_default();
    assert!(
        listener_line.starts_with("listener ") && listener_line.ends_with(": dispatcher path"),
        "{table}"
    );
}

#[test]
fn a_stopped_worker_shows_down_with_its_clients_waiting_and_health_follows() {
    let mut observed = Observed::start(
        "metrics-down",
        &[("STICKY_DISPATCH_SHUTDOWN_TIMEOUT", "3s"), USERSPACE],
    );
    assert!(observed.wait_health(200).starts_with("ok: 3/3"));

    // Worker 1 stops: down, and its clients wait for it.
    let mut stopped = observed.workers.remove(1);
    stopped.terminate();
    observed.wait_samples("worker 1 down", |s| {
        s["sticky_dispatch_worker_up{worker=\"1\"}"] == 0.0
    });
    let waiting_clients = clients_of(1, WORKERS, 5);
    let addr = observed.alone.addr;
    let waiters =
        std::thread::spawn(move || parallel(&waiting_clients, 5, |ip| request(*ip, addr)));
    observed.wait_samples("5 waiting for worker 1", |s| {
        s["sticky_dispatch_waiting{worker=\"1\"}"] == 5.0
    });
    let (code, table) = observed.status();
    assert_eq!(code, Some(1), "a worker is down: {table}");
    assert!(table.contains("     1  DOWN"), "{table}");
    assert!(observed.wait_health(200).starts_with("ok: 2/3"));

    // The waiting clients are served once it is back.
    observed.workers.insert(1, observed.alone.start_worker(1));
    for answer in waiters.join().unwrap() {
        assert_eq!(answer.unwrap().worker, 1);
    }
    assert_eq!(observed.worker_sample("waiting", 1), 0.0);

    // Every worker stops: unhealthy.
    for worker in observed.workers.drain(..) {
        drop(worker);
    }
    let body = observed.wait_health(503);
    assert_eq!(body.trim(), "0/3 workers up, health_min_workers 1");

    // While stopping (a client still waits, so the stop lingers up to shutdown_timeout).
    let addr = observed.alone.addr;
    let waiter = clients_of(0, WORKERS, 1)[0];
    let _waiter = std::thread::spawn(move || request(waiter, addr));
    observed.wait_samples("a client waiting for worker 0", |s| {
        s["sticky_dispatch_waiting{worker=\"0\"}"] == 1.0
    });
    observed.alone.dispatcher.signal(Signal::SIGTERM);
    let body = observed.wait_health(503);
    let stopping = (0..200)
        .map(|_| observed.get("/health").1)
        .find(|body| body.trim() == "stopping");
    assert!(
        stopping.is_some(),
        "/health never said stopping (last {body:?})"
    );
}

/// The kernel's path: each worker's count is what it reports accepting on its lane; a
/// stopped worker's clients queue on its lane, and the lane's queue shows them.
#[test]
fn kernel_path_counts_and_lane_queues_match_what_the_clients_saw() {
    let mut observed = Observed::start("metrics-kernel", &[]);
    let samples = observed.samples();
    assert_eq!(
        samples
            .iter()
            .filter(
                |(series, value)| series.starts_with("sticky_dispatch_listener_path{")
                    && series.contains("path=\"kernel\"")
                    && **value == 1.0
            )
            .count(),
        1,
        "{samples:?}"
    );
    assert_eq!(
        samples
            .iter()
            .filter(
                |(series, value)| series.starts_with("sticky_dispatch_kernel_path_refused{")
                    && **value == 0.0
            )
            .count(),
        1,
        "{samples:?}"
    );
    let clients: Vec<_> = (0..120).map(client_ip).collect();
    let outcomes = Load::start(observed.alone.addr, &clients, 6, 100).join();
    let tally = Tally::of(&outcomes, |ip| expected_worker(ip, WORKERS));
    assert_eq!((tally.failed, tally.misrouted), (0, 0), "{tally}");
    let mut answered = BTreeMap::new();
    for outcome in &outcomes {
        *answered
            .entry(outcome.answer.as_ref().unwrap().worker)
            .or_insert(0.0) += 1.0;
    }
    // Workers report at most once a second.
    observed.wait_samples("every worker's lane count", |s| {
        (0..WORKERS).all(|worker| {
            s[&format!("sticky_dispatch_kernel_routed_total{{worker=\"{worker}\"}}")]
                == answered.get(&worker).copied().unwrap_or(0.0)
        })
    });
    for worker in 0..WORKERS {
        eprintln!(
            "worker {worker}: kernel_routed_total {}, handed_off_total {}, answers seen {:?}",
            observed.worker_sample("kernel_routed_total", worker),
            observed.worker_sample("handed_off_total", worker),
            answered.get(&worker)
        );
        assert_eq!(observed.worker_sample("handed_off_total", worker), 0.0);
    }

    let mut stopped = observed.workers.remove(1);
    stopped.terminate();
    observed.wait_samples("worker 1 down", |s| {
        s["sticky_dispatch_worker_up{worker=\"1\"}"] == 0.0
    });
    let waiting_clients = clients_of(1, WORKERS, 5);
    let addr = observed.alone.addr;
    let waiters =
        std::thread::spawn(move || parallel(&waiting_clients, 5, |ip| request(*ip, addr)));
    observed.wait_samples("5 queued on worker 1's lane", |s| {
        s.iter()
            .filter(|(series, _)| {
                series.starts_with("sticky_dispatch_lane_queued{") && series.contains("lane=\"1\"")
            })
            .map(|(_, value)| value)
            .sum::<f64>()
            == 5.0
    });
    // `status` says the same: the path, the lanes, what waits in them.
    let (_, table) = observed.status();
    assert!(
        table.contains(&format!(
            ": kernel path, {WORKERS} lanes, 5 queued, 0 dropped"
        )),
        "{table}"
    );
    assert!(table.contains("     1  DOWN"), "{table}");
    observed.workers.insert(1, observed.alone.start_worker(1));
    for answer in waiters.join().unwrap() {
        assert_eq!(answer.unwrap().worker, 1);
    }
}

#[test]
fn bad_and_idle_clients_of_the_metrics_listener_do_not_disturb_hand_offs() {
    let observed = Observed::start("metrics-abuse", &[]);
    let clients: Vec<_> = (0..60).map(client_ip).collect();
    let load = Load::start(observed.alone.addr, &clients, 4, 100_000);
    load.wait_more(100);

    // Garbage: a 400, not a hang.
    let (status, _) = http(observed.metrics, "\x16\x03\x01 not http at all\r\n\r\n").unwrap();
    assert_eq!(status, 400);
    // A 1 MB header: refused with 431 (or the connection is cut before it all arrives).
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    match http(observed.metrics, &huge) {
        Ok((status, _)) => assert_eq!(status, 431),
        Err(err) => eprintln!("1 MB header: connection cut ({err})"),
    }
    // Unknown path and method.
    assert_eq!(observed.get("/nope").0, 404);
    assert_eq!(
        http(
            observed.metrics,
            "POST /metrics HTTP/1.1\r\nHost: t\r\ncontent-length: 0\r\n\r\n"
        )
        .unwrap()
        .0,
        405
    );

    // 1,000 idle connections and a slowloris that never finishes its head.
    let started = Instant::now();
    let mut slow = TcpStream::connect(observed.metrics).unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
        .unwrap();
    let idle: Vec<TcpStream> = (0..1000)
        .filter_map(|_| TcpStream::connect(observed.metrics).ok())
        .collect();
    eprintln!("{} idle connections open", idle.len());
    // The ones beyond the limit get a clear 503 and are closed at once; the ones it took
    // are closed by the head timeout. None stays open.
    let mut held = Vec::new();
    let mut refused = 0;
    for mut stream in idle {
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        if answer.starts_with("HTTP/1.1 503") && answer.contains("too many connections") {
            refused += 1;
        } else {
            held.push(stream);
        }
    }
    let held_count = held.len();
    let closed = held
        .into_iter()
        .filter(|mut stream| {
            stream.set_read_timeout(Some(PATIENCE)).unwrap();
            let mut rest = Vec::new();
            // EOF or a reset: closed by the server, not by our timeout.
            match stream.read_to_end(&mut rest) {
                Ok(_) => true,
                Err(err) => {
                    err.kind() != std::io::ErrorKind::WouldBlock
                        && err.kind() != std::io::ErrorKind::TimedOut
                }
            }
        })
        .count();
    eprintln!(
        "idle connections: {refused} refused with 503 too many connections, {held_count} taken \
         and then closed by the head timeout: {closed}"
    );
    assert_eq!(closed, held_count, "idle connections left open");
    assert!(refused >= 1000 - 100, "{refused} refused");
    // The slowloris is cut off by the head timeout.
    slow.set_read_timeout(Some(PATIENCE)).unwrap();
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
    let cut_after = started.elapsed();
    eprintln!("slowloris closed after {cut_after:.1?}");
    assert!(cut_after < Duration::from_secs(15), "{cut_after:?}");
    // And the listener serves again.
    observed.wait_health(200);

    load.wait_more(100);
    let tally = Tally::of(&load.stop(), |ip| expected_worker(ip, WORKERS));
    eprintln!("hand-offs meanwhile: {tally}");
    assert_eq!((tally.failed, tally.misrouted), (0, 0), "{tally}");
}

/// The connections served, on both paths, as a PromQL expression.
const SERVED: &str =
    "sum(sticky_dispatch_kernel_routed_total) + sum(sticky_dispatch_handed_off_total)";

#[test]
#[ignore = "needs root (apt-get install prometheus) or prometheus installed"]
fn promtool_accepts_the_exposition_and_prometheus_scrapes_it() {
    let promtool =
        support::debian_program("promtool", "prometheus").unwrap_or_else(|e| panic!("{e}"));
    let prometheus =
        support::debian_program("prometheus", "prometheus").unwrap_or_else(|e| panic!("{e}"));
    let observed = Observed::start("metrics-prometheus", &[]);
    let clients: Vec<_> = (0..30).map(client_ip).collect();
    let tally = Tally::of(
        &Load::start(observed.alone.addr, &clients, 3, 10).join(),
        |ip| expected_worker(ip, WORKERS),
    );
    assert_eq!(tally.failed, 0, "{tally}");

    // promtool check metrics, on what /metrics serves.
    let (_, exposition) = observed.get("/metrics");
    let mut check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let checked = check.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    eprintln!(
        "promtool check metrics: {:?} {said:?}",
        checked.status.code()
    );
    assert!(checked.status.success() && said.trim().is_empty(), "{said}");

    // The shipped alert rules check too.
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/prometheus/alerts.yml");
    let out = Command::new(&promtool)
        .args(["check", "rules", rules])
        .output()
        .unwrap();
    eprintln!(
        "promtool check rules: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A real Prometheus scrapes it every 200 ms; asked through its HTTP API.
    let dir = scratch_dir("metrics-prometheus");
    let web = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 200ms\n  scrape_timeout: 150ms\n\
             scrape_configs:\n  - job_name: sticky-dispatch\n    static_configs:\n      \
             - targets: ['{}']\nrule_files: ['{rules}']\n",
            observed.metrics
        ),
    )
    .unwrap();
    let mut command = Command::new(&prometheus);
    command
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"));
    let _server = Running::spawn(command, "prometheus");
    let query = |expr: &str| -> String {
        let path = format!(
            "/api/v1/query?query={}",
            expr.replace('"', "%22")
                .replace('{', "%7B")
                .replace('}', "%7D")
                .replace('+', "%2B")
                .replace(' ', "%20")
        );
        http(
            web,
            &format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"),
        )
        .map(|(_, body)| body)
        .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let answer = loop {
        // Every connection, on either path: the kernel's (as the workers report them, at
        // most once a second) and the dispatcher's.
        let answer = query(SERVED);
        if answer.contains(&format!("\"{}\"]", tally.ok)) {
            break answer;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never had the count: {answer}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("Prometheus: {SERVED} = {answer}");
    let up = query("up");
    assert!(up.contains("\"1\"]"), "scrape target not up: {up}");
    let workers = query("sum(sticky_dispatch_worker_up)");
    assert!(workers.contains("\"3\"]"), "{workers}");
}

#[test]
fn the_dashboard_and_the_alert_rules_use_only_exported_metrics() {
    let observed = Observed::start("metrics-names", &[]);
    let (_, exposition) = observed.get("/metrics");
    // Families, and the series a histogram adds.
    let mut exported: Vec<String> = exposition
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    let histograms: Vec<String> = exported.clone();
    for family in histograms {
        for suffix in ["_bucket", "_sum", "_count"] {
            exported.push(format!("{family}{suffix}"));
        }
    }
    let used = |text: &str| -> Vec<String> {
        let mut names = Vec::new();
        let mut rest = text;
        while let Some(at) = rest.find("sticky_dispatch_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            names.push(name);
        }
        names
    };
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/docs/grafana/sticky-dispatch.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| panel["targets"].as_array().unwrap().clone())
        .map(|target| target["expr"].as_str().unwrap().to_owned())
        .collect();
    let rules = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/prometheus/alerts.yml"
    ))
    .unwrap();
    let mut seen = Vec::new();
    for name in exprs.iter().flat_map(|e| used(e)).chain(used(&rules)) {
        assert!(
            exported.contains(&name),
            "{name} is used by the dashboard or the alerts but not exported"
        );
        seen.push(name);
    }
    seen.sort();
    seen.dedup();
    eprintln!(
        "dashboard and alerts use {} exported series: {seen:?}",
        seen.len()
    );
    // The contract names are exported.
    for name in [
        "sticky_dispatch_handed_off_total",
        "sticky_dispatch_worker_up",
        "sticky_dispatch_waiting",
        "sticky_dispatch_in_flight",
    ] {
        assert!(exported.iter().any(|e| e == name), "{name} not exported");
    }
}
