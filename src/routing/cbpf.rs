//! The kernel's half of the routing: a classic BPF program that computes
//! [`Router::worker_for`] of a connection's source address, for
//! `SO_ATTACH_REUSEPORT_CBPF` ([`crate::link::attach_reuseport_cbpf`]).
//!
//! The kernel runs it for each new connection to a reuseport group and hands the
//! connection to the socket at the index it returns, so worker `k`'s listening socket
//! must be the group's `k`-th (the group's order is the order the sockets started
//! listening; an index beyond the group's size makes the kernel fall back to its own
//! hash, so a group must have at least `N` sockets). Its input is the packet: it reads the IP version at `SKF_NET_OFF`, then
//! the IPv4 source address (offset 12) or the IPv6 one (offsets 8 to 20; an IPv4-mapped
//! one is read as the IPv4 address it carries, like
//! [`RoutingKey::from_ip`](super::RoutingKey::from_ip) does).
//!
//! # Shape of the program
//!
//! 1. The module documentation's hash, unrolled: one block per key word, prefixes as
//!    `and` masks, the seed and the key length as immediates (a word the prefix masks
//!    away entirely is folded into constants), then the bucket, `h >> 20`.
//! 2. The bucket table, packed into immediates: `w` bits per worker index
//!    (`w = bits(N − 1)`), `floor(32 / w)` buckets per 32-bit word. Runs of words whose
//!    buckets all belong to one worker become one `ret #worker`; the others load their
//!    word, shift by the bucket's slot and mask (a shared tail). A binary search of
//!    `jge` jumps over the runs' first buckets finds the right one; a jump too far for
//!    the 8-bit offsets goes through a `ja`.
//!
//! The program grows with `N`, about three instructions per packed word: some 160
//! instructions for 4 workers, 1,300 for 32, 2,000 for 64, 3,000 for 256 (8-bit indexes,
//! 1,024 words). [`MAX_WORKERS`] = 256 is where it still fits the kernel's limit of
//! [`MAX_INSTRUCTIONS`] with room to spare; from 257 workers on, 9-bit indexes pack 3 to
//! a word and the table alone needs more than 4,096. Larger counts keep the userspace
//! routing ([`Router`] is defined for every `N`), not the kernel's.

use super::{bucket_of, finish, fold_seed, ipv4_mask, murmur, Router, BUCKETS, BUCKET_BITS};

/// One classic BPF instruction, laid out as the kernel's `struct sock_filter`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Instruction {
    /// Operation: class, size or operation, mode or source (`BPF_*` bits).
    pub code: u16,
    /// Forward jump when a conditional jump's test holds.
    pub jt: u8,
    /// Forward jump when it does not.
    pub jf: u8,
    /// The immediate: a constant, an offset or a memory slot.
    pub k: u32,
}

/// Most instructions the kernel accepts in a classic program (`BPF_MAXINSNS`).
pub const MAX_INSTRUCTIONS: usize = 4096;

/// The largest worker count the kernel program serves: every `N` up to it fits
/// [`MAX_INSTRUCTIONS`] whatever the prefixes and the seed (checked by a test).
pub const MAX_WORKERS: u32 = 256;

/// The worker count is above [`MAX_WORKERS`]: the kernel cannot route for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the kernel's routing program serves at most {MAX_WORKERS} workers, not {0}: \
     connections go through the dispatcher"
)]
pub struct TooManyWorkers(pub u32);

/// The `BPF_*` opcode bits of `linux/bpf_common.h` and `linux/filter.h`, the few we emit.
mod op {
    // Classes.
    pub(super) const LD: u16 = 0x00;
    pub(super) const LDX: u16 = 0x01;
    pub(super) const ST: u16 = 0x02;
    pub(super) const ALU: u16 = 0x04;
    pub(super) const JMP: u16 = 0x05;
    pub(super) const RET: u16 = 0x06;
    pub(super) const MISC: u16 = 0x07;
    // Load sizes.
    pub(super) const W: u16 = 0x00;
    pub(super) const B: u16 = 0x10;
    // Load modes.
    pub(super) const IMM: u16 = 0x00;
    pub(super) const ABS: u16 = 0x20;
    pub(super) const MEM: u16 = 0x60;
    // ALU operations.
    pub(super) const ADD: u16 = 0x00;
    pub(super) const SUB: u16 = 0x10;
    pub(super) const MUL: u16 = 0x20;
    pub(super) const DIV: u16 = 0x30;
    pub(super) const OR: u16 = 0x40;
    pub(super) const AND: u16 = 0x50;
    pub(super) const LSH: u16 = 0x60;
    pub(super) const RSH: u16 = 0x70;
    pub(super) const XOR: u16 = 0xa0;
    // Jumps.
    pub(super) const JA: u16 = 0x00;
    pub(super) const JEQ: u16 = 0x10;
    pub(super) const JGE: u16 = 0x30;
    // Operand: the immediate K or the register X; RET's A.
    pub(super) const K: u16 = 0x00;
    pub(super) const X: u16 = 0x08;
    pub(super) const A: u16 = 0x10;
    // MISC: A → X.
    pub(super) const TAX: u16 = 0x00;
}

/// `SKF_NET_OFF` (-0x100000) as the unsigned offset of an absolute load: loads from
/// `SKF_NET_OFF + n` read byte `n` of the network header.
const NET: u32 = 0xfff0_0000;

/// Scratch memory slots.
const M_HASH: u32 = 0;
const M_TEMP: u32 = 1;
const M_BUCKET: u32 = 2;

/// Marks a leaf's `ja` to the shared tail until the tail's place is known.
const TO_TAIL: u32 = u32::MAX;

/// The longest conditional jump (its offsets are 8 bits).
const MAX_SHORT_JUMP: usize = u8::MAX as usize;

fn stmt(code: u16, k: u32) -> Instruction {
    Instruction {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: usize, jf: usize) -> Instruction {
    Instruction {
        code: op::JMP | code | op::K,
        // Callers check the distances against MAX_SHORT_JUMP.
        jt: u8::try_from(jt).expect("short jump"),
        jf: u8::try_from(jf).expect("short jump"),
        k,
    }
}

fn alu(operation: u16, k: u32) -> Instruction {
    stmt(op::ALU | operation | op::K, k)
}

fn alu_x(operation: u16) -> Instruction {
    stmt(op::ALU | operation | op::X, 0)
}

fn load_net_word(offset: u32) -> Instruction {
    stmt(op::LD | op::W | op::ABS, NET + offset)
}

/// The program that routes like `router` (its worker count, prefixes and seed), or
/// [`TooManyWorkers`] above [`MAX_WORKERS`].
pub fn program(router: &Router) -> Result<Vec<Instruction>, TooManyWorkers> {
    let workers = router.workers().get();
    if workers > MAX_WORKERS {
        return Err(TooManyWorkers(workers));
    }
    let program = build(router);
    // MAX_WORKERS is chosen so that every program fits (a test builds them all).
    debug_assert!(program.len() <= MAX_INSTRUCTIONS);
    Ok(program)
}

/// The program of a router with at most [`MAX_WORKERS`] workers.
fn build(router: &Router) -> Vec<Instruction> {
    let workers = router.workers().get();
    if workers == 1 {
        return vec![stmt(op::RET | op::K, 0)];
    }
    let seed = fold_seed(router.seed);

    // The IPv4 hash starts with the address in A (loaded by the header below).
    let mut v4 = Vec::new();
    hash(&mut v4, &[(None, ipv4_mask(router.ipv4_prefix))], seed);
    let v6_masks = ipv6_word_masks(router.ipv6_prefix);
    let v6_words: Vec<(Option<u32>, u32)> = (0..4)
        .map(|i| (Some(8 + 4 * i as u32), v6_masks[i]))
        .collect();
    let mut v6 = Vec::new();
    hash(&mut v6, &v6_words, seed);
    let lookup = lookup(&router.table[..], workers);

    // The header: the IP version, and an IPv4-mapped IPv6 source (::ffff:a.b.c.d) read
    // as IPv4. Indexes: 0-2 version, 3-10 mapped check, 11 IPv4 load, 12.. IPv4 hash,
    // then `ja` over the IPv6 hash, the IPv6 hash, the lookup.
    const V4_LOAD: usize = 11;
    let v6_start = V4_LOAD + 1 + v4.len() + 1;
    let to_v6 = |from: usize| v6_start - (from + 1);
    assert!(to_v6(4) <= MAX_SHORT_JUMP, "the IPv4 hash is short");
    let mut out = vec![
        stmt(op::LD | op::B | op::ABS, NET),
        alu(op::AND, 0xf0),
        jump(op::JEQ, 0x60, 0, V4_LOAD - 3),
        load_net_word(8),
        jump(op::JEQ, 0, 0, to_v6(4)),
        load_net_word(12),
        jump(op::JEQ, 0, 0, to_v6(6)),
        load_net_word(16),
        jump(op::JEQ, 0xffff, 0, to_v6(8)),
        load_net_word(20),
        stmt(op::JMP | op::JA, 1),
        load_net_word(12),
    ];
    out.extend(v4);
    out.push(stmt(op::JMP | op::JA, v6.len() as u32));
    out.extend(v6);
    out.extend(lookup);
    out
}

/// The masks of the four words of an IPv6 address for a prefix length (clamped to 128).
fn ipv6_word_masks(prefix: u8) -> [u32; 4] {
    let prefix = u32::from(prefix.min(128));
    std::array::from_fn(|i| {
        let bits = prefix.saturating_sub(32 * i as u32).min(32);
        // bits <= 32, so the conversion is exact.
        ipv4_mask(bits as u8)
    })
}

/// `A = rotl(A, r)`, with `M_TEMP` as scratch.
fn rotate_left(out: &mut Vec<Instruction>, r: u32) {
    out.extend([
        stmt(op::ST, M_TEMP),
        alu(op::LSH, r),
        stmt(op::MISC | op::TAX, 0),
        stmt(op::LD | op::MEM, M_TEMP),
        alu(op::RSH, 32 - r),
        alu_x(op::OR),
    ]);
}

/// The hash of the key words (`Some(offset)` in the network header, or `None`: already
/// in A, first word only) with their masks, leaving the bucket in A.
fn hash(out: &mut Vec<Instruction>, words: &[(Option<u32>, u32)], seed: u32) {
    // The hash so far: a constant while every word was masked away, else in A.
    let mut constant = Some(seed);
    for &(source, mask) in words {
        if mask == 0 {
            // k = 0 and h ^ 0 = h: only h's own steps remain.
            match constant.as_mut() {
                Some(h) => {
                    *h = h
                        .rotate_left(murmur::R2)
                        .wrapping_mul(murmur::M)
                        .wrapping_add(murmur::N);
                }
                None => {
                    rotate_left(out, murmur::R2);
                    out.push(alu(op::MUL, murmur::M));
                    out.push(alu(op::ADD, murmur::N));
                }
            }
            continue;
        }
        if constant.is_none() {
            out.push(stmt(op::ST, M_HASH));
        }
        if let Some(offset) = source {
            out.push(load_net_word(offset));
        }
        if mask != u32::MAX {
            out.push(alu(op::AND, mask));
        }
        out.push(alu(op::MUL, murmur::C1));
        rotate_left(out, murmur::R1);
        out.push(alu(op::MUL, murmur::C2));
        match constant.take() {
            Some(h) => out.push(alu(op::XOR, h)),
            None => out.extend([stmt(op::LDX | op::MEM, M_HASH), alu_x(op::XOR)]),
        }
        rotate_left(out, murmur::R2);
        out.push(alu(op::MUL, murmur::M));
        out.push(alu(op::ADD, murmur::N));
    }
    // Word count * 4 is the key length: 4 or 16 bytes.
    let len = 4 * words.len() as u32;
    if let Some(h) = constant {
        // bucket_of < BUCKETS, so it fits.
        out.push(stmt(op::LD | op::IMM, bucket_of(finish(h, len)) as u32));
        return;
    }
    out.extend([
        alu(op::XOR, len),
        stmt(op::MISC | op::TAX, 0),
        alu(op::RSH, 16),
        alu_x(op::XOR),
        alu(op::MUL, murmur::F1),
        stmt(op::MISC | op::TAX, 0),
        alu(op::RSH, 13),
        alu_x(op::XOR),
        alu(op::MUL, murmur::F2),
        // The last step, h ^= h >> 16, only changes the low 16 bits: the bucket, the top
        // 12, is the same without it.
        alu(op::RSH, 32 - BUCKET_BITS),
    ]);
}

/// A run of buckets in the packed table.
#[derive(Clone, Copy)]
struct Segment {
    /// Its first bucket.
    start: u32,
    kind: SegmentKind,
}

#[derive(Clone, Copy)]
enum SegmentKind {
    /// Every bucket of the run belongs to this worker.
    Uniform(u32),
    /// One word of packed worker indexes.
    Packed(u32),
}

/// With the bucket in A: the table lookup, returning the worker.
fn lookup(table: &[u16], workers: u32) -> Vec<Instruction> {
    // 2 <= workers <= MAX_WORKERS = 256 here, so 1 <= bits <= 8 and per_word >= 4.
    let bits = 32 - (workers - 1).leading_zeros();
    let per_word = (32 / bits) as usize;
    let mut segments: Vec<Segment> = Vec::new();
    for (index, word) in table.chunks(per_word).enumerate() {
        let start = (index * per_word) as u32;
        let first = u32::from(word[0]);
        if word.iter().all(|&w| u32::from(w) == first) {
            if let Some(Segment {
                kind: SegmentKind::Uniform(last),
                ..
            }) = segments.last()
            {
                if *last == first {
                    continue;
                }
            }
            segments.push(Segment {
                start,
                kind: SegmentKind::Uniform(first),
            });
        } else {
            let packed = word.iter().enumerate().fold(0u32, |acc, (slot, &w)| {
                acc | u32::from(w) << (slot as u32 * bits)
            });
            segments.push(Segment {
                start,
                kind: SegmentKind::Packed(packed),
            });
        }
    }
    let any_packed = segments
        .iter()
        .any(|s| matches!(s.kind, SegmentKind::Packed(_)));
    let mut out = Vec::new();
    if any_packed {
        // X = the bucket's slot in its word * bits: the shift that brings its index down.
        out.extend([
            stmt(op::ST, M_BUCKET),
            alu(op::DIV, per_word as u32),
            alu(op::MUL, per_word as u32),
            stmt(op::MISC | op::TAX, 0),
            stmt(op::LD | op::MEM, M_BUCKET),
            alu_x(op::SUB),
            alu(op::MUL, bits),
            stmt(op::MISC | op::TAX, 0),
            stmt(op::LD | op::MEM, M_BUCKET),
        ]);
    }
    let tree_start = out.len();
    out.extend(search(&segments));
    if any_packed {
        let tail = out.len();
        for (i, insn) in out.iter_mut().enumerate().skip(tree_start) {
            if insn.code == op::JMP | op::JA && insn.k == TO_TAIL {
                insn.k = (tail - (i + 1)) as u32;
            }
        }
        out.extend([
            alu_x(op::RSH),
            alu(op::AND, (1 << bits) - 1),
            stmt(op::RET | op::A, 0),
        ]);
    }
    debug_assert!(BUCKETS.div_ceil(per_word) >= segments.len());
    out
}

/// Binary search of `segments` (non-empty, ascending) on the bucket in A.
fn search(segments: &[Segment]) -> Vec<Instruction> {
    if let [segment] = segments {
        return match segment.kind {
            SegmentKind::Uniform(worker) => vec![stmt(op::RET | op::K, worker)],
            SegmentKind::Packed(word) => vec![
                stmt(op::LD | op::IMM, word),
                stmt(op::JMP | op::JA, TO_TAIL),
            ],
        };
    }
    let middle = segments.len() / 2;
    let (left, right) = (search(&segments[..middle]), search(&segments[middle..]));
    let split = segments[middle].start;
    let mut out = Vec::with_capacity(left.len() + right.len() + 2);
    if left.len() <= MAX_SHORT_JUMP {
        out.push(jump(op::JGE, split, left.len(), 0));
    } else {
        out.push(jump(op::JGE, split, 0, 1));
        out.push(stmt(op::JMP | op::JA, left.len() as u32));
    }
    out.extend(left);
    out.extend(right);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::RoutingKey;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    use std::num::NonZeroU32;

    /// Runs `program` on a packet whose network header is `net`, as the kernel would
    /// (the subset of classic BPF that [`program`] emits), checking what the kernel's
    /// checker checks on the way: jumps stay inside, memory is stored before it is read.
    fn run(program: &[Instruction], net: &[u8]) -> u32 {
        let (mut a, mut x, mut pc) = (0u32, 0u32, 0usize);
        let mut mem: [Option<u32>; 16] = [None; 16];
        let load = |k: u32, size: usize| -> u32 {
            let at = k
                .checked_sub(NET)
                .expect("loads are from the network header") as usize;
            net[at..at + size]
                .iter()
                .fold(0, |acc, &b| acc << 8 | u32::from(b))
        };
        loop {
            let i = program[pc];
            pc += 1;
            let operand = if i.code & op::X != 0 { x } else { i.k };
            match i.code & 0x07 {
                op::LD => {
                    a = match i.code & 0xf8 {
                        m if m == op::W | op::ABS => load(i.k, 4),
                        m if m == op::B | op::ABS => load(i.k, 1),
                        op::IMM => i.k,
                        op::MEM => mem[i.k as usize].expect("memory read before written"),
                        other => panic!("load {other:#x}"),
                    }
                }
                op::LDX => {
                    assert_eq!(i.code, op::LDX | op::MEM);
                    x = mem[i.k as usize].expect("memory read before written");
                }
                op::ST => mem[i.k as usize] = Some(a),
                op::ALU => {
                    a = match i.code & 0xf0 {
                        op::ADD => a.wrapping_add(operand),
                        op::SUB => a.wrapping_sub(operand),
                        op::MUL => a.wrapping_mul(operand),
                        op::DIV => a / operand,
                        op::OR => a | operand,
                        op::AND => a & operand,
                        op::LSH => a << operand,
                        op::RSH => a >> operand,
                        op::XOR => a ^ operand,
                        other => panic!("alu {other:#x}"),
                    }
                }
                op::JMP => {
                    let taken = match i.code & 0xf0 {
                        op::JA => {
                            pc += i.k as usize;
                            continue;
                        }
                        op::JEQ => a == operand,
                        op::JGE => a >= operand,
                        other => panic!("jump {other:#x}"),
                    };
                    pc += usize::from(if taken { i.jt } else { i.jf });
                }
                op::RET => return if i.code & op::A != 0 { a } else { i.k },
                op::MISC => {
                    assert_eq!(i.code, op::MISC | op::TAX);
                    x = a;
                }
                other => panic!("class {other:#x}"),
            }
            assert!(pc < program.len(), "ran off the end");
        }
    }

    /// The network header of a packet from `source` (the rest of the header is noise the
    /// program must not read).
    fn packet(source: IpAddr) -> Vec<u8> {
        match source {
            IpAddr::V4(v4) => {
                let mut header = vec![0x45, 0, 0, 60, 1, 2, 0x40, 0, 64, 6, 0xab, 0xcd];
                header.extend(v4.octets());
                header.extend([127, 0, 0, 1]);
                header
            }
            IpAddr::V6(v6) => {
                let mut header = vec![0x60, 0x0a, 0xbc, 0xde, 0, 40, 6, 64];
                header.extend(v6.octets());
                header.extend(Ipv6Addr::LOCALHOST.octets());
                header
            }
        }
    }

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    /// Random sources: IPv4, IPv6 (some with few bits set), IPv4-mapped.
    fn sources(count: usize, rng_seed: u64) -> Vec<IpAddr> {
        let mut rng = SmallRng::seed_from_u64(rng_seed);
        (0..count)
            .map(|i| match i % 4 {
                0 => IpAddr::V4(Ipv4Addr::from(rng.random::<u32>())),
                1 => IpAddr::V6(Ipv6Addr::from(rng.random::<u128>())),
                2 => IpAddr::V6(Ipv4Addr::from(rng.random::<u32>()).to_ipv6_mapped()),
                _ => IpAddr::V6(Ipv6Addr::from(
                    rng.random::<u128>() & 0xffff_0000_ffff_0000_0000_0000_0000_00ff,
                )),
            })
            .collect()
    }

    /// The program's choice equals `Router::worker_for` on `count` sources.
    fn check(router: &Router, count: usize, rng_seed: u64) -> usize {
        let program = program(router).unwrap();
        assert!(program.len() <= MAX_INSTRUCTIONS);
        for source in sources(count, rng_seed) {
            let expected = router.worker_for(&router.key(Some(source)));
            assert_eq!(
                run(&program, &packet(source)),
                expected,
                "{source} over {} workers",
                router.workers()
            );
        }
        program.len()
    }

    #[test]
    fn program_routes_like_the_router() {
        let mut checked = 0;
        for workers in 1..=64 {
            checked += 1000;
            check(
                &Router::new(nz(workers), 32, 64, 0),
                1000,
                u64::from(workers),
            );
        }
        for workers in [65, 100, 127, 128, 129, 200, 255, 256] {
            checked += 2000;
            check(
                &Router::new(nz(workers), 32, 64, 0),
                2000,
                u64::from(workers),
            );
        }
        let mut rng = SmallRng::seed_from_u64(99);
        for round in 0..60 {
            let workers = rng.random_range(2..=MAX_WORKERS);
            let (v4, v6) = (rng.random_range(0..=33), rng.random_range(0..=129));
            let seed = if round % 3 == 0 { 0 } else { rng.random() };
            let router = Router::new(nz(workers), v4, v6, seed);
            checked += 1000;
            check(&router, 1000, round);
        }
        eprintln!("{checked} sources: the program's worker equals Router::worker_for");
    }

    #[test]
    fn program_handles_edge_keys() {
        let sources = [
            "0.0.0.0",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:0.0.0.0",
            "::ffff:255.255.255.255",
            // Not mapped: the words before the address differ from 0, 0, 0xffff.
            "::fffe:1.2.3.4",
            "0:0:1::ffff:1.2.3.4",
            "::1:ffff:1.2.3.4",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ];
        for (v4, v6) in [
            (32, 64),
            (0, 0),
            (32, 128),
            (1, 1),
            (31, 127),
            (8, 96),
            (24, 33),
        ] {
            for seed in [0, 1, u64::MAX, 0x5eed_0000_0000] {
                let router = Router::new(nz(10), v4, v6, seed);
                let program = program(&router).unwrap();
                for source in sources {
                    let source: IpAddr = source.parse().unwrap();
                    assert_eq!(
                        run(&program, &packet(source)),
                        router.worker_for(&router.key(Some(source))),
                        "{source} /{v4} /{v6} seed {seed:#x}"
                    );
                }
            }
        }
        // The empty key is not a source address: the kernel never sees it.
        let _ = RoutingKey::NONE;
    }

    #[test]
    fn every_worker_count_up_to_the_maximum_fits() {
        // The most instructions: every word partly masked (so none folds away), seeded.
        let mut largest = (0, 0);
        for workers in 1..=MAX_WORKERS {
            let router = Router::new(nz(workers), 31, 127, u64::MAX);
            let length = program(&router).unwrap().len();
            assert!(length <= MAX_INSTRUCTIONS, "{workers}: {length}");
            largest = largest.max((length, workers));
        }
        eprintln!(
            "largest program: {} instructions ({} workers)",
            largest.0, largest.1
        );
        for workers in [2, 4, 10, 32, 64, 128, 256] {
            let length = program(&Router::new(nz(workers), 32, 64, 0)).unwrap().len();
            eprintln!("{workers} workers, default prefixes: {length} instructions");
        }
        assert_eq!(
            program(&Router::new(nz(MAX_WORKERS + 1), 32, 64, 0)),
            Err(TooManyWorkers(MAX_WORKERS + 1))
        );
    }

    #[test]
    fn jumps_stay_inside_and_go_forward() {
        for workers in [2, 7, 64, 200, MAX_WORKERS] {
            let program = program(&Router::new(nz(workers), 32, 64, 3)).unwrap();
            for (i, insn) in program.iter().enumerate() {
                if insn.code & 0x07 == op::JMP {
                    let far = if insn.code & 0xf0 == op::JA {
                        insn.k as usize
                    } else {
                        usize::from(insn.jt.max(insn.jf))
                    };
                    assert!(i + 1 + far < program.len(), "{workers}: jump at {i}");
                }
            }
            let last = program.last().unwrap();
            assert_eq!(last.code & 0x07, op::RET, "{workers}: ends with a return");
        }
    }
}
