//! Placeholder until the integer dot kernels of this family land: every type here still goes
//! through the f32 conversion path in `matmul`.

use super::DotKernels;
use crate::types::GgmlType;

pub fn kernels(_ty: GgmlType) -> Option<DotKernels> {
    None
}
