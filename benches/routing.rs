//! Microbenchmarks of the per-connection routing work: key from the peer IP, the 32-bit
//! hash of the key, `Router::worker_for` (hash, bucket, table), and building a router
//! (its bucket table).
//!
//! ```text
//! cargo bench --bench routing
//! ```
//!
//! Each measurement runs over 65536 fixed random inputs and criterion reports the time per
//! input (see "thrpt"; divide "time" by 65536). So many, because few inputs repeated let
//! the branch predictor and the caches learn them: a stream of new clients is slower.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::num::NonZeroU32;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sticky_dispatch::routing::{key_hash, Router, RoutingKey};

const INPUTS: usize = 1 << 16;

fn v4_addresses() -> Vec<IpAddr> {
    let mut rng = SmallRng::seed_from_u64(1);
    (0..INPUTS)
        .map(|_| IpAddr::V4(Ipv4Addr::from(rng.random::<u32>())))
        .collect()
}

fn v6_addresses() -> Vec<IpAddr> {
    let mut rng = SmallRng::seed_from_u64(2);
    (0..INPUTS)
        .map(|_| IpAddr::V6(Ipv6Addr::from(rng.random::<u128>())))
        .collect()
}

fn router(workers: u32) -> Router {
    Router::new(NonZeroU32::new(workers).expect("non-zero"), 32, 64, 0)
}

/// Runs `f` over every input, reporting time per input.
fn per_input<T, R>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    id: BenchmarkId,
    inputs: &[T],
    f: impl Fn(&T) -> R,
) {
    group.bench_with_input(id, inputs, |b, inputs| {
        b.iter(|| {
            for input in inputs {
                black_box(f(black_box(input)));
            }
        })
    });
}

fn routing(c: &mut Criterion) {
    let families = [("v4", v4_addresses()), ("v6", v6_addresses())];
    let four = router(4);

    let mut group = c.benchmark_group("key");
    group.throughput(Throughput::Elements(INPUTS as u64));
    for (family, addresses) in &families {
        per_input(
            &mut group,
            BenchmarkId::new("from_ip", family),
            addresses,
            |&ip| four.key(Some(ip)),
        );
    }
    group.finish();

    let mut group = c.benchmark_group("key_hash");
    group.throughput(Throughput::Elements(INPUTS as u64));
    for (family, addresses) in &families {
        let keys: Vec<RoutingKey> = addresses.iter().map(|&ip| four.key(Some(ip))).collect();
        per_input(
            &mut group,
            BenchmarkId::new("murmur3_be", family),
            &keys,
            |key| key_hash(key, 0),
        );
    }
    group.finish();

    // Once per start or reload, and per call of the tests' expected_worker.
    let mut group = c.benchmark_group("router_new");
    for workers in [4u32, 64, 256, 4096] {
        let workers = NonZeroU32::new(workers).expect("non-zero");
        group.bench_with_input(
            BenchmarkId::from_parameter(workers),
            &workers,
            |b, &workers| b.iter(|| Router::new(black_box(workers), 32, 64, 0)),
        );
    }
    group.finish();

    let mut group = c.benchmark_group("worker_for");
    group.throughput(Throughput::Elements(INPUTS as u64));
    for workers in [1u32, 4, 16, 64] {
        let router = router(workers);
        for (family, addresses) in &families {
            let keys: Vec<RoutingKey> = addresses.iter().map(|&ip| router.key(Some(ip))).collect();
            per_input(
                &mut group,
                BenchmarkId::new(*family, workers),
                &keys,
                |key| router.worker_for(key),
            );
        }
    }
    group.finish();

    // What the acceptor does per connection: the peer IP in, the worker index out.
    let mut group = c.benchmark_group("route");
    group.throughput(Throughput::Elements(INPUTS as u64));
    for workers in [4u32, 16, 64] {
        let router = router(workers);
        for (family, addresses) in &families {
            per_input(
                &mut group,
                BenchmarkId::new(*family, workers),
                addresses,
                |&ip| router.worker_for(&router.key(Some(ip))),
            );
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // Shorter than the defaults: about 25 benchmarks, and each is stable within seconds.
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(3));
    targets = routing
}
criterion_main!(benches);
