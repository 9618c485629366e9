//! The minibatch of a generation: which training images it holds and, with an image shift,
//! where each one is moved.
//!
//! Everyone who evaluates generation `t` (the trainer's threads, every remote worker, the
//! golden task) builds its minibatch here, from `run_seed` and `t` alone, so they all see the
//! same pixels.

use es_kernel::Batch;

use crate::seeds::{Purpose, rng, uniform_below};
use crate::train::{Dataset, EsConfig};

/// The minibatch of generation `t`: `batch_size` indices drawn uniformly (with replacement)
/// from `0..n` by `rng(run_seed, Minibatch, t, 0)`.
pub fn minibatch_indices(run_seed: u64, t: u32, batch_size: usize, n: usize, out: &mut Vec<usize>) {
    let mut rng = rng(run_seed, Purpose::Minibatch, t, 0);
    out.clear();
    out.extend((0..batch_size).map(|_| uniform_below(&mut rng, n as u64) as usize));
}

/// The index of the `Minibatch` stream the image shifts are drawn from (0 draws the indices).
const IMAGE_SHIFT_STREAM: u32 = 1;

/// How far each image of generation `t`'s minibatch moves when images shift by at most
/// `max_shift` pixels: per image in minibatch order, `(dx, dy)` each uniform in
/// `−max_shift..=max_shift`, drawn by `rng(run_seed, Minibatch, t, 1)` (dx first).
pub fn image_shifts(
    run_seed: u64,
    t: u32,
    batch_size: usize,
    max_shift: usize,
    out: &mut Vec<(i32, i32)>,
) {
    let mut rng = rng(run_seed, Purpose::Minibatch, t, IMAGE_SHIFT_STREAM);
    let choices = 2 * max_shift as u64 + 1;
    let max = max_shift as i32;
    out.clear();
    out.extend((0..batch_size).map(|_| {
        let dx = uniform_below(&mut rng, choices) as i32 - max;
        let dy = uniform_below(&mut rng, choices) as i32 - max;
        (dx, dy)
    }));
}

/// Writes the `side × side` image `src` (row-major) moved `dx` pixels right and `dy` pixels
/// down into `dst`; pixels moved in from outside the image are 0, pixels moved out are lost.
///
/// # Panics
/// If `src` or `dst` is not `side × side` pixels.
pub fn shift_image(src: &[u8], side: usize, dx: i32, dy: i32, dst: &mut [u8]) {
    assert_eq!(src.len(), side * side, "source image is not {side}x{side}");
    assert_eq!(
        dst.len(),
        side * side,
        "destination image is not {side}x{side}"
    );
    dst.fill(0);
    let side_i = side as i64;
    let (dx, dy) = (i64::from(dx), i64::from(dy));
    // Columns of dst whose source column c − dx lies in 0..side.
    let first = dx.clamp(0, side_i) as usize;
    let end = (side_i + dx).clamp(0, side_i) as usize;
    if first >= end {
        return;
    }
    for row in 0..side {
        let src_row = row as i64 - dy;
        if !(0..side_i).contains(&src_row) {
            continue;
        }
        let src_start = src_row as usize * side + (first as i64 - dx) as usize;
        dst[row * side + first..row * side + end]
            .copy_from_slice(&src[src_start..src_start + (end - first)]);
    }
}

/// The side of the square images an image shift needs, if `inputs` pixels make one.
pub fn square_side(inputs: usize) -> Option<usize> {
    let side = (inputs as f64).sqrt().round() as usize;
    (side * side == inputs).then_some(side)
}

/// Builds generation minibatches, reusing its buffers between generations.
#[derive(Clone, Debug, Default)]
pub struct MinibatchBuilder {
    indices: Vec<usize>,
    shifts: Vec<(i32, i32)>,
    pixels: Vec<u8>,
    labels: Vec<u8>,
}

impl MinibatchBuilder {
    pub fn new() -> MinibatchBuilder {
        MinibatchBuilder::default()
    }

    /// Fills `batch` with generation `t`'s minibatch of `train`: `es.batch_at(t)` images
    /// chosen by [`minibatch_indices`], each moved by [`image_shifts`] when `es.image_shift`
    /// is not 0.
    ///
    /// # Panics
    /// If `train` does not hold `batch`'s inputs per label, or an image shift is asked of
    /// images that are not square: [`EsConfig::validate_for`] and [`Dataset::validate`]
    /// refuse both first.
    pub fn fill(
        &mut self,
        es: &EsConfig,
        run_seed: u64,
        train: Dataset<'_>,
        t: u32,
        batch: &mut Batch,
    ) {
        let size = es.batch_at(t);
        minibatch_indices(run_seed, t, size, train.len(), &mut self.indices);
        if es.image_shift == 0 {
            batch.fill(train.images, train.labels, &self.indices);
            return;
        }
        let inputs = batch.inputs();
        let side = square_side(inputs).expect("validated: an image shift needs square images");
        image_shifts(run_seed, t, size, es.image_shift, &mut self.shifts);
        self.pixels.resize(size * inputs, 0);
        self.labels.clear();
        for ((&i, &(dx, dy)), dst) in self
            .indices
            .iter()
            .zip(&self.shifts)
            .zip(self.pixels.chunks_exact_mut(inputs))
        {
            shift_image(
                &train.images[i * inputs..(i + 1) * inputs],
                side,
                dx,
                dy,
                dst,
            );
            self.labels.push(train.labels[i]);
        }
        batch.fill_all(&self.pixels, &self.labels);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 4×4 image whose pixel (row, col) is 16·row + col + 1 (no zeros).
    fn numbered() -> Vec<u8> {
        (0..16).map(|p| p as u8 + 1).collect()
    }

    #[test]
    fn a_shifted_image_moves_each_pixel_and_fills_the_uncovered_edge_with_zero() {
        let src = numbered();
        let mut dst = vec![99; 16];
        for dx in -5..=5 {
            for dy in -5..=5 {
                shift_image(&src, 4, dx, dy, &mut dst);
                for row in 0..4i32 {
                    for col in 0..4i32 {
                        let (sr, sc) = (row - dy, col - dx);
                        let expected = if (0..4).contains(&sr) && (0..4).contains(&sc) {
                            src[(sr * 4 + sc) as usize]
                        } else {
                            0
                        };
                        assert_eq!(
                            dst[(row * 4 + col) as usize],
                            expected,
                            "shift ({dx}, {dy}), pixel ({row}, {col})"
                        );
                    }
                }
            }
        }
        shift_image(&src, 4, 0, 0, &mut dst);
        assert_eq!(dst, src);
    }

    #[test]
    fn image_shifts_are_deterministic_in_range_and_use_every_offset() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        image_shifts(3, 10, 2000, 2, &mut a);
        image_shifts(3, 10, 2000, 2, &mut b);
        assert_eq!(a, b);
        for d in -2..=2 {
            assert!(a.iter().any(|&(dx, _)| dx == d), "no dx = {d}");
            assert!(a.iter().any(|&(_, dy)| dy == d), "no dy = {d}");
        }
        assert!(a.iter().all(|&(dx, dy)| dx.abs() <= 2 && dy.abs() <= 2));
        image_shifts(3, 11, 2000, 2, &mut b);
        assert_ne!(a, b);
        image_shifts(3, 10, 10, 0, &mut b);
        assert!(b.iter().all(|&s| s == (0, 0)));
    }

    #[test]
    fn square_sides_are_found_and_other_sizes_refused() {
        assert_eq!(square_side(784), Some(28));
        assert_eq!(square_side(16), Some(4));
        assert_eq!(square_side(1), Some(1));
        assert_eq!(square_side(785), None);
        assert_eq!(square_side(12), None);
    }

    #[test]
    fn a_shifted_minibatch_holds_the_drawn_images_moved_by_the_drawn_shifts() {
        // 5 images of 4×4 pixels, image k's pixels all k + 1 in its left half.
        let images: Vec<u8> = (0..5u8)
            .flat_map(|k| (0..16).map(move |p| if p % 4 < 2 { k + 1 } else { 0 }))
            .collect();
        let labels: Vec<u8> = (0..5).collect();
        let train = Dataset {
            images: &images,
            labels: &labels,
        };
        let es = EsConfig {
            batch_size: 40,
            image_shift: 1,
            ..EsConfig::default()
        };
        let mut builder = MinibatchBuilder::new();
        let mut batch = Batch::new(16);
        builder.fill(&es, 7, train, 3, &mut batch);

        let mut indices = Vec::new();
        let mut shifts = Vec::new();
        minibatch_indices(7, 3, 40, 5, &mut indices);
        image_shifts(7, 3, 40, 1, &mut shifts);
        assert!(shifts.iter().any(|&s| s != (0, 0)));
        let mut expected = vec![0; 16];
        for (s, (&i, &(dx, dy))) in indices.iter().zip(&shifts).enumerate() {
            shift_image(&images[i * 16..(i + 1) * 16], 4, dx, dy, &mut expected);
            assert_eq!(
                &batch.pixels()[s * 16..(s + 1) * 16],
                &expected[..],
                "sample {s}"
            );
            assert_eq!(batch.labels()[s], labels[i]);
        }

        // No shift: the images as they are.
        let plain = EsConfig {
            image_shift: 0,
            ..es
        };
        builder.fill(&plain, 7, train, 3, &mut batch);
        let mut unshifted = Batch::new(16);
        unshifted.fill(&images, &labels, &indices);
        assert_eq!(batch.pixels(), unshifted.pixels());
        assert_eq!(batch.labels(), unshifted.labels());
    }
}
