//! Run-time CPU feature detection, cached, so fast paths are chosen per machine, not at build time.

use std::sync::OnceLock;

#[derive(Clone, Copy, Debug)]
pub struct CpuFeatures {
    pub avx2: bool,
    pub fma: bool,
    pub f16c: bool,
    pub avx512f: bool,
    pub avx512bw: bool,
    /// AVX512-VNNI with AVX512-VL: `vpdpbusd` on 256-bit registers.
    pub avx512vnni: bool,
}

pub fn features() -> CpuFeatures {
    static FEATURES: OnceLock<CpuFeatures> = OnceLock::new();
    *FEATURES.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> CpuFeatures {
    // PYQMOE_NO_SIMD=1 forces the scalar reference paths (for debugging and A/B measurements).
    if std::env::var_os("PYQMOE_NO_SIMD").is_some_and(|v| v != "0") {
        return CpuFeatures {
            avx2: false,
            fma: false,
            f16c: false,
            avx512f: false,
            avx512bw: false,
            avx512vnni: false,
        };
    }
    CpuFeatures {
        avx2: is_x86_feature_detected!("avx2"),
        fma: is_x86_feature_detected!("fma"),
        f16c: is_x86_feature_detected!("f16c"),
        avx512f: is_x86_feature_detected!("avx512f"),
        avx512bw: is_x86_feature_detected!("avx512bw"),
        avx512vnni: is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl"),
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> CpuFeatures {
    CpuFeatures {
        avx2: false,
        fma: false,
        f16c: false,
        avx512f: false,
        avx512bw: false,
        avx512vnni: false,
    }
}

/// True when the AVX2 fast paths may run.
#[inline]
pub fn has_avx2() -> bool {
    features().avx2
}

/// The aarch64 fast paths: NEON, and the SDOT instruction (`dotprod`) where the CPU has it.
#[derive(Clone, Copy, Debug)]
pub struct ArmFeatures {
    pub neon: bool,
    pub dotprod: bool,
}

/// aarch64 features, cached; all false elsewhere and under PYQMOE_NO_SIMD.
pub fn arm_features() -> ArmFeatures {
    static FEATURES: OnceLock<ArmFeatures> = OnceLock::new();
    *FEATURES.get_or_init(detect_arm)
}

fn detect_arm() -> ArmFeatures {
    let none = ArmFeatures {
        neon: false,
        dotprod: false,
    };
    if std::env::var_os("PYQMOE_NO_SIMD").is_some_and(|v| v != "0") {
        return none;
    }
    #[cfg(target_arch = "aarch64")]
    return ArmFeatures {
        neon: std::arch::is_aarch64_feature_detected!("neon"),
        dotprod: std::arch::is_aarch64_feature_detected!("neon")
            && std::arch::is_aarch64_feature_detected!("dotprod"),
    };
    #[cfg(not(target_arch = "aarch64"))]
    none
}

/// Short description of the fast paths in use, for `pyqmoe inspect --system` and bench reports.
pub fn describe() -> String {
    let f = features();
    let mut parts = vec![];
    if f.avx512f && f.avx512bw {
        parts.push("avx512");
    }
    if f.avx512vnni {
        parts.push("avx512vnni");
    }
    if f.avx2 {
        parts.push("avx2");
    }
    if f.fma {
        parts.push("fma");
    }
    if f.f16c {
        parts.push("f16c");
    }
    let arm = arm_features();
    if arm.neon {
        parts.push("neon");
    }
    if arm.dotprod {
        parts.push("dotprod");
    }
    if parts.is_empty() {
        parts.push("scalar");
    }
    parts.join("+")
}
