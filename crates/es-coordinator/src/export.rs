//! Taking results out of a run: the parameters a run directory or checkpoint holds, a detailed
//! test-set evaluation (per-class accuracy, confusion matrix, every image's logits), and θ as
//! `safetensors` for NumPy and PyTorch users.
//!
//! The safetensors file holds `w1, b1, w2, b2, …` (weights `[fan_in, fan_out]`, input-major as
//! in DESIGN.md §1, so `h = x @ w + b`) in f32, and metadata with everything needed to redo
//! the forward pass: `mode` (`ftz`, `seed` or `ieee`), `widths`, `scale_exponents`,
//! `output_exponent`, and `forward`, the formula in words.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use es_core::train::Dataset;
use es_kernel::loss::{argmax, cross_entropy};
use es_kernel::{Batch, Forward, Kernel, NetConfig, ParamLayout};

use crate::RunError;
use crate::checkpoint;
use crate::config::RunConfig;
use crate::run_dir::read_theta;

/// Parameters and the run config they belong to.
#[derive(Clone, Debug)]
pub struct Parameters {
    pub config: RunConfig,
    pub theta: Vec<f32>,
    /// Where they came from, for messages.
    pub source: PathBuf,
    /// Generations trained, when known (checkpoints).
    pub generation: Option<u32>,
}

/// Reads parameters from a run directory (`theta.f32` with its `config.toml`, else its newest
/// checkpoint), a checkpoint file, or a `theta.f32` file beside a `config.toml`: a run's
/// result, so for a run that keeps a running average of θ, that average.
pub fn load_parameters(path: &Path) -> Result<Parameters, RunError> {
    let is_checkpoint = path.extension().is_some_and(|e| e == "ckpt");
    if path.is_file() && is_checkpoint {
        let c = checkpoint::read(path)?;
        return Ok(Parameters {
            config: c.config,
            generation: Some(c.state.generation),
            theta: c.state.into_model(),
            source: path.to_owned(),
        });
    }
    let (dir, theta_path) = if path.is_file() {
        (
            path.parent().unwrap_or(Path::new(".")).to_owned(),
            path.to_owned(),
        )
    } else {
        (path.to_owned(), path.join("theta.f32"))
    };
    if !theta_path.exists() {
        // A run still going (or killed): its newest checkpoint.
        let (file, c) = checkpoint::load_for_resume(&dir)?;
        return Ok(Parameters {
            config: c.config,
            generation: Some(c.state.generation),
            theta: c.state.into_model(),
            source: file,
        });
    }
    let config = RunConfig::from_file(&dir.join("config.toml"))?;
    let net = config.net()?;
    let theta = read_theta(&theta_path, ParamLayout::new(&net).len())?;
    Ok(Parameters {
        config,
        theta,
        source: theta_path,
        generation: None,
    })
}

/// A detailed evaluation on a labelled set.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub samples: usize,
    pub correct: usize,
    /// Mean cross-entropy.
    pub loss: f64,
    /// `confusion[label][predicted]`.
    pub confusion: Vec<Vec<usize>>,
    /// Every sample's logits, `samples × classes`, row-major.
    pub logits: Vec<f32>,
}

impl Report {
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.samples.max(1) as f64
    }

    /// Accuracy on the samples of each class (NaN for a class with none).
    pub fn per_class_accuracy(&self) -> Vec<f64> {
        self.confusion
            .iter()
            .enumerate()
            .map(|(label, row)| row[label] as f64 / row.iter().sum::<usize>() as f64)
            .collect()
    }
}

/// Evaluates `theta` on all of `data` with `net`'s arithmetic, in batches of 500.
pub fn evaluate(
    net: &NetConfig,
    kernel: Kernel,
    theta: &[f32],
    data: Dataset<'_>,
) -> Result<Report, RunError> {
    data.validate(net)?;
    let classes = net.outputs;
    let mut forward = Forward::new(net.clone(), kernel)?;
    let mut batch = Batch::new(net.inputs);
    let mut report = Report {
        samples: data.len(),
        correct: 0,
        loss: 0.0,
        confusion: vec![vec![0; classes]; classes],
        logits: Vec::with_capacity(data.len() * classes),
    };
    let mut loss_sum = 0.0;
    let indices: Vec<usize> = (0..data.len()).collect();
    for chunk in indices.chunks(500) {
        batch.fill(data.images, data.labels, chunk);
        let logits = forward.logits(theta, &batch);
        for (row, &label) in logits.chunks_exact(classes).zip(batch.labels()) {
            let predicted = argmax(row);
            report.confusion[label as usize][predicted] += 1;
            report.correct += usize::from(predicted == label as usize);
            loss_sum += cross_entropy(row, label as usize);
        }
        report.logits.extend_from_slice(logits);
    }
    report.loss = loss_sum / data.len().max(1) as f64;
    Ok(report)
}

/// The tensors of `theta` under their export names, in layout order.
fn tensors<'a>(net: &NetConfig, theta: &'a [f32]) -> Vec<(String, Vec<usize>, &'a [f32])> {
    let layout = ParamLayout::new(net);
    let mut out = Vec::new();
    for (i, layer) in layout.layers().iter().enumerate() {
        out.push((
            format!("w{}", i + 1),
            vec![layer.fan_in, layer.fan_out],
            &theta[layer.weights.clone()],
        ));
        out.push((
            format!("b{}", i + 1),
            vec![layer.fan_out],
            &theta[layer.bias.clone()],
        ));
    }
    out
}

fn join<T: ToString>(values: &[T]) -> String {
    values
        .iter()
        .map(T::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The export metadata of `net`.
pub fn metadata(net: &NetConfig) -> HashMap<String, String> {
    HashMap::from([
        ("mode".to_string(), net.arithmetic.name().to_string()),
        ("widths".to_string(), join(&net.widths())),
        ("scale_exponents".to_string(), join(&net.scale_exponents)),
        (
            "output_exponent".to_string(),
            net.output_exponent.to_string(),
        ),
        (
            "forward".to_string(),
            "h_0 = pixels / 255; for layer l = 1..L, with e_0 = 0, e_1..e_(L-1) = \
             scale_exponents and e_L = output_exponent: h_l = (h_(l-1) @ w_l + b_l * \
             2^-e_(l-1)) * 2^-(e_l - e_(l-1)); logits = h_L. Every product and sum is rounded \
             to f32 on its own (no FMA), sums in ascending input index. Mode ftz flushes every \
             denormal operand and result to zero; seed flushes only in the bias add and the \
             scalings; ieee flushes nothing"
                .to_string(),
        ),
        ("format".to_string(), "underflow-theta-v1".to_string()),
    ])
}

/// θ of `net` as a safetensors file.
pub fn to_safetensors(net: &NetConfig, theta: &[f32]) -> Result<Vec<u8>, RunError> {
    let expected = ParamLayout::new(net).len();
    if theta.len() != expected {
        return Err(RunError::Export(format!(
            "θ has {} values: the network {:?} has {expected}",
            theta.len(),
            net.widths()
        )));
    }
    let tensors = tensors(net, theta);
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, values)| values.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), data)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .map(|view| (name.clone(), view))
        })
        .collect::<Result<_, _>>()
        .map_err(|e| RunError::Export(e.to_string()))?;
    safetensors::serialize(views, Some(metadata(net))).map_err(|e| RunError::Export(e.to_string()))
}

/// Reads θ back from a safetensors file written by [`to_safetensors`] for `net`, checking
/// names, shapes and dtypes.
pub fn from_safetensors(net: &NetConfig, bytes: &[u8]) -> Result<Vec<f32>, RunError> {
    let file = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| RunError::Export(format!("not a safetensors file: {e}")))?;
    let mut theta = vec![0.0f32; ParamLayout::new(net).len()];
    let mut offset = 0;
    for (name, shape, values) in tensors(net, &theta.clone()) {
        let view = file
            .tensor(&name)
            .map_err(|e| RunError::Export(format!("tensor {name}: {e}")))?;
        if view.dtype() != safetensors::Dtype::F32 || view.shape() != shape.as_slice() {
            return Err(RunError::Export(format!(
                "tensor {name} is {:?} {:?}: expected F32 {shape:?}",
                view.dtype(),
                view.shape()
            )));
        }
        for (slot, b) in theta[offset..offset + values.len()]
            .iter_mut()
            .zip(view.data().chunks_exact(4))
        {
            *slot = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        offset += values.len();
    }
    Ok(theta)
}

/// A little-endian f32 array as a NumPy `.npy` file (version 1.0).
pub fn npy_f32(shape: &[usize], values: &[f32]) -> Vec<u8> {
    let dims = match shape {
        [n] => format!("({n},)"),
        _ => format!("({})", join(shape)),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {dims}, }}");
    // Magic (6) + version (2) + length (2) + header + '\n', padded to a multiple of 64.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend(values.iter().flat_map(|x| x.to_le_bytes()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_round_trip_names_shapes_and_bits() {
        let net = NetConfig {
            hidden: vec![6, 5],
            inputs: 7,
            outputs: 3,
            ..NetConfig::default()
        };
        let dim = ParamLayout::new(&net).len();
        let theta: Vec<f32> = (0..dim)
            .map(|i| f32::from_bits(0x0000_0001 + i as u32 * 7919))
            .collect();
        let bytes = to_safetensors(&net, &theta).unwrap();
        let back = from_safetensors(&net, &bytes).unwrap();
        assert_eq!(
            back.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            theta.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(file.tensor("w1").unwrap().shape(), [7, 6]);
        assert_eq!(file.tensor("b2").unwrap().shape(), [5]);
        assert_eq!(file.tensor("w3").unwrap().shape(), [5, 3]);
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta = meta.metadata().clone().unwrap();
        assert_eq!(meta["mode"], "ftz");
        assert_eq!(meta["widths"], "7,6,5,3");
        let e = to_safetensors(&net, &theta[1..]).unwrap_err().to_string();
        assert!(e.contains("θ has"), "{e}");
        let e = from_safetensors(&NetConfig::default(), &bytes)
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected F32 [784, 512]"), "{e}");
    }

    #[test]
    fn npy_header_is_aligned_and_describes_the_array() {
        let bytes = npy_f32(&[2, 3], &[1.0; 6]);
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + len) % 64, 0);
        let header = std::str::from_utf8(&bytes[10..10 + len]).unwrap();
        assert!(header.contains("'shape': (2,3)") && header.ends_with('\n'));
        assert_eq!(bytes.len(), 10 + len + 24);
    }
}
