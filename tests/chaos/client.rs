//! Clients of the chaos suite: one HTTP request per connection, routed by the peer
//! address, a PROXY v1 header or an X-Forwarded-For header, with every connection's
//! start and end recorded, so that a failure can be attributed to the fault that was
//! happening while it was open.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{parse_answer, Answer};

/// What the dispatcher routes a client by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The TCP source address.
    Peer,
    /// A PROXY v1 header naming the client.
    Proxy,
    /// An X-Forwarded-For header naming the client.
    Xff,
}

/// One client: the address the dispatcher should route it by (`key`) and the TCP source
/// address it connects from.
#[derive(Debug, Clone, Copy)]
pub struct Client {
    pub key: Ipv4Addr,
    pub source: Ipv4Addr,
}

/// How one connection went.
#[derive(Debug, Clone)]
pub struct Record {
    pub client: Client,
    pub started: Instant,
    pub ended: Instant,
    /// The TCP handshake completed.
    pub connected: bool,
    pub answer: Result<Answer, String>,
}

/// The request bytes for `client` in `mode`, split where a slow client pauses (after the
/// first bytes of its key), if `split`.
fn request_bytes(mode: Mode, client: Client, stream: &TcpStream, to: SocketAddr) -> Vec<u8> {
    let get = "GET / HTTP/1.1\r\nHost: chaos\r\nConnection: close\r\n";
    match mode {
        Mode::Peer => format!("{get}\r\n").into_bytes(),
        Mode::Xff => format!("{get}X-Forwarded-For: {}\r\n\r\n", client.key).into_bytes(),
        Mode::Proxy => {
            let port = stream.local_addr().map(|a| a.port()).unwrap_or(40000);
            format!(
                "PROXY TCP4 {} {} {port} {}\r\n{get}\r\n",
                client.key,
                to.ip(),
                to.port()
            )
            .into_bytes()
        }
    }
}

/// One request. With `pause`, the client sends the first 11 bytes (`PROXY TCP4 `, or the
/// start of the request line), then waits `pause` (while `paused` is told), then the rest:
/// a client still sending its key.
pub fn exchange(
    mode: Mode,
    client: Client,
    to: SocketAddr,
    reply_timeout: Duration,
    pause: Option<(Duration, &AtomicUsize)>,
) -> Record {
    let started = Instant::now();
    let mut connected = false;
    let answer = (|| {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .map_err(|e| e.to_string())?;
        let source = SocketAddr::new(IpAddr::V4(client.source), 0);
        socket
            .bind(&source.into())
            .map_err(|e| format!("bind {source}: {e}"))?;
        socket
            .connect_timeout(&to.into(), reply_timeout)
            .map_err(|e| format!("connect: {}", e.kind()))?;
        connected = true;
        let mut stream: TcpStream = socket.into();
        stream
            .set_read_timeout(Some(reply_timeout))
            .map_err(|e| e.to_string())?;
        let bytes = request_bytes(mode, client, &stream, to);
        match pause {
            Some((pause, paused)) => {
                stream
                    .write_all(&bytes[..11])
                    .map_err(|e| format!("write: {}", e.kind()))?;
                paused.fetch_add(1, Ordering::SeqCst);
                // The client's own slowness, not a wait for anything.
                std::thread::sleep(pause);
                stream
                    .write_all(&bytes[11..])
                    .map_err(|e| format!("write: {}", e.kind()))?;
            }
            None => stream
                .write_all(&bytes)
                .map_err(|e| format!("write: {}", e.kind()))?,
        }
        let mut body = Vec::new();
        stream
            .read_to_end(&mut body)
            .map_err(|e| format!("read: {}", e.kind()))?;
        let body = String::from_utf8_lossy(&body).into_owned();
        if body.is_empty() {
            return Err("closed without an answer".to_owned());
        }
        parse_answer(&body).ok_or_else(|| format!("no answer (got {body:?})"))
    })();
    Record {
        client,
        started,
        ended: Instant::now(),
        connected,
        answer,
    }
}

/// Runs first in every client thread (e.g. entering the container's network namespace).
pub type Setup = Arc<dyn Fn() + Send + Sync>;

/// Connections until stopped: a thread per group of clients, each cycling through its
/// group, one connection at a time. Bounded by `max_time` and `max_each` per thread.
pub struct Load {
    stop: Arc<AtomicBool>,
    records: Arc<Mutex<Vec<Record>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

pub struct Plan {
    pub mode: Mode,
    pub to: SocketAddr,
    pub reply_timeout: Duration,
    pub max_time: Duration,
    pub max_each: usize,
    pub setup: Option<Setup>,
}

impl Plan {
    /// A thread per group, cycling.
    pub fn start(&self, groups: Vec<Vec<Client>>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let records: Arc<Mutex<Vec<Record>>> = Arc::default();
        let begun = Instant::now();
        let threads = groups
            .into_iter()
            .filter(|group| !group.is_empty())
            .map(|group| {
                let (stop, records, setup) = (stop.clone(), records.clone(), self.setup.clone());
                let (mode, to, reply_timeout, max_time, max_each) = (
                    self.mode,
                    self.to,
                    self.reply_timeout,
                    self.max_time,
                    self.max_each,
                );
                std::thread::spawn(move || {
                    if let Some(setup) = setup {
                        setup();
                    }
                    for client in group.iter().cycle().take(max_each) {
                        if stop.load(Ordering::Relaxed) || begun.elapsed() > max_time {
                            break;
                        }
                        let record = exchange(mode, *client, to, reply_timeout, None);
                        records.lock().unwrap().push(record);
                    }
                })
            })
            .collect();
        Load {
            stop,
            records,
            threads,
        }
    }

    /// One connection per client, all at once (a thread each); with `pause`, slow ones.
    pub fn once(&self, clients: &[Client], pause: Option<Duration>) -> Once {
        let paused = Arc::new(AtomicUsize::new(0));
        let threads = clients
            .iter()
            .map(|&client| {
                let (setup, paused) = (self.setup.clone(), paused.clone());
                let (mode, to, reply_timeout) = (self.mode, self.to, self.reply_timeout);
                std::thread::spawn(move || {
                    if let Some(setup) = setup {
                        setup();
                    }
                    exchange(
                        mode,
                        client,
                        to,
                        reply_timeout,
                        pause.map(|p| (p, &*paused)),
                    )
                })
            })
            .collect();
        Once { threads, paused }
    }
}

impl Load {
    pub fn count(&self, which: impl Fn(&Record) -> bool) -> usize {
        self.records
            .lock()
            .unwrap()
            .iter()
            .filter(|r| which(r))
            .count()
    }

    pub fn answered(&self) -> usize {
        self.count(|r| r.answer.is_ok())
    }

    /// Waits (bounded) until `count` more connections than now are answered.
    pub fn wait_answered(&self, more: usize, within: Duration) {
        let target = self.answered() + more;
        let deadline = Instant::now() + within;
        while self.answered() < target {
            assert!(
                Instant::now() < deadline,
                "load: fewer than {target} answered within {within:?} ({} so far)",
                self.answered()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn stop(mut self) -> Vec<Record> {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            thread.join().expect("load thread");
        }
        std::mem::take(&mut *self.records.lock().unwrap())
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// A [`Plan::once`] in progress.
pub struct Once {
    threads: Vec<std::thread::JoinHandle<Record>>,
    paused: Arc<AtomicUsize>,
}

impl Once {
    /// Slow clients that have sent the first part of their request.
    pub fn paused(&self) -> usize {
        self.paused.load(Ordering::SeqCst)
    }

    pub fn join(self) -> Vec<Record> {
        self.threads
            .into_iter()
            .map(|t| t.join().expect("client thread"))
            .collect()
    }
}
