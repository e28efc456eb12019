//! One deterministic mixer for everything that needs spread without a random number
//! generator: the per-connection max-age jitter, the seeded fault choice and the latency
//! fault's jitter. Sebastiano Vigna's SplitMix64 finaliser: consecutive inputs land far apart,
//! and the same input always gives the same output (a run can be repeated exactly).

/// SplitMix64 of `x`.
pub(crate) fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A 64-bit draw as a number in [0, 1) (its top 53 bits).
pub(crate) fn unit(x: u64) -> f64 {
    (x >> 11) as f64 / (1u64 << 53) as f64
}
