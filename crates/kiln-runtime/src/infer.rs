//! Inference with given parameters: class probabilities and layer activations, on the device.

use std::collections::HashMap;

use kiln_ir::{DType, Model, TensorType};
use kiln_reference::Tensor;

use crate::gpu::{Gpu, RuntimeError};
use crate::run::run_graph;

/// What [`infer`] computed for a batch of images.
pub struct Inference {
    /// Softmax probabilities, one row of classes per image.
    pub probabilities: Vec<Vec<f32>>,
    /// Requested layer outputs by PyTorch layer index, `[images, ...]`.
    pub layers: HashMap<usize, Tensor>,
}

/// Runs `model` with `params` on `count` u8 images of `image` = `[channels, height, width]`
/// (concatenated in `pixels`), through the compiled forward graph on the device.
pub fn infer(
    gpu: &Gpu,
    model: &Model,
    params: &HashMap<String, Tensor>,
    pixels: &[u8],
    image: [usize; 3],
    layers: &[usize],
) -> Result<Inference, RuntimeError> {
    let per: usize = image.iter().product();
    let count = pixels.len() / per.max(1);
    if count == 0 || count * per != pixels.len() {
        return Err(RuntimeError::Setup(format!(
            "{} bytes are not a whole number of {}x{}x{} images",
            pixels.len(),
            image[0],
            image[1],
            image[2]
        )));
    }
    let [c, h, w] = image;
    let input = TensorType::new(DType::U8, [count, c, h, w]);
    let graph = match model {
        Model::Sequential(s) => s
            .build_with_layer_outputs("infer", input, layers)
            .map_err(|e| RuntimeError::Setup(e.to_string()))?,
        Model::Graph(_) if !layers.is_empty() => {
            return Err(RuntimeError::Setup(
                "layer activations need a built-in model (layers are not marked in IR text)".into(),
            ));
        }
        Model::Graph(_) => model.forward("infer", input).map_err(RuntimeError::Setup)?,
    };
    let x = Tensor::from_u8([count, c, h, w], pixels.to_vec()).expect("whole images");
    let run = run_graph(gpu, &graph, &HashMap::from([("x".to_string(), x)]), params)?;
    let logits = &run.outputs["output"];
    let classes = logits.shape()[1];
    let z = logits.as_f32().expect("f32 logits");
    let probabilities = z
        .chunks(classes)
        .map(|row| {
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let e: Vec<f32> = row.iter().map(|v| (v - m).exp()).collect();
            let s: f32 = e.iter().sum();
            e.iter().map(|v| v / s).collect()
        })
        .collect();
    let layers = layers
        .iter()
        .map(|&l| (l, run.outputs[&format!("layer.{l}")].clone()))
        .collect();
    Ok(Inference {
        probabilities,
        layers,
    })
}
