//! The bytes we send, so that every echoed byte can be checked.
//!
//! One shared buffer of pseudo-random bytes whose period is a prime near 1 MiB. Each
//! connection starts at its own offset and every message moves on, so a byte that came back
//! on the wrong connection, out of order, duplicated or invented does not compare equal. The
//! buffer is `period + max_len` long so any window is one contiguous slice (a `memcmp`).

/// Prime, so message sizes (powers of two) never line up with it.
const PERIOD: usize = 1_048_573;

pub struct Pattern {
    data: Vec<u8>,
    max_len: usize,
}

impl Pattern {
    /// A pattern whose windows can be up to `max_len` bytes long.
    pub fn new(max_len: usize) -> Self {
        let mut data = vec![0u8; PERIOD + max_len];
        // xorshift64*: fast and good enough to make accidental equality impossible.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for chunk in data[..PERIOD].chunks_mut(8) {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        // The tail repeats the stream (several periods over when max_len > PERIOD).
        for i in PERIOD..data.len() {
            data[i] = data[i - PERIOD];
        }
        Pattern { data, max_len }
    }

    /// A starting offset for connection `id`, far from its neighbours'.
    pub fn start_for(id: usize) -> u64 {
        (id as u64).wrapping_mul(7919 * 131) % PERIOD as u64
    }

    /// The `len` bytes of the endless stream at `offset`.
    pub fn window(&self, offset: u64, len: usize) -> &[u8] {
        debug_assert!(len <= self.max_len);
        let start = (offset % PERIOD as u64) as usize;
        &self.data[start..start + len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_wrap_around_the_period() {
        let p = Pattern::new(16);
        let end = p.window(PERIOD as u64 - 4, 8).to_vec();
        assert_eq!(&end[4..], p.window(0, 4));
        assert_ne!(p.window(0, 16), p.window(Pattern::start_for(1), 16));
    }

    #[test]
    fn windows_longer_than_the_period_repeat_it() {
        let p = Pattern::new(PERIOD * 2 + 5);
        let w = p.window(3, PERIOD * 2 + 5);
        assert_eq!(w[..PERIOD], w[PERIOD..PERIOD * 2]);
        assert_eq!(w[..5], w[PERIOD * 2..]);
    }
}
