//! Fuzzes the GGUF header parser: any byte string must give Ok or Err, never a panic, an abort or
//! an out-of-bounds read; when it is accepted, every tensor extent must lie inside the input.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use pyqmoe_core::gguf::parse_header;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = parse_header(data, Path::new("fuzz.gguf"), data.len() as u64) {
        for t in &h.tensors {
            let start = (h.data_offset + t.offset) as usize;
            let end = start + t.nbytes as usize;
            assert!(end <= data.len(), "accepted tensor '{}' past the end", t.name);
            std::hint::black_box(&data[start..end]);
        }
        for (k, v) in &h.metadata {
            std::hint::black_box((k.len(), v.encoded_len()));
        }
    }
});
