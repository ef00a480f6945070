//! FuseMoE fusion on the CPU, at the full specification shape (12 models: 13,184 → 1,536, 8
//! experts, hidden 4,096, top-2) and the two-model shape (minilm + mpnet: 1,152 → 1,536), batch
//! 1 and 32, each figure printed next to its floor:
//!
//! - batch 1: the chosen experts' weight bytes over this machine's memory bandwidth, measured
//!   here with a multithreaded streaming read (the gate's bytes are printed too: they are real
//!   traffic the floor leaves out);
//! - batch 32: the forward's FLOPs over a matrix-product rate measured here (the faster of
//!   candle's CPU matmul and the crate's own product on compute-bound shapes); and, because 32 rows spread over 8 experts leave each expert only ~8
//!   rows, the bandwidth floor of reading every used expert once, with the larger of the two
//!   as the roofline.
//!
//! Group `fusemoe_fusion`, ids `<shape>/batch <n>`. Specification target: fusion < 3 ms (on
//! GPU; the CPU figures and their floors are in docs/fusion.md).
//!
//! Also compares the crate's hand-rolled product with candle's matmul on one expert's fc1 at
//! batch 1 and 8. Run: `cargo bench -p embedfleet-benches --bench fusemoe`.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use criterion::{Criterion, SamplingMode};
use embedfleet_benches::pseudo_random;
use embedfleet_fusion::linear::linear_forward;
use embedfleet_fusion::{FuseMoe, FuseMoeConfig};
use rayon::prelude::*;

/// The catalogue's widths, E1..E12 (sum 13,184).
const ALL_MODEL_DIMS: [usize; 12] = [
    384, 1024, 768, 768, 1280, 768, 768, 768, 768, 768, 1024, 4096,
];
const TWO_MODEL_DIMS: [usize; 2] = [384, 768];

fn main() {
    let mut criterion = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();

    eprintln!(
        "fusemoe bench: {} rayon threads",
        rayon::current_num_threads()
    );
    let bandwidth = measure_bandwidth();
    eprintln!("memory bandwidth floor: {:.1} GB/s", bandwidth / 1e9);
    let matmul_rate = measure_matmul_rate();
    eprintln!(
        "matrix-product rate floor: {:.1} GFLOP/s",
        matmul_rate / 1e9
    );

    compare_with_candle(&mut criterion);

    let mut summary = Vec::new();
    for (label, dims) in [
        ("two-model 1152", &TWO_MODEL_DIMS[..]),
        ("full 13184", &ALL_MODEL_DIMS[..]),
    ] {
        eprintln!("building the seeded {label} layer ...");
        let started = Instant::now();
        let model = match FuseMoe::from_seed(FuseMoeConfig::for_input_dims(dims.to_vec()), 0) {
            Ok(model) => model,
            Err(e) => panic!("from_seed failed: {e}"),
        };
        eprintln!(
            "  built in {:.1} s: {:.0} MB per expert, {:.0} MB gate, version {}",
            started.elapsed().as_secs_f64(),
            model.expert_bytes() as f64 / 1e6,
            model.gate_bytes() as f64 / 1e6,
            model.version()
        );
        let partials: Vec<Vec<Vec<f32>>> = (0..32)
            .map(|row| {
                dims.iter()
                    .enumerate()
                    .map(|(s, &d)| pseudo_random(d, (row * 16 + s) as u64))
                    .collect()
            })
            .collect();
        for batch in [1usize, 32] {
            let rows: Vec<Vec<Option<&[f32]>>> = partials[..batch]
                .iter()
                .map(|row| row.iter().map(|p| Some(&p[..])).collect())
                .collect();
            let figure = bench_fuse(&mut criterion, &model, label, &rows);
            summary.push(floor_line(
                &model,
                label,
                &rows,
                figure,
                bandwidth,
                matmul_rate,
            ));
        }
    }

    eprintln!();
    eprintln!("FuseMoE CPU figures vs floors (median of criterion's samples):");
    for line in &summary {
        eprintln!("  {line}");
    }
    criterion.final_summary();
}

/// Benches `fuse_batch` on `rows` and returns the median time per call.
fn bench_fuse(
    criterion: &mut Criterion,
    model: &FuseMoe,
    label: &str,
    rows: &[Vec<Option<&[f32]>>],
) -> Duration {
    let samples = RefCell::new(Vec::new());
    let mut group = criterion.benchmark_group("fusemoe_fusion");
    group.sampling_mode(SamplingMode::Flat);
    group.bench_function(format!("{label}/batch {}", rows.len()), |b| {
        b.iter_custom(|iters| {
            let started = Instant::now();
            for _ in 0..iters {
                let fused = model.fuse_batch(rows);
                std::hint::black_box(&fused);
                assert!(fused.is_ok());
            }
            let elapsed = started.elapsed();
            samples.borrow_mut().push(elapsed / iters as u32);
            elapsed
        })
    });
    group.finish();
    median(samples.into_inner())
}

/// One summary line: figure, floor(s), ratio.
fn floor_line(
    model: &FuseMoe,
    label: &str,
    rows: &[Vec<Option<&[f32]>>],
    figure: Duration,
    bandwidth: f64,
    matmul_rate: f64,
) -> String {
    let cfg = model.config();
    let batch = rows.len();
    let ms = |seconds: f64| seconds * 1e3;
    let figure_s = figure.as_secs_f64();
    if batch == 1 {
        let expert_bytes = (cfg.top_k * model.expert_bytes()) as f64;
        let floor = expert_bytes / bandwidth;
        let with_gate = (expert_bytes + model.gate_bytes() as f64) / bandwidth;
        format!(
            "{label} batch 1: {:.2} ms; floor {:.2} ms ({:.0} MB of {} experts / {:.1} GB/s) → {:.2}×; \
             with the gate's {:.0} MB: {:.2} ms → {:.2}×",
            ms(figure_s),
            ms(floor),
            expert_bytes / 1e6,
            cfg.top_k,
            bandwidth / 1e9,
            figure_s / floor,
            model.gate_bytes() as f64 / 1e6,
            ms(with_gate),
            figure_s / with_gate,
        )
    } else {
        let (d, gin, gh) = (
            cfg.input_dim() as f64,
            cfg.gate_input_dim() as f64,
            cfg.gate_hidden as f64,
        );
        let (h, o, e, k) = (
            cfg.expert_hidden as f64,
            cfg.output_dim as f64,
            cfg.num_experts as f64,
            cfg.top_k as f64,
        );
        let flops =
            batch as f64 * (2.0 * gin * gh + 2.0 * gh * e + k * (2.0 * d * h + 2.0 * h * o));
        let compute_floor = flops / matmul_rate;
        let used = match model.route_batch(rows) {
            Ok(routes) => {
                let mut used = vec![false; cfg.num_experts];
                routes
                    .iter()
                    .flat_map(|r| &r.selected)
                    .for_each(|&x| used[x] = true);
                used.iter().filter(|&&u| u).count()
            }
            Err(_) => cfg.num_experts,
        };
        let bytes = (used * model.expert_bytes() + model.gate_bytes()) as f64;
        let bandwidth_floor = bytes / bandwidth;
        let roofline = compute_floor.max(bandwidth_floor);
        format!(
            "{label} batch {batch}: {:.1} ms; FLOP floor {:.1} ms ({:.2} GFLOP / {:.1} GFLOP/s) → {:.2}×; \
             bandwidth floor {:.1} ms ({} experts + gate, {:.0} MB) → {:.2}×; roofline {:.1} ms → {:.2}×",
            ms(figure_s),
            ms(compute_floor),
            flops / 1e9,
            matmul_rate / 1e9,
            figure_s / compute_floor,
            ms(bandwidth_floor),
            used,
            bytes / 1e6,
            figure_s / bandwidth_floor,
            ms(roofline),
            figure_s / roofline,
        )
    }
}

/// The crate's product against candle's matmul on one full-shape expert fc1 (4096 × 13184).
fn compare_with_candle(criterion: &mut Criterion) {
    let (n, k) = (4096usize, 13184usize);
    eprintln!("comparing matrix products on a {n} × {k} weight ...");
    let weight = pseudo_random(n * k, 1);
    let device = Device::Cpu;
    let weight_t = match Tensor::from_slice(&weight, (n, k), &device).and_then(|w| w.t()) {
        Ok(w) => w,
        Err(e) => panic!("candle tensor: {e}"),
    };
    let mut group = criterion.benchmark_group("product 4096x13184");
    group.sampling_mode(SamplingMode::Flat);
    for rows in [1usize, 8] {
        let x = pseudo_random(rows * k, 2);
        let mut out = vec![0.0f32; rows * n];
        group.bench_function(format!("fusion linear, {rows} rows"), |b| {
            b.iter(|| linear_forward(&x, k, rows, &weight, None, n, k, &mut out))
        });
        let x_tensor = match Tensor::from_slice(&x, (rows, k), &device) {
            Ok(t) => t,
            Err(e) => panic!("candle tensor: {e}"),
        };
        group.bench_function(format!("candle matmul, {rows} rows"), |b| {
            b.iter(|| std::hint::black_box(x_tensor.matmul(&weight_t).map(|t| t.dims().to_vec())))
        });
    }
    group.finish();
}

/// Bytes per second of the best streaming read we can do over 1 GiB (best of 5 passes of
/// each reader, split over rayon's threads): a plain sequential sum, and 4, 8 or 16
/// interleaved streams per thread with software prefetch (what the fusion kernel does). The
/// floor must not be beatable by the code it judges, so the fastest reader sets it.
fn measure_bandwidth() -> f64 {
    let buffer: Vec<f32> = (0..(1usize << 28)).map(|i| (i % 251) as f32).collect();
    let bytes = (buffer.len() * 4) as f64;
    let readers: [(&str, fn(&[f32]) -> f32); 4] = [
        ("sequential", sum_sequential),
        ("4 prefetched streams", sum_streams::<4>),
        ("8 prefetched streams", sum_streams::<8>),
        ("16 prefetched streams", sum_streams::<16>),
    ];
    let mut best = [f64::MAX; 4];
    for _ in 0..5 {
        for ((_, reader), best) in readers.iter().zip(best.iter_mut()) {
            let started = Instant::now();
            let total: f32 = buffer.par_chunks(1 << 22).map(reader).sum();
            std::hint::black_box(total);
            *best = best.min(started.elapsed().as_secs_f64());
        }
    }
    let report: Vec<String> = readers
        .iter()
        .zip(best)
        .map(|((name, _), seconds)| format!("{name} {:.1} GB/s", bytes / seconds / 1e9))
        .collect();
    eprintln!("  streaming read: {}", report.join(", "));
    bytes / best.iter().copied().fold(f64::MAX, f64::min)
}

/// 16 independent lanes so the sum does not serialise on one add chain.
fn sum_sequential(chunk: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    for block in chunk.chunks_exact(16) {
        for (l, v) in lanes.iter_mut().zip(block) {
            *l += v;
        }
    }
    lanes.iter().sum()
}

fn sum_streams<const STREAMS: usize>(chunk: &[f32]) -> f32 {
    let share = chunk.len() / STREAMS / 16 * 16;
    let streams: [&[f32]; STREAMS] = std::array::from_fn(|s| &chunk[s * share..(s + 1) * share]);
    let mut lanes = [[0.0f32; 16]; STREAMS];
    for offset in (0..share).step_by(16) {
        for (stream, lanes) in streams.iter().zip(lanes.iter_mut()) {
            prefetch(stream.as_ptr().wrapping_add(offset + 512));
            for (l, v) in lanes.iter_mut().zip(&stream[offset..offset + 16]) {
                *l += v;
            }
        }
    }
    lanes.iter().flatten().sum()
}

#[cfg(target_arch = "x86_64")]
fn prefetch(ptr: *const f32) {
    // SAFETY: a prefetch never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(ptr as *const i8)
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn prefetch(_ptr: *const f32) {}

/// FLOP/s of the faster of two f32 matrix products, best of 3 each: candle's CPU matmul (the
/// gemm crate) on 2048 × 2048 × 2048, and the fusion crate's own product on 256 rows against a
/// 2048 × 2048 weight (compute-bound shapes both; the faster one sets the floor).
fn measure_matmul_rate() -> f64 {
    let n = 2048usize;
    let device = Device::Cpu;
    let make = |seed| match Tensor::from_vec(pseudo_random(n * n, seed), (n, n), &device) {
        Ok(t) => t,
        Err(e) => panic!("candle tensor: {e}"),
    };
    let (a, b) = (make(11), make(12));
    let mut candle = f64::MAX;
    for _ in 0..3 {
        let started = Instant::now();
        let product = a.matmul(&b);
        std::hint::black_box(product.map(|p| p.dims().to_vec()).ok());
        candle = candle.min(started.elapsed().as_secs_f64());
    }
    let rows = 256usize;
    let (x, w) = (pseudo_random(rows * n, 13), pseudo_random(n * n, 14));
    let mut out = vec![0.0f32; rows * n];
    let mut own = f64::MAX;
    for _ in 0..3 {
        let started = Instant::now();
        linear_forward(&x, n, rows, &w, None, n, n, &mut out);
        own = own.min(started.elapsed().as_secs_f64());
    }
    let (candle, own) = (
        2.0 * (n as f64).powi(3) / candle,
        2.0 * (rows * n * n) as f64 / own,
    );
    eprintln!(
        "  candle matmul {:.1} GFLOP/s, fusion linear {:.1} GFLOP/s",
        candle / 1e9,
        own / 1e9
    );
    candle.max(own)
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples.get(samples.len() / 2).copied().unwrap_or_default()
}
