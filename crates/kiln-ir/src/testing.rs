//! Random models for property tests (feature `testing`): conv/pool/activation stacks with a
//! flatten and a linear chain, as every downstream crate's proptests use them.

use proptest::prelude::*;

use crate::sequential::{Conv2d, Layer, Sequential};
use crate::types::TensorType;

/// One random layer of the convolutional part. A convolution's `in_channels` is a placeholder
/// that [`random_model`] fixes up.
pub fn random_layer() -> impl Strategy<Value = Layer> {
    prop_oneof![
        (1usize..4, 1usize..4, 1usize..3, 0usize..3)
            .prop_map(|(o, k, s, p)| Layer::from(Conv2d::new(0, o, k).stride(s).padding(p))),
        (1usize..4, 1usize..3).prop_map(|(k, s)| Layer::avg_pool2d(k, s)),
        (1usize..4, 1usize..3).prop_map(|(k, s)| Layer::max_pool2d(k, s)),
        Just(Layer::Sigmoid),
        Just(Layer::ReLU),
        Just(Layer::Tanh),
        Just(Layer::SiLU),
    ]
}

/// `convs` on `[channels, side, side]` images, a flatten, one linear layer plus activation per
/// `hidden` entry (width, activation choice) and a final linear layer to `classes` logits.
/// `None` when the layers do not fit the image.
pub fn random_model(
    channels: usize,
    side: usize,
    convs: Vec<Layer>,
    hidden: Vec<(usize, u8)>,
    classes: usize,
) -> Option<Sequential> {
    let mut model = Sequential::new();
    let mut c = channels;
    for l in convs {
        model = model.append(match l {
            Layer::Conv2d(conv) => {
                let fixed = Conv2d {
                    in_channels: c,
                    ..conv
                };
                c = conv.out_channels;
                Layer::Conv2d(fixed)
            }
            other => other,
        });
    }
    model = model.append(Layer::Flatten);
    let probe = model
        .build("probe", TensorType::f32([1, channels, side, side]))
        .ok()?;
    let mut features = probe.nodes().last()?.ty.shape[1];
    for (width, act) in hidden {
        model = model.append(Layer::linear(features, width));
        let acts = [Layer::Sigmoid, Layer::ReLU, Layer::Tanh, Layer::SiLU];
        model = model.append(acts[act as usize % acts.len()].clone());
        features = width;
    }
    Some(model.append(Layer::linear(features, classes)))
}
