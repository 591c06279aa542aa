//! Single-thread throughput of every type's row kernels (`supported_types()`, so types added later
//! are covered without editing this file) on a 4096×256 heavy-tailed matrix.
//!
//!     cargo bench -p pyqmoe-core --bench quant             # all types
//!     cargo bench -p pyqmoe-core --bench quant -- Q4_0     # a filter

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pyqmoe_core::quant::{kernels, supported_types, testdata};

const N_PER_ROW: usize = 256;
const N_ROWS: usize = 4096;

fn bench_types(c: &mut Criterion) {
    let x = testdata::heavy_tailed(42, N_ROWS * N_PER_ROW);
    let imatrix = testdata::importance(43, N_PER_ROW);
    for ty in supported_types() {
        let k = kernels(ty).unwrap();
        let row_bytes = ty.row_size(N_PER_ROW).unwrap();
        let mut q = vec![0u8; N_ROWS * row_bytes];
        let mut y = vec![0f32; N_ROWS * N_PER_ROW];
        let mut group = c.benchmark_group(ty.name());
        group.throughput(Throughput::Elements((N_ROWS * N_PER_ROW) as u64));
        let quantize_all = |w: Option<&[f32]>, q: &mut [u8]| {
            for (src, dst) in x.chunks_exact(N_PER_ROW).zip(q.chunks_exact_mut(row_bytes)) {
                (k.quantize_row)(black_box(src), dst, w);
            }
        };
        if !k.requires_imatrix {
            group.bench_function("quantize", |b| b.iter(|| quantize_all(None, &mut q)));
        }
        if !ty.is_float() {
            group.bench_function("quantize_imatrix", |b| {
                b.iter(|| quantize_all(Some(&imatrix), &mut q))
            });
        }
        quantize_all(k.requires_imatrix.then_some(&imatrix[..]), &mut q);
        group.bench_function("dequantize", |b| {
            b.iter(|| {
                for (src, dst) in q.chunks_exact(row_bytes).zip(y.chunks_exact_mut(N_PER_ROW)) {
                    (k.dequantize_row)(black_box(src), dst);
                }
            })
        });
        group.finish();
    }
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_types
}
criterion_main!(benches);
