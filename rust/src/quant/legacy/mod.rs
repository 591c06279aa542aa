//! ggml's original 32-element block types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

pub mod q8_0;

pub use q8_0::Q8_0_KERNELS;
