/// ggml's variant (`ggml-cpu-<variant>`) and the `-mtune` CPU name GCC and Clang give its family.
pub const TUNING: &[(&str, &str)] = &[
    // FMA without AVX2: AMD's Piledriver and Steamroller only (Excavator has AVX2: `haswell`).
    ("piledriver", "bdver2"),
    ("skylakex", "skylake-avx512"),
    ("cannonlake", "cannonlake"),
    ("cascadelake", "cascadelake"),
    // Ice Lake's client and server parts share their tuning in GCC and Clang.
    ("icelake", "icelake-server"),
    ("cooperlake", "cooperlake"),
    // AVX-VNNI without AVX-512: Intel's hybrid client parts and E-core Xeons.
    ("alderlake", "alderlake"),
    ("sapphirerapids", "sapphirerapids"),
];
