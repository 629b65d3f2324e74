//! Client → worker routing: which worker owns a client's connections.
//!
//! The mapping is part of the wire contract (workers and tooling in other
//! languages may recompute it), so it is specified exactly here and pinned by
//! golden vectors (`tests/vectors/routing-v2.json`). It is never randomised:
//! it must survive restarts and upgrades, or sticky sessions break. For the
//! peer IP the kernel computes the very same function in a classic BPF
//! program ([`cbpf`]), so every step uses 32-bit arithmetic without loops.
//!
//! # Algorithm (version 2)
//!
//! 1. **Key.** Take the peer IP. An IPv4-mapped IPv6 address
//!    (`::ffff:a.b.c.d`) is first replaced by the IPv4 address `a.b.c.d`,
//!    because it is the same client reaching a dual-stack socket. The key is
//!    the address in network byte order (4 bytes for IPv4, 16 for IPv6) with
//!    every bit after the prefix length set to zero (`ipv4_prefix`, default
//!    32, clamped to 32; `ipv6_prefix`, default 64, clamped to 128 — the
//!    default is 64 because IPv6 privacy addresses rotate the low 64 bits).
//!    A peer without an IP (e.g. a Unix-socket listener) has the empty key
//!    (zero bytes). A cookie or query token's key is the 8 big-endian bytes
//!    of its unseeded XXH64.
//! 2. **Hash.** MurmurHash3 x86 32-bit, except that the key is read as
//!    *big-endian* 32-bit words (network order: what a BPF load gives), all
//!    arithmetic modulo 2^32, `rotl` a 32-bit left rotation:
//!
//!    ```text
//!    h = (hash_seed mod 2^32) xor (hash_seed >> 32)      (hash_seed: 64 bits, default 0)
//!    for each word w of the key:                          (0, 1, 2 or 4 words)
//!        k = rotl(w * 0xcc9e2d51, 15) * 0x1b873593
//!        h = rotl(h xor k, 13) * 5 + 0xe6546b64
//!    h = h xor (key length in bytes)                      (0, 4, 8 or 16)
//!    h = (h xor h >> 16) * 0x85ebca6b
//!    h = (h xor h >> 13) * 0xc2b2ae35
//!    h = h xor h >> 16
//!    ```
//!
//!    For example the empty key with seed 0 hashes to `0x00000000`, and
//!    `192.0.2.1` (the word `0xc0000201`) to `0x3a90f707`.
//! 3. **Bucket.** `b = h >> 20`: one of [`BUCKETS`] = 4096 buckets.
//! 4. **Worker.** `table[b]`, where the bucket table is built from the
//!    configured worker count `N` alone: all buckets start on worker 0; then
//!    for `n = 1, 2, …, N − 1`, worker `n` takes `floor(4096 / (n + 1))`
//!    buckets, one at a time, each from the worker that has the most buckets
//!    at that moment (the lowest index among equals), which gives up its
//!    highest-numbered bucket. (From `n = 4096` on, the quota is 0.)
//!
//!    So every worker owns `floor(4096 / N)` or `ceil(4096 / N)` buckets
//!    (4096 = the largest `workers`, so none is ever left without one), and
//!    growing `N` to `N + 1` moves exactly `floor(4096 / (N + 1))` buckets —
//!    about `1 / (N + 1)` of the clients — all of them to the new worker `N`.
//!    `N` is the configured worker count: a worker being down never changes
//!    it, so its clients come back to it.
//!
//! Version 1 (0.1: XXH64, then a jump consistent hash over N) sent clients
//! to other workers: upgrading from it moves clients once.
//!
//! # Failover (optional)
//!
//! When a client's primary worker is down and failover is enabled, the
//! replacement is, for `attempt` in `1..=8`, the first worker `table[b]` of
//! the hash computed with `hash_seed + attempt` (wrapping, 64 bits) that is
//! neither the primary nor down; failing that, the first live worker of
//! `primary + 1`, `primary + 2`, … (mod `N`). The pseudo-random attempts
//! spread a dead worker's clients over all live workers instead of piling
//! them onto its neighbour; the scan guarantees an answer whenever any other
//! worker lives. Failover is the dispatcher's alone: the kernel never fails
//! over.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

pub mod cbpf;

/// Number of buckets between the hash and the workers: the largest `workers`
/// (so every worker owns at least one), and a power of two (a shift picks it).
pub const BUCKETS: usize = 1 << BUCKET_BITS;

/// `log2(BUCKETS)`: the bucket is the hash's top `BUCKET_BITS` bits.
const BUCKET_BITS: u32 = 12;

/// Seeded hash attempts before the failover falls back to a linear scan.
const FAILOVER_ATTEMPTS: u64 = 8;

/// MurmurHash3's constants (x86, 32-bit).
mod murmur {
    pub(super) const C1: u32 = 0xcc9e_2d51;
    pub(super) const C2: u32 = 0x1b87_3593;
    pub(super) const R1: u32 = 15;
    pub(super) const R2: u32 = 13;
    pub(super) const M: u32 = 5;
    pub(super) const N: u32 = 0xe654_6b64;
    pub(super) const F1: u32 = 0x85eb_ca6b;
    pub(super) const F2: u32 = 0xc2b2_ae35;
}

/// Masked address bytes that identify a client for routing.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct RoutingKey {
    /// Number of meaningful bytes: 0, 4 or 16 (an address), 8 (a token digest).
    len: u8,
    /// Address bytes; everything at and after `len` stays zero so that the
    /// derived equality and hashing only see the meaningful bytes.
    bytes: [u8; 16],
}

impl RoutingKey {
    /// The empty key, for peers without an IP (e.g. Unix-socket listeners).
    ///
    /// All such peers share it, so they all go to one worker.
    pub const NONE: RoutingKey = RoutingKey {
        len: 0,
        bytes: [0; 16],
    };

    /// Key for an opaque token (a cookie or query parameter value): the 8 big-endian
    /// bytes of its unseeded XXH64, so a long token costs no more than an address.
    pub fn from_token(token: &[u8]) -> Self {
        let mut bytes = [0; 16];
        bytes[..8].copy_from_slice(&twox_hash::XxHash64::oneshot(0, token).to_be_bytes());
        RoutingKey { len: 8, bytes }
    }

    /// Key for `ip`, keeping only the first `ipv4_prefix` / `ipv6_prefix`
    /// bits of the address (prefixes above 32 / 128 are clamped).
    ///
    /// IPv4-mapped IPv6 addresses are treated as the IPv4 address they carry.
    pub fn from_ip(ip: IpAddr, ipv4_prefix: u8, ipv6_prefix: u8) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => {
                Self::from_slice(&(u32::from(v4) & ipv4_mask(ipv4_prefix)).to_be_bytes())
            }
            IpAddr::V6(v6) => {
                let prefix = u32::from(ipv6_prefix.min(128));
                // checked_shl: a shift by the full width (prefix 0) means "no bits kept".
                let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
                Self::from_slice(&(u128::from(v6) & mask).to_be_bytes())
            }
        }
    }

    /// The key bytes that are hashed: empty, 4 (IPv4), 8 (a token digest) or 16 (IPv6).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// A key from the bytes [`RoutingKey::as_bytes`] gave (0, 4, 8 or 16 of them), as
    /// kept with a connection in systemd's fd store; `None` for any other length.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        matches!(bytes.len(), 0 | 4 | 8 | 16).then(|| Self::from_slice(bytes))
    }

    /// Builds a key from at most 16 bytes (only called with 0, 4, 8 or 16).
    fn from_slice(src: &[u8]) -> Self {
        let mut bytes = [0; 16];
        bytes[..src.len()].copy_from_slice(src);
        RoutingKey {
            // Callers pass at most 16 bytes, so this never truncates.
            len: src.len() as u8,
            bytes,
        }
    }
}

/// The mask of the first `prefix` bits of an IPv4 address (`prefix` clamped to 32).
fn ipv4_mask(prefix: u8) -> u32 {
    // checked_shl: a shift by the full width (prefix 0) means "no bits kept".
    u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0)
}

/// The 32-bit hash seed of a configured 64-bit `hash_seed`: its two halves xored.
pub fn fold_seed(seed: u64) -> u32 {
    // Truncations on purpose: the low and the high half.
    (seed as u32) ^ ((seed >> 32) as u32)
}

/// The hash of a key (step 2 of the module documentation): MurmurHash3 x86 32-bit over
/// the key's big-endian words, seeded with [`fold_seed`]`(seed)`.
pub fn key_hash(key: &RoutingKey, seed: u64) -> u32 {
    let mut h = fold_seed(seed);
    for word in key.as_bytes().chunks_exact(4) {
        let w = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        let k = w
            .wrapping_mul(murmur::C1)
            .rotate_left(murmur::R1)
            .wrapping_mul(murmur::C2);
        h = (h ^ k)
            .rotate_left(murmur::R2)
            .wrapping_mul(murmur::M)
            .wrapping_add(murmur::N);
    }
    finish(h, u32::from(key.len))
}

/// The hash's last steps: the key length, then MurmurHash3's finalisation.
fn finish(h: u32, len: u32) -> u32 {
    let mut h = h ^ len;
    h = (h ^ (h >> 16)).wrapping_mul(murmur::F1);
    h = (h ^ (h >> 13)).wrapping_mul(murmur::F2);
    h ^ (h >> 16)
}

/// The bucket of a hash, in `0..BUCKETS`: its top 12 bits.
pub fn bucket_of(hash: u32) -> usize {
    (hash >> (32 - BUCKET_BITS)) as usize
}

/// The bucket table of `workers` workers (step 4 of the module documentation): the
/// worker that owns each bucket.
pub fn bucket_table(workers: NonZeroU32) -> Box<[u16; BUCKETS]> {
    let mut owner = Box::new([0u16; BUCKETS]);
    // Each worker's buckets, ascending: a donor gives up its last one. Worker 0 starts
    // with all of them.
    let mut owned: Vec<Vec<u16>> = vec![(0..BUCKETS as u16).collect()];
    // Who gives next: the most buckets, then the lowest index.
    let mut donors = BinaryHeap::from([(BUCKETS, Reverse(0usize))]);
    // From worker BUCKETS on the quota is 0: nothing changes.
    let growing = workers.get().min(BUCKETS as u32) as usize;
    for new in 1..growing {
        let quota = BUCKETS / (new + 1);
        let mut taken = Vec::with_capacity(quota);
        for _ in 0..quota {
            // The heap holds every worker so far, and each owns at least one bucket
            // (quota >= 1 while new < BUCKETS), so both always have a next element.
            let (count, Reverse(donor)) = donors.pop().expect("worker 0 is always there");
            taken.push(owned[donor].pop().expect("a donor owns its buckets"));
            donors.push((count - 1, Reverse(donor)));
        }
        taken.sort_unstable();
        for &bucket in &taken {
            // new < BUCKETS = 4096, so it fits.
            owner[usize::from(bucket)] = new as u16;
        }
        owned.push(taken);
        donors.push((quota, Reverse(new)));
    }
    owner
}

/// Routes clients to one of a fixed number of workers.
#[derive(Clone)]
pub struct Router {
    /// Configured worker count; liveness never changes it.
    workers: NonZeroU32,
    /// IPv4 prefix length, already clamped to 32.
    ipv4_prefix: u8,
    /// IPv6 prefix length, already clamped to 128.
    ipv6_prefix: u8,
    /// The configured `hash_seed` of the primary choice.
    seed: u64,
    /// [`bucket_table`] of `workers`, shared by the clones.
    table: Arc<[u16; BUCKETS]>,
}

// Not derived: the table would print its 4096 entries.
impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("workers", &self.workers)
            .field("ipv4_prefix", &self.ipv4_prefix)
            .field("ipv6_prefix", &self.ipv6_prefix)
            .field("seed", &self.seed)
            .finish_non_exhaustive()
    }
}

impl Router {
    /// Router over `workers` workers; prefixes above 32 / 128 are clamped.
    pub fn new(workers: NonZeroU32, ipv4_prefix: u8, ipv6_prefix: u8, hash_seed: u64) -> Self {
        Router {
            workers,
            ipv4_prefix: ipv4_prefix.min(32),
            ipv6_prefix: ipv6_prefix.min(128),
            seed: hash_seed,
            table: bucket_table(workers).into(),
        }
    }

    /// Configured number of workers.
    pub fn workers(&self) -> NonZeroU32 {
        self.workers
    }

    /// Routing key of a peer; [`RoutingKey::NONE`] when it has no IP.
    pub fn key(&self, peer: Option<IpAddr>) -> RoutingKey {
        match peer {
            Some(ip) => RoutingKey::from_ip(ip, self.ipv4_prefix, self.ipv6_prefix),
            None => RoutingKey::NONE,
        }
    }

    /// The primary worker for `key`, in `0..workers`.
    pub fn worker_for(&self, key: &RoutingKey) -> u32 {
        self.worker_of_hash(key_hash(key, self.seed))
    }

    /// The worker that owns `hash`'s bucket.
    fn worker_of_hash(&self, hash: u32) -> u32 {
        u32::from(self.table[bucket_of(hash)])
    }

    /// Deterministic other live worker for `key` when its primary is down, or
    /// `None` if no other worker is live.
    ///
    /// The same key and set of live workers always give the same answer, and
    /// different keys of one dead worker spread over the live workers (see the
    /// module documentation for the exact rule). `is_live` is only asked
    /// about workers other than the primary.
    pub fn failover_for(&self, key: &RoutingKey, is_live: impl Fn(u32) -> bool) -> Option<u32> {
        let primary = self.worker_for(key);
        for attempt in 1..=FAILOVER_ATTEMPTS {
            let candidate = self.worker_of_hash(key_hash(key, self.seed.wrapping_add(attempt)));
            if candidate != primary && is_live(candidate) {
                return Some(candidate);
            }
        }
        // Many workers down (or bad luck): a scan is still deterministic and
        // finds a live worker whenever one exists.
        let n = u64::from(self.workers.get());
        (1..n)
            // Computed in u64 because primary + offset may exceed u32::MAX;
            // the result is below n, so the cast back is exact.
            .map(|offset| ((u64::from(primary) + offset) % n) as u32)
            .find(|&w| is_live(w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};
    use std::net::{Ipv4Addr, Ipv6Addr};

    const RANDOM_KEYS: usize = 100_000;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// Router with the documented defaults (/32, /64, seed 0).
    fn default_router(workers: u32) -> Router {
        Router::new(nz(workers), 32, 64, 0)
    }

    /// Reproducible mix of random IPv4 and IPv6 client keys (default prefixes).
    fn random_keys(count: usize, rng_seed: u64) -> Vec<RoutingKey> {
        let mut rng = SmallRng::seed_from_u64(rng_seed);
        let router = default_router(1);
        (0..count)
            .map(|i| {
                let addr = if i % 2 == 0 {
                    IpAddr::V4(Ipv4Addr::from(rng.random::<u32>()))
                } else {
                    IpAddr::V6(Ipv6Addr::from(rng.random::<u128>()))
                };
                router.key(Some(addr))
            })
            .collect()
    }

    /// Keys of `count` consecutive IPv4 addresses from `first`.
    fn sequential_keys(first: Ipv4Addr, count: u32) -> Vec<RoutingKey> {
        let router = default_router(1);
        (0..count)
            .map(|i| router.key(Some(Ipv4Addr::from(u32::from(first) + i).into())))
            .collect()
    }

    #[test]
    fn hash_is_murmur3_on_big_endian_words() {
        // MurmurHash3_x86_32 reference values (the words of a little-endian reader are
        // the byte-swapped ones): "" seed 0 → 0, "" seed 1 → 0x514e28b7, the bytes
        // 21 43 65 87 (read little-endian: 0x87654321) seed 0 → 0xf55b516b.
        assert_eq!(key_hash(&RoutingKey::NONE, 0), 0);
        assert_eq!(key_hash(&RoutingKey::NONE, 1), 0x514e_28b7);
        let key = RoutingKey::from_bytes(&[0x87, 0x65, 0x43, 0x21]).unwrap();
        assert_eq!(key_hash(&key, 0), 0xf55b_516b);
        // The 64-bit seed folds to 32 bits: its halves are xored.
        assert_eq!(fold_seed(0x0000_0001_0000_0001), 0);
        assert_eq!(
            key_hash(&key, 0x1234_5678_0000_0000),
            key_hash(&key, 0x1234_5678)
        );
    }

    #[test]
    fn table_gives_every_worker_floor_or_ceil() {
        let mut sizes: Vec<u32> = (1..=130).collect();
        sizes.extend([255, 256, 257, 1000, 2047, 2048, 4095, 4096, 5000, u32::MAX]);
        for n in sizes {
            let table = bucket_table(nz(n));
            let owners = n.min(BUCKETS as u32) as usize;
            let mut counts = vec![0usize; owners];
            for &w in table.iter() {
                counts[usize::from(w)] += 1;
            }
            let floor = BUCKETS / owners;
            let ceil = BUCKETS.div_ceil(owners);
            assert!(
                counts.iter().all(|&c| c == floor || c == ceil),
                "{n} workers: {counts:?}"
            );
        }
    }

    #[test]
    fn growing_workers_moves_buckets_only_to_new_worker() {
        let mut sizes: Vec<u32> = (1..=130).collect();
        sizes.extend([255, 1000, 4095]);
        for n in sizes {
            let (before, after) = (bucket_table(nz(n)), bucket_table(nz(n + 1)));
            let moved: Vec<usize> = (0..BUCKETS).filter(|&b| before[b] != after[b]).collect();
            assert!(
                moved.iter().all(|&b| u32::from(after[b]) == n),
                "{n} -> {}",
                n + 1
            );
            assert_eq!(moved.len(), BUCKETS / (n as usize + 1), "{n} -> {}", n + 1);
        }
        // Past BUCKETS workers nothing moves: the new workers own no bucket.
        assert_eq!(bucket_table(nz(4096)), bucket_table(nz(4097)));
    }

    #[test]
    fn table_is_pinned() {
        // The owners of every 256th bucket, as an independent Python implementation of
        // the module documentation builds the table; tests/vectors/routing-v2.json pins
        // more through the addresses.
        let expect: [(u32, [u16; 16]); 4] = [
            (3, [0, 0, 0, 0, 0, 0, 2, 2, 1, 1, 1, 1, 1, 1, 2, 2]),
            (7, [0, 0, 0, 5, 3, 3, 2, 2, 1, 1, 1, 5, 3, 6, 4, 5]),
            (
                64,
                [0, 15, 7, 47, 3, 15, 23, 63, 1, 15, 27, 57, 32, 32, 55, 40],
            ),
            (
                1000,
                [
                    0, 15, 7, 692, 3, 255, 355, 913, 1, 787, 716, 915, 437, 939, 580, 929,
                ],
            ),
        ];
        for (n, owners) in expect {
            let table = bucket_table(nz(n));
            let strided: Vec<u16> = table.iter().step_by(256).copied().collect();
            assert_eq!(strided, owners, "{n} workers");
        }
    }

    /// Changing anything in this table changes which worker existing clients
    /// reach, i.e. breaks every sticky session on upgrade. Don't, unless that
    /// is the intent. Values were cross-checked with an independent Python
    /// implementation of the module-level algorithm.
    #[test]
    fn golden_mapping_is_stable() {
        // (address, hash of the key with seed 0, worker of 4, worker of 10)
        let golden: [(&str, u32, u32, u32); 18] = [
            ("0.0.0.0", 0x2362_f9de, 0, 7),
            ("127.0.0.1", 0x9227_06ed, 1, 1),
            ("10.0.0.1", 0xa791_7c0b, 1, 6),
            ("192.168.1.1", 0xd808_ec28, 2, 5),
            ("192.0.2.1", 0x3a90_f707, 0, 4),
            ("198.51.100.42", 0x1fed_a226, 0, 8),
            ("203.0.113.7", 0x7179_da63, 2, 9),
            ("8.8.8.8", 0x89e3_93b1, 1, 1),
            ("1.1.1.1", 0x6bf8_3385, 2, 2),
            ("255.255.255.255", 0x7629_3b50, 2, 7),
            ("::ffff:203.0.113.7", 0x7179_da63, 2, 9),
            ("::1", 0x8134_cdf8, 1, 1),
            ("fe80::1", 0x159d_c031, 0, 0),
            ("2001:db8::1", 0x5162_2665, 3, 3),
            ("2001:db8::dead:beef", 0x5162_2665, 3, 3),
            ("2001:db8:abcd:12::1", 0x20d0_ca64, 0, 7),
            ("2606:4700:4700::1111", 0x9ada_fd19, 1, 9),
            ("2a00:1450:4001:82a::200e", 0x072c_4e38, 0, 0),
        ];
        let (four, ten) = (default_router(4), default_router(10));
        for (addr, hash, of_four, of_ten) in golden {
            let key = four.key(Some(ip(addr)));
            assert_eq!(key_hash(&key, 0), hash, "hash of {addr}");
            assert_eq!(four.worker_for(&key), of_four, "{addr} over 4 workers");
            assert_eq!(ten.worker_for(&key), of_ten, "{addr} over 10 workers");
        }
    }

    /// One case of tests/vectors/routing-v2.json.
    #[derive(serde::Deserialize)]
    struct VectorCase {
        workers: u32,
        ipv4_prefix: u8,
        ipv6_prefix: u8,
        seed: String,
        vectors: Vec<Vector>,
    }

    #[derive(serde::Deserialize)]
    struct Vector {
        address: Option<String>,
        hash: String,
        bucket: usize,
        worker: u32,
    }

    #[derive(serde::Deserialize)]
    struct Vectors {
        buckets: usize,
        cases: Vec<VectorCase>,
    }

    fn hex(text: &str) -> u64 {
        u64::from_str_radix(text.trim_start_matches("0x"), 16).unwrap()
    }

    /// The golden vectors that implementations in other languages check themselves
    /// against (computed by an independent Python implementation).
    #[test]
    fn golden_vectors_file() {
        let file: Vectors =
            serde_json::from_str(include_str!("../tests/vectors/routing-v2.json")).unwrap();
        assert_eq!(file.buckets, BUCKETS);
        let mut checked = 0;
        for case in file.cases {
            let seed = hex(&case.seed);
            let router = Router::new(nz(case.workers), case.ipv4_prefix, case.ipv6_prefix, seed);
            for v in case.vectors {
                let what = format!(
                    "{:?} in {} /{} /{} seed {seed:#x}",
                    v.address, case.workers, case.ipv4_prefix, case.ipv6_prefix
                );
                let key = router.key(v.address.as_deref().map(ip));
                let hash = key_hash(&key, seed);
                assert_eq!(u64::from(hash), hex(&v.hash), "hash of {what}");
                assert_eq!(bucket_of(hash), v.bucket, "bucket of {what}");
                assert_eq!(router.worker_for(&key), v.worker, "worker of {what}");
                checked += 1;
            }
        }
        assert!(checked >= 100, "only {checked} vectors");
    }

    #[test]
    fn mapped_ipv6_routes_like_ipv4() {
        let router = default_router(10);
        for (v4, mapped) in [
            ("192.0.2.1", "::ffff:192.0.2.1"),
            ("10.1.2.3", "::ffff:10.1.2.3"),
            ("0.0.0.0", "::ffff:0.0.0.0"),
        ] {
            let a = router.key(Some(ip(v4)));
            let b = router.key(Some(ip(mapped)));
            assert_eq!(a, b, "{v4} vs {mapped}");
            assert_eq!(a.as_bytes().len(), 4);
            assert_eq!(router.worker_for(&a), router.worker_for(&b));
        }
    }

    #[test]
    fn prefix_masking() {
        let (a, b) = (ip("10.1.2.3"), ip("10.1.2.200"));
        assert_eq!(
            RoutingKey::from_ip(a, 24, 64),
            RoutingKey::from_ip(b, 24, 64)
        );
        assert_eq!(RoutingKey::from_ip(a, 24, 64).as_bytes(), [10, 1, 2, 0]);
        assert_ne!(
            RoutingKey::from_ip(a, 32, 64),
            RoutingKey::from_ip(b, 32, 64)
        );

        // Privacy addresses: same /64, different interface identifier.
        let router = default_router(10);
        let x = router.key(Some(ip("2001:db8:1:2:1111:2222:3333:4444")));
        let y = router.key(Some(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")));
        assert_eq!(x, y);
        assert_eq!(router.worker_for(&x), router.worker_for(&y));
        assert_eq!(
            x.as_bytes(),
            [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        // A different /64 is a different client.
        assert_ne!(x, router.key(Some(ip("2001:db8:1:3::1"))));
        // Non-byte-aligned prefixes mask inside a byte.
        assert_eq!(
            RoutingKey::from_ip(ip("10.1.255.3"), 20, 64).as_bytes(),
            [10, 1, 0xf0, 0]
        );
    }

    #[test]
    fn prefix_lengths_clamp_and_zero_prefix_keeps_family() {
        for addr in ["192.0.2.77", "2001:db8::77"] {
            let addr = ip(addr);
            assert_eq!(
                RoutingKey::from_ip(addr, 200, 255),
                RoutingKey::from_ip(addr, 32, 128)
            );
        }
        assert_eq!(
            Router::new(nz(3), 99, 200, 0).key(Some(ip("2001:db8::1"))),
            RoutingKey::from_ip(ip("2001:db8::1"), 32, 128)
        );
        // Prefix 0: one key per address family, still distinct from NONE.
        let v4 = RoutingKey::from_ip(ip("192.0.2.1"), 0, 0);
        let v6 = RoutingKey::from_ip(ip("2001:db8::1"), 0, 0);
        assert_eq!(v4.as_bytes(), [0; 4]);
        assert_eq!(v6.as_bytes(), [0; 16]);
        assert_ne!(v4, RoutingKey::NONE);
    }

    #[test]
    fn growing_workers_moves_few_keys_only_to_new_worker() {
        let keys = random_keys(RANDOM_KEYS, 1);
        for n in (1..=16u32).chain([31, 32, 63, 64]) {
            let (before, after) = (default_router(n), default_router(n + 1));
            let mut moved = 0usize;
            for key in &keys {
                let (old, new) = (before.worker_for(key), after.worker_for(key));
                if old != new {
                    assert_eq!(new, n, "a moved key must go to the new worker");
                    moved += 1;
                }
            }
            let limit = RANDOM_KEYS as f64 * (1.0 / f64::from(n + 1) + 0.01);
            eprintln!(
                "{n} -> {} workers: {moved} of {RANDOM_KEYS} keys moved ({:.2}%, ideal {:.2}%)",
                n + 1,
                moved as f64 * 100.0 / RANDOM_KEYS as f64,
                100.0 / f64::from(n + 1)
            );
            assert!(
                (moved as f64) <= limit,
                "{n} -> {}: moved {moved}, limit {limit}",
                n + 1
            );
        }
    }

    /// The busiest worker's share over the mean, for `keys` over `workers`.
    fn busiest_over_mean(keys: &[RoutingKey], workers: u32) -> f64 {
        let router = default_router(workers);
        let mut counts = vec![0usize; workers as usize];
        for key in keys {
            counts[router.worker_for(key) as usize] += 1;
        }
        let mean = keys.len() as f64 / f64::from(workers);
        *counts.iter().max().unwrap() as f64 / mean
    }

    #[test]
    fn distribution_is_balanced() {
        // (set, keys): random, sequential, and whole networks.
        let sets = [
            ("random IPv4 and IPv6", random_keys(RANDOM_KEYS * 2, 2)),
            (
                "sequential IPv4 from 10.0.0.1",
                sequential_keys(Ipv4Addr::new(10, 0, 0, 1), RANDOM_KEYS as u32 * 2),
            ),
            (
                "172.16.0.0/16",
                sequential_keys(Ipv4Addr::new(172, 16, 0, 0), 1 << 16),
            ),
        ];
        for (name, keys) in &sets {
            for workers in [4u32, 10, 32, 64] {
                let busiest = busiest_over_mean(keys, workers);
                // What chance alone gives: about 4 standard deviations of a worker's count,
                // plus the table's rounding (ceil(4096 / N) over 4096 / N).
                let mean = keys.len() as f64 / f64::from(workers);
                let rounding =
                    BUCKETS.div_ceil(workers as usize) as f64 * f64::from(workers) / BUCKETS as f64;
                let limit = rounding * (1.0 + 4.0 / mean.sqrt());
                eprintln!(
                    "{name}: {} keys over {workers} workers: busiest {busiest:.4} of the mean \
                     (limit {limit:.4})",
                    keys.len()
                );
                assert!(busiest <= limit, "{name}, {workers}: {busiest} > {limit}");
            }
        }
    }

    #[test]
    fn seed_changes_mapping_and_is_stable() {
        // Stable: a seeded mapping is part of the contract (it must survive restarts and
        // upgrades), so it is pinned like the unseeded one: (address, hash with seed
        // 0x5eed, worker of 10).
        let golden: [(&str, u32, u32); 8] = [
            ("127.0.0.1", 0x4e10_1a27, 3),
            ("10.0.0.1", 0x4f7d_b87b, 3),
            ("192.0.2.1", 0x86ae_fdab, 1),
            ("8.8.8.8", 0x8878_c9f6, 1),
            ("1.1.1.1", 0xce96_7518, 7),
            ("::1", 0x7e5c_b23a, 6),
            ("2001:db8::1", 0x87a6_d17a, 1),
            ("203.0.113.7", 0x1571_b25b, 0),
        ];
        let seeded = Router::new(nz(10), 32, 64, 0x5eed);
        for (addr, hash, worker) in golden {
            let key = seeded.key(Some(ip(addr)));
            assert_eq!(key_hash(&key, 0x5eed), hash, "hash of {addr}");
            assert_eq!(seeded.worker_for(&key), worker, "{addr} with seed 0x5eed");
        }
        // Changes: independent mappings agree on about 1/10 of the keys.
        let keys = random_keys(10_000, 3);
        let unseeded = default_router(10);
        let changed = keys
            .iter()
            .filter(|key| unseeded.worker_for(key) != seeded.worker_for(key))
            .count();
        assert!(changed > keys.len() * 8 / 10, "only {changed} changed");
    }

    #[test]
    fn failover_never_returns_primary_or_dead() {
        let router = default_router(8);
        let mut rng = SmallRng::seed_from_u64(4);
        for key in random_keys(5_000, 5) {
            let live_mask: u8 = rng.random();
            let is_live = |w: u32| live_mask & (1 << w) != 0;
            let primary = router.worker_for(&key);
            let other_live = (0..8).any(|w| w != primary && is_live(w));
            match router.failover_for(&key, is_live) {
                Some(w) => {
                    assert!(w < 8);
                    assert_ne!(w, primary);
                    assert!(is_live(w), "{w} is dead (mask {live_mask:#010b})");
                }
                None => assert!(!other_live, "a live worker was missed"),
            }
        }
    }

    #[test]
    fn failover_none_when_only_primary_live() {
        let router = default_router(5);
        for key in random_keys(1_000, 6) {
            let primary = router.worker_for(&key);
            assert_eq!(router.failover_for(&key, |w| w == primary), None);
            assert_eq!(router.failover_for(&key, |_| false), None);
        }
        // With a single worker there is never another one.
        let single = default_router(1);
        assert_eq!(single.failover_for(&RoutingKey::NONE, |_| true), None);
    }

    #[test]
    fn failover_is_deterministic() {
        // Pinned, so a client fails over to the same worker in every release: 6 workers,
        // seed 7, only workers 1 and 4 live; (address, primary, failover).
        let golden: [(&str, u32, u32); 8] = [
            ("127.0.0.1", 3, 1),
            ("10.0.0.1", 2, 1),
            ("192.0.2.1", 0, 4),
            ("8.8.8.8", 3, 1),
            ("1.1.1.1", 4, 1),
            ("::1", 3, 1),
            ("2001:db8::1", 0, 1),
            ("203.0.113.7", 2, 1),
        ];
        let router = Router::new(nz(6), 32, 64, 7);
        let live = |w: u32| w == 1 || w == 4;
        for (addr, primary, failover) in golden {
            let key = router.key(Some(ip(addr)));
            assert_eq!(router.worker_for(&key), primary, "{addr}");
            assert_eq!(router.failover_for(&key, live), Some(failover), "{addr}");
        }
    }

    #[test]
    fn failover_spreads_dead_workers_keys() {
        let router = default_router(4);
        let dead = 2;
        let mut counts = [0usize; 4];
        let mut orphans = 0usize;
        for key in random_keys(20_000, 8) {
            if router.worker_for(&key) == dead {
                orphans += 1;
                let w = router.failover_for(&key, |w| w != dead).unwrap();
                counts[w as usize] += 1;
            }
        }
        assert_eq!(counts[dead as usize], 0);
        for w in [0, 1, 3] {
            // About a third each; a quarter catches piling onto a neighbour.
            assert!(
                counts[w] * 4 > orphans,
                "worker {w} got {} of {orphans}: {counts:?}",
                counts[w]
            );
        }
    }

    #[test]
    fn none_key_routes_without_panic() {
        let router = Router::new(nz(7), 24, 48, 11);
        let key = router.key(None);
        assert_eq!(key, RoutingKey::NONE);
        assert!(key.as_bytes().is_empty());
        assert!(router.worker_for(&key) < 7);
        assert_eq!(router.workers().get(), 7);
        let primary = router.worker_for(&key);
        let other = router.failover_for(&key, |_| true).unwrap();
        assert_ne!(other, primary);
    }
}
