//! Softmax cross-entropy and accuracy of logits, computed after the float guard is released.
//!
//! The fitness feeds ranks that must agree on every machine of a cluster, so `exp` and `ln`
//! come from the pure-Rust `libm` crate, never the platform's (glibc picks code paths per CPU).

/// Cross-entropy `logsumexp(o) - o[label]` in f64. A network whose logits are not finite has
/// diverged: its loss is `+inf` (the worst fitness), never NaN.
pub fn cross_entropy(logits: &[f32], label: usize) -> f64 {
    assert!(
        label < logits.len(),
        "label {label} out of range for {} logits",
        logits.len()
    );
    if logits.iter().any(|o| !o.is_finite()) {
        return f64::INFINITY;
    }
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &o| m.max(o as f64));
    let sum: f64 = logits.iter().map(|&o| libm::exp(o as f64 - max)).sum();
    max + libm::log(sum) - logits[label] as f64
}

/// Index of the largest logit; the first one on ties.
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &o) in logits.iter().enumerate() {
        if o > logits[best] {
            best = i;
        }
    }
    best
}

/// What one parameter vector scored on one batch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Evaluation {
    /// Minus the mean softmax cross-entropy: the quantity ES maximises.
    pub fitness: f64,
    /// Samples whose largest logit is the label: reported, never optimised silently.
    pub correct: usize,
    pub samples: usize,
}

impl Evaluation {
    /// Scores `samples × classes` logits against `labels`.
    pub fn from_logits(logits: &[f32], labels: &[u8], classes: usize) -> Evaluation {
        assert_eq!(logits.len(), labels.len() * classes, "logits shape");
        let mut loss = 0.0;
        let mut correct = 0;
        for (o, &label) in logits.chunks_exact(classes).zip(labels) {
            loss += cross_entropy(o, label as usize);
            correct += usize::from(argmax(o) == label as usize);
        }
        let samples = labels.len();
        Evaluation {
            fitness: if samples == 0 {
                0.0
            } else {
                -loss / samples as f64
            },
            correct,
            samples,
        }
    }

    pub fn accuracy(&self) -> f64 {
        if self.samples == 0 {
            0.0
        } else {
            self.correct as f64 / self.samples as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_entropy_of_uniform_logits_is_ln_classes() {
        let ce = cross_entropy(&[0.0; 10], 3);
        assert!((ce - 10f64.ln()).abs() < 1e-12);
        // Large logits do not overflow.
        let ce = cross_entropy(&[1000.0, 0.0], 0);
        assert!((0.0..1e-300).contains(&ce));
        assert_eq!(cross_entropy(&[f32::INFINITY, 0.0], 0), f64::INFINITY);
        assert_eq!(cross_entropy(&[f32::NAN, 0.0], 0), f64::INFINITY);
    }

    #[test]
    fn evaluation_counts_and_averages() {
        let logits = [2.0, 1.0, 0.0, 5.0];
        let e = Evaluation::from_logits(&logits, &[0, 0], 2);
        assert_eq!(e.correct, 1);
        let want = -(cross_entropy(&[2.0, 1.0], 0) + cross_entropy(&[0.0, 5.0], 0)) / 2.0;
        assert_eq!(e.fitness, want);
        assert_eq!(e.accuracy(), 0.5);
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
    }
}
