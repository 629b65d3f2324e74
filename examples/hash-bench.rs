//! Hash benchmark: sticky-session's int31, sticky-cluster's djb2 and our routing (a 32-bit
//! MurmurHash3 to 4096 buckets and a bucket table), on the same client addresses.
//!
//! ```text
//! cargo run --release --example hash-bench -- [WORKERS [ADDRESSES]]   (default 10 100000)
//! ```
//!
//! It reproduces the "Benchmarking" section of sticky-cluster's README (random IPv4 and
//! IPv6 addresses, half each, hashed to a worker) and extends it: for every hash it prints
//! the time per address, the per-worker counts, the largest deviation from the mean, and
//! the share of addresses that change worker when the worker count grows from N to N + 1.
//! It then does the same on structured sets that real clients produce: sequential IPv4
//! addresses, every host of one /24 and one /16, and random hosts in random /64s of one
//! IPv6 /48. The addresses come from a fixed seed, so every run hashes the same ones.
//!
//! The two Node hashes are written here from their definitions and run as Rust, so the
//! times compare algorithms, not runtimes:
//!
//! - **int31** (sticky-session 1.x): Bob Jenkins' one-at-a-time hash over the address
//!   bytes (4 for IPv4, 16 for IPv6), with the JavaScript quirks of the original: after
//!   each addition the value is reduced with `%= 2^31` (a remainder that keeps the sign),
//!   shifts and xors work on 32-bit signed integers, and the result is taken as unsigned
//!   32-bit (`>>> 0`). Worker: `hash % N`. sticky-session seeds it at random on every
//!   start; here the seed is fixed.
//! - **int31 (sticky-cluster's benchmark input)**: the same hash fed the way
//!   sticky-cluster's benchmark feeds it, `parseInt` of each dot-separated part of the
//!   address text. An IPv6 address then contributes one number (its leading decimal
//!   digits), or NaN, which zeroes the state, when it starts with a letter: that is where
//!   the crowded worker 0 in sticky-cluster's README comes from.
//! - **djb2** (sticky-cluster, the `string-hash` package): `h = 5381`, then for every
//!   character from the last to the first `h = (h * 33) ^ c` in 32-bit arithmetic,
//!   result as unsigned 32-bit. Worker: `hash % N`. The text is the address as Node
//!   prints a peer address (dotted quad; RFC 5952 for IPv6), which Rust's `Display` gives.
//! - **ours**: [`Router::key`] (IPv4-mapped to IPv4, /32 and /64 prefixes), MurmurHash3
//!   over the key's big-endian words with seed 0, the top 12 bits as the bucket, the
//!   bucket table of N: exactly what the dispatcher (and the kernel's BPF program) does
//!   per connection.
//! - **uniform random**: every address draws a worker at random. Not a hash: the scatter
//!   that pure chance gives, to judge the others' deviation against.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sticky_dispatch::routing::Router;

/// Seed of every generated address set: the same addresses on every run.
const ADDRESS_SEED: u64 = 0x57_1c_4b_d1;
/// int31's seed; sticky-session draws one at random on each start.
const INT31_SEED: i32 = 0x1234_5678;
/// Timed passes over each set; the median is reported.
const TIMED_PASSES: usize = 7;
/// Bounds the timed passes of one hash on one set, whatever the set size.
const TIME_BUDGET: Duration = Duration::from_secs(5);

/// One client address and the forms each hash takes as input, stored inline so that every
/// hash reads its input from the same sequential memory and none pays for a pointer chase.
struct Address {
    ip: IpAddr,
    /// Network-order bytes (what sticky-session's `ip.toBuffer` gives): 4 or 16 of them.
    bytes: [u8; 16],
    bytes_len: u8,
    /// The text a Node server sees as `socket.remoteAddress` (at most 39 characters).
    text: [u8; 40],
    text_len: u8,
}

impl Address {
    fn new(ip: IpAddr) -> Address {
        let mut bytes = [0; 16];
        let bytes_len = match ip {
            IpAddr::V4(v4) => {
                bytes[..4].copy_from_slice(&v4.octets());
                4
            }
            IpAddr::V6(v6) => {
                bytes = v6.octets();
                16
            }
        };
        let shown = ip.to_string();
        let mut text = [0; 40];
        text[..shown.len()].copy_from_slice(shown.as_bytes());
        Address {
            ip,
            bytes,
            bytes_len,
            text,
            text_len: shown.len() as u8,
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.bytes_len)]
    }

    /// The text as bytes: it is ASCII, so these are also its UTF-16 code units.
    fn text(&self) -> &[u8] {
        &self.text[..usize::from(self.text_len)]
    }
}

/// `x % 2^31` with JavaScript's sign-keeping remainder, on values that are integers.
fn js_mod31(x: i64) -> i64 {
    x % (1 << 31)
}

/// ToInt32 of a JavaScript number that is an integer of magnitude below 2^31 here.
fn int32(x: i64) -> i32 {
    x as i32
}

/// One byte (or parsed number) step of int31; `None` is a NaN input.
fn int31_step(hash: i64, num: Option<i64>) -> i64 {
    let Some(num) = num else {
        // NaN poisons the sum and the remainders; the xor's ToInt32 turns it into 0.
        return 0;
    };
    let mut h = js_mod31(hash + num);
    h += i64::from(int32(h).wrapping_shl(10));
    h = js_mod31(h);
    i64::from(int32(h) ^ (int32(h) >> 6))
}

/// The final avalanche of int31, then `>>> 0`.
fn int31_finish(hash: i64) -> u32 {
    let mut h = hash;
    h += i64::from(int32(h).wrapping_shl(3));
    h = js_mod31(h);
    h = i64::from(int32(h) ^ (int32(h) >> 11));
    h += i64::from(int32(h).wrapping_shl(15));
    h = js_mod31(h);
    int32(h) as u32
}

/// sticky-session's hash of the address bytes.
fn int31(bytes: &[u8], seed: i32) -> u32 {
    int31_finish(
        bytes
            .iter()
            .fold(i64::from(seed), |h, &b| int31_step(h, Some(i64::from(b)))),
    )
}

/// JavaScript's `parseInt(s, 10)` for the strings it meets here: leading decimal digits,
/// NaN (`None`) when there are none.
fn parse_int(part: &[u8]) -> Option<i64> {
    // Address text has at most 4 digits in a row; 18 cannot overflow an i64.
    let digits = part.iter().take(18).take_while(|c| c.is_ascii_digit());
    let mut seen = false;
    let value = digits.fold(0i64, |n, &d| {
        seen = true;
        n * 10 + i64::from(d - b'0')
    });
    seen.then_some(value)
}

/// int31 fed as sticky-cluster's benchmark feeds it: `parseInt` of each `.`-part.
fn int31_dotted(text: &[u8], seed: i32) -> u32 {
    int31_finish(
        text.split(|&c| c == b'.')
            .fold(i64::from(seed), |h, part| int31_step(h, parse_int(part))),
    )
}

/// djb2 as the `string-hash` package computes it, over the UTF-16 code units of `text`
/// (the same as its bytes for an address).
fn djb2(text: &[u8]) -> u32 {
    text.iter()
        .rev()
        .fold(5381u32, |h, &c| h.wrapping_mul(33) ^ u32::from(c))
}

/// A way to pick a worker, as the benchmark runs it.
#[derive(Clone, Copy)]
enum Method {
    Int31,
    Int31Dotted,
    Djb2,
    Ours,
    Random,
}

impl Method {
    const ALL: [Method; 5] = [
        Method::Int31,
        Method::Int31Dotted,
        Method::Djb2,
        Method::Ours,
        Method::Random,
    ];

    fn name(self) -> &'static str {
        match self {
            Method::Int31 => "int31 (sticky-session)",
            Method::Int31Dotted => "int31, sticky-cluster's bench input",
            Method::Djb2 => "djb2 (sticky-cluster)",
            Method::Ours => "murmur3 + bucket table (ours)",
            Method::Random => "uniform random (reference)",
        }
    }

    /// Worker of every address for `workers` workers.
    fn assign(self, addresses: &[Address], workers: u32) -> Vec<u32> {
        match self {
            Method::Int31 => addresses
                .iter()
                .map(|a| int31(a.bytes(), INT31_SEED) % workers)
                .collect(),
            Method::Int31Dotted => addresses
                .iter()
                .map(|a| int31_dotted(a.text(), INT31_SEED) % workers)
                .collect(),
            Method::Djb2 => addresses.iter().map(|a| djb2(a.text()) % workers).collect(),
            Method::Ours => {
                let router = router(workers);
                addresses
                    .iter()
                    .map(|a| router.worker_for(&router.key(Some(a.ip))))
                    .collect()
            }
            Method::Random => {
                // A fresh draw per worker count: "moved" is then (N-1)/N or so, as for any
                // scheme without memory.
                let mut rng = SmallRng::seed_from_u64(u64::from(workers));
                addresses
                    .iter()
                    .map(|_| rng.random_range(0..workers))
                    .collect()
            }
        }
    }

    /// Median nanoseconds per address of the per-connection work: address in, worker out.
    /// `None` for the random reference, which is not a per-client computation.
    fn time_per_address(self, addresses: &[Address], workers: u32) -> Option<f64> {
        let router = router(workers);
        let mut passes = Vec::with_capacity(TIMED_PASSES);
        let deadline = Instant::now() + TIME_BUDGET;
        let mut counts = vec![0u64; workers as usize];
        while passes.len() < TIMED_PASSES && (passes.is_empty() || Instant::now() < deadline) {
            let start = Instant::now();
            match self {
                Method::Int31 => {
                    for a in addresses {
                        counts[(int31(black_box(a).bytes(), INT31_SEED) % workers) as usize] += 1;
                    }
                }
                Method::Int31Dotted => {
                    for a in addresses {
                        counts
                            [(int31_dotted(black_box(a).text(), INT31_SEED) % workers) as usize] +=
                            1;
                    }
                }
                Method::Djb2 => {
                    for a in addresses {
                        counts[(djb2(black_box(a).text()) % workers) as usize] += 1;
                    }
                }
                Method::Ours => {
                    for a in addresses {
                        let key = router.key(Some(black_box(a.ip)));
                        counts[router.worker_for(&key) as usize] += 1;
                    }
                }
                Method::Random => return None,
            }
            passes.push(start.elapsed().as_secs_f64() * 1e9 / addresses.len() as f64);
        }
        black_box(&counts);
        Some(median(&mut passes))
    }
}

fn router(workers: u32) -> Router {
    Router::new(NonZeroU32::new(workers).expect("workers >= 1"), 32, 64, 0)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Largest deviation of a worker's count from the mean, in percent of the mean.
fn max_deviation(counts: &[u64]) -> f64 {
    let mean = counts.iter().sum::<u64>() as f64 / counts.len() as f64;
    counts
        .iter()
        .map(|&c| (c as f64 - mean).abs() / mean * 100.0)
        .fold(0.0, f64::max)
}

fn report(title: &str, addresses: &[Address], workers: u32) {
    println!(
        "### {title}: {} addresses, {workers} workers\n",
        addresses.len()
    );
    println!(
        "| hash | ns/address | max deviation | moved {workers}→{} | per-worker counts |",
        workers + 1
    );
    println!("|---|---:|---:|---:|---|");
    for method in Method::ALL {
        let before = method.assign(addresses, workers);
        let after = method.assign(addresses, workers + 1);
        let mut counts = vec![0u64; workers as usize];
        for &w in &before {
            counts[w as usize] += 1;
        }
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        let time = method
            .time_per_address(addresses, workers)
            .map_or_else(|| "–".to_owned(), |ns| format!("{ns:.1}"));
        let counts_text: Vec<String> = counts.iter().map(u64::to_string).collect();
        println!(
            "| {} | {time} | {:.1} % | {:.1} % | {} |",
            method.name(),
            max_deviation(&counts),
            moved as f64 * 100.0 / addresses.len() as f64,
            counts_text.join(" ")
        );
    }
    println!();
}

/// Half IPv4, half IPv6, uniformly random, like sticky-cluster's benchmark.
fn random_mix(count: usize) -> Vec<Address> {
    let mut rng = SmallRng::seed_from_u64(ADDRESS_SEED);
    (0..count)
        .map(|i| {
            Address::new(if i % 2 == 1 {
                IpAddr::V4(Ipv4Addr::from(rng.random::<u32>()))
            } else {
                IpAddr::V6(Ipv6Addr::from(rng.random::<u128>()))
            })
        })
        .collect()
}

/// `count` consecutive IPv4 addresses from 10.0.0.1.
fn sequential_v4(count: usize) -> Vec<Address> {
    let first = u32::from(Ipv4Addr::new(10, 0, 0, 1));
    (0..count as u32)
        .map(|i| Address::new(IpAddr::V4(Ipv4Addr::from(first.wrapping_add(i)))))
        .collect()
}

/// Every address of the IPv4 network `base`/`prefix`.
fn whole_v4_network(base: Ipv4Addr, prefix: u32) -> Vec<Address> {
    let first = u32::from(base);
    (0..1u32 << (32 - prefix))
        .map(|i| Address::new(IpAddr::V4(Ipv4Addr::from(first + i))))
        .collect()
}

/// `count` random hosts in random /64s of 2001:db8:4a5b::/48.
fn random_in_v6_48(count: usize) -> Vec<Address> {
    let mut rng = SmallRng::seed_from_u64(ADDRESS_SEED + 1);
    let network = u128::from("2001:db8:4a5b::".parse::<Ipv6Addr>().expect("valid"));
    (0..count)
        .map(|_| {
            let subnet = u128::from(rng.random::<u16>()) << 64;
            let host = u128::from(rng.random::<u64>());
            Address::new(IpAddr::V6(Ipv6Addr::from(network | subnet | host)))
        })
        .collect()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores")
}

fn main() {
    let mut args = std::env::args().skip(1);
    let parse = |arg: Option<String>, default: usize, what: &str| -> usize {
        arg.map_or(default, |text| {
            text.parse().unwrap_or_else(|_| {
                eprintln!("usage: hash-bench [WORKERS [ADDRESSES]]: bad {what} {text:?}");
                std::process::exit(2)
            })
        })
    };
    let workers = parse(args.next(), 10, "worker count");
    let count = parse(args.next(), 100_000, "address count");
    if !(1..=65_535).contains(&workers) || !(1..=10_000_000).contains(&count) {
        eprintln!("hash-bench: WORKERS must be in 1..=65535 and ADDRESSES in 1..=10000000");
        std::process::exit(2);
    }
    let workers = workers as u32;
    println!("hash-bench on {}\n", machine());
    report(
        "random, half IPv4 and half IPv6",
        &random_mix(count),
        workers,
    );
    report(
        "sequential IPv4 from 10.0.0.1",
        &sequential_v4(count),
        workers,
    );
    report(
        "every host of 192.168.7.0/24",
        &whole_v4_network(Ipv4Addr::new(192, 168, 7, 0), 24),
        workers,
    );
    report(
        "every host of 172.16.0.0/16",
        &whole_v4_network(Ipv4Addr::new(172, 16, 0, 0), 16),
        workers,
    );
    report(
        "random hosts in random /64s of 2001:db8:4a5b::/48",
        &random_in_v6_48(count),
        workers,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values computed by running the JavaScript definitions in Node.
    #[test]
    fn node_hashes_match_node() {
        // (address, int31 of bytes seed 0x12345678, int31 of the dotted parts, djb2,
        //  int31 of bytes with the negative seed -123456789)
        let vectors: [(&str, u32, u32, u32, u32); 6] = [
            ("192.0.2.77", 1177021572, 1177021572, 3155019347, 1315903085),
            ("10.0.0.1", 116169542, 116169542, 3394232379, 1781813848),
            (
                "255.255.255.255",
                1518614647,
                1518614647,
                2390231627,
                3890898906,
            ),
            ("2001:db8::1", 2561089352, 3148902874, 825529651, 2449377127),
            ("fe80::1", 305155368, 0, 570021695, 4230215036),
            (
                "2001:db8:4a5b:7::dead:beef",
                2730332137,
                3148902874,
                3013766861,
                487096668,
            ),
        ];
        for (text, bytes_hash, dotted_hash, djb2_hash, negative_seed_hash) in vectors {
            let a = Address::new(text.parse().unwrap());
            assert_eq!(a.text(), text.as_bytes());
            assert_eq!(int31(a.bytes(), 0x1234_5678), bytes_hash, "int31 {text}");
            assert_eq!(
                int31_dotted(a.text(), 0x1234_5678),
                dotted_hash,
                "dotted {text}"
            );
            assert_eq!(djb2(a.text()), djb2_hash, "djb2 {text}");
            assert_eq!(
                int31(a.bytes(), -123_456_789),
                negative_seed_hash,
                "seed {text}"
            );
        }
    }

    #[test]
    fn djb2_matches_string_hash() {
        // string-hash("") is 5381; one character c gives 5381 * 33 ^ c.
        assert_eq!(djb2(b""), 5381);
        assert_eq!(djb2(b"a"), 5381 * 33 ^ 97);
        assert_eq!(djb2(b"ab"), (5381 * 33 ^ 98) * 33 ^ 97);
    }

    #[test]
    fn parse_int_reads_leading_digits() {
        assert_eq!(parse_int(b"192"), Some(192));
        assert_eq!(parse_int(b"2001:db8::1"), Some(2001));
        assert_eq!(parse_int(b"fe80::1"), None);
        assert_eq!(parse_int(b""), None);
    }

    #[test]
    fn int31_of_dotted_ipv4_equals_int31_of_its_bytes() {
        let a = Address::new("192.0.2.77".parse().unwrap());
        assert_eq!(int31_dotted(a.text(), 7), int31(a.bytes(), 7));
    }

    #[test]
    fn nan_input_zeroes_int31_state() {
        assert_eq!(int31_dotted(b"fe80::1", 99), int31_finish(0));
    }
}
