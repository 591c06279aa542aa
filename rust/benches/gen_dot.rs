//! Generation kernels streaming weights from DRAM: one activation row against 35 MiB of 512- and
//! 4096-column rows (more than the L3), four rows per call as the engine does for one token.
//! Throughput is weight bytes per second, for the Q8_0 and Q4_K 4-row kernels and the one-row
//! Q6_K kernel. (The 4096-column rows are where a fixed 8 KiB prefetch distance fell short.)
//!
//!     cargo bench -p pyqmoe-core --bench gen_dot

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pyqmoe_core::model::vec_dot;
use pyqmoe_core::quant::{quantize, testdata};
use pyqmoe_core::types::GgmlType;

const WEIGHT_BYTES: usize = 35 << 20;

fn bench_stream(c: &mut Criterion) {
    let mut group = c.benchmark_group("gen_dot");
    for (ty, n_cols) in [GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q6_K]
        .into_iter()
        .flat_map(|ty| [(ty, 512), (ty, 4096)])
    {
        let k = vec_dot::kernels(ty).expect("integer kernels");
        let row_bytes = ty.row_size(n_cols).unwrap();
        let n_rows = (WEIGHT_BYTES / row_bytes) & !3;
        // one random row block repeated: quantizing 35 MiB of distinct rows would dominate set-up
        let block = quantize(
            "w",
            &testdata::heavy_tailed(7, 64 * n_cols),
            n_cols,
            ty,
            None,
        )
        .unwrap();
        let w: Vec<u8> = block
            .iter()
            .copied()
            .cycle()
            .take(n_rows * row_bytes)
            .collect();
        let rows: Vec<&[u8]> = w.chunks_exact(row_bytes).collect();
        let (act_block, act_bytes) = k.act_type.block_geometry();
        let mut a = vec![0u8; n_cols / act_block * act_bytes];
        (k.quantize_act)(&testdata::heavy_tailed(8, n_cols), &mut a);
        group.throughput(Throughput::Bytes(w.len() as u64));
        group.bench_function(format!("{} {n_cols} columns", ty.name()), |b| {
            b.iter(|| {
                let mut s = 0f32;
                match k.vec_dot_4rows {
                    Some(rows4) => {
                        for r in rows.chunks_exact(4) {
                            s += rows4([r[0], r[1], r[2], r[3]], black_box(&a))[0];
                        }
                    }
                    None => {
                        for r in &rows {
                            s += (k.vec_dot)(r, black_box(&a));
                        }
                    }
                }
                s
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(Duration::from_secs(3));
    targets = bench_stream
}
criterion_main!(benches);
