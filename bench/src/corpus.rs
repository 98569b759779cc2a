//! Scenario 15's workload: a corpus of distinct inputs (JPEG images made
//! here, so the run needs no files) and a Zipf picker over it, as real
//! traffic repeats its popular items (the same avatar on every page) and
//! rarely the rest. Seeded, so that every run sends the same sequence.

use std::sync::Arc;

use bytes::Bytes;

/// Distinct inputs, and how often each is asked for.
#[derive(Debug)]
pub struct Corpus {
    inputs: Vec<Bytes>,
    /// The cumulative share of the items up to each rank (the last is 1).
    cumulative: Vec<f64>,
}

impl Corpus {
    /// `inputs`, the k-th (from 1) asked for in proportion to 1/k^`s`.
    pub fn zipf(inputs: Vec<Bytes>, s: f64) -> Arc<Self> {
        let weights: Vec<f64> = (1..=inputs.len()).map(|k| (k as f64).powf(-s)).collect();
        let total: f64 = weights.iter().sum();
        let cumulative = weights
            .iter()
            .scan(0.0, |sum, w| {
                *sum += w / total;
                Some(*sum)
            })
            .collect();
        Arc::new(Self { inputs, cumulative })
    }

    /// The input a uniform draw `u` in [0, 1) picks.
    pub fn pick(&self, u: f64) -> &Bytes {
        let rank = self.cumulative.partition_point(|&c| c <= u).min(self.inputs.len() - 1);
        &self.inputs[rank]
    }

    /// How many distinct inputs it holds.
    pub fn len(&self) -> usize {
        self.inputs.len()
    }

    /// Their mean size, bytes.
    pub fn mean_size(&self) -> usize {
        self.inputs.iter().map(Bytes::len).sum::<usize>() / self.inputs.len().max(1)
    }
}

/// A small seeded generator (SplitMix64): the same draws in every run.
#[derive(Debug, Clone)]
pub struct Draws(u64);

impl Draws {
    /// Draws from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform draw in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A JPEG of `side` x `side` pixels looking like a camera photo (smooth
/// shapes, a little grain: many pixels for its bytes, as a photo has),
/// different for each `seed`.
pub fn jpeg(side: u32, seed: u64) -> anyhow::Result<Bytes> {
    let mut draws = Draws::new(seed);
    let phase = (seed % 97) as f32;
    let image = image::RgbImage::from_fn(side, side, |x, y| {
        let grain = draws.next_u64();
        let (fx, fy) = (x as f32 / side as f32, y as f32 / side as f32);
        let wave = |k: f32, p: f32| 0.5 + 0.5 * ((fx * k + p).sin() * (fy * (k + 1.3) - p).cos());
        let channel = |k: f32, shift: u32| {
            let smooth = wave(k, phase + shift as f32) * 220.0;
            (smooth as u32 + ((grain >> shift) & 0x1f) as u32).min(255) as u8
        };
        image::Rgb([channel(7.0, 0), channel(11.0, 8), channel(5.0, 16)])
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90).encode_image(&image)?;
    Ok(Bytes::from(out))
}

/// The side of a [`jpeg`] of about `bytes`.
pub fn side_for(bytes: usize) -> anyhow::Result<u32> {
    // Measured once on a sample: size grows with the pixel count.
    let sample = 256;
    let per_pixel = jpeg(sample, 0)?.len() as f64 / f64::from(sample * sample);
    Ok(((bytes as f64 / per_pixel).sqrt()) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_favours_the_first_ranks_and_reaches_the_last() {
        let corpus = Corpus::zipf((0..1000u32).map(|n| Bytes::from(n.to_be_bytes().to_vec())).collect(), 1.1);
        let mut draws = Draws::new(7);
        let mut counts = vec![0u32; 1000];
        for _ in 0..100_000 {
            let input = corpus.pick(draws.unit());
            counts[u32::from_be_bytes(input[..].try_into().unwrap()) as usize] += 1;
        }
        // Rank 1's share under s = 1.1 over 1,000 items is about 0.18.
        assert!((15_000..21_000).contains(&counts[0]), "{}", counts[0]);
        assert!(counts[0] > counts[1] && counts[1] > counts[9] && counts[9] > counts[99]);
        assert!(counts[900..].iter().sum::<u32>() > 0, "the tail is asked for too");
    }

    #[test]
    fn jpegs_differ_by_seed_and_come_near_the_size_asked() {
        let side = side_for(64 << 10).unwrap();
        let (a, b) = (jpeg(side, 1).unwrap(), jpeg(side, 2).unwrap());
        assert_ne!(a, b);
        assert!((48 << 10..80 << 10).contains(&a.len()), "{} bytes", a.len());
    }
}
