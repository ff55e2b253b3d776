//! A `Sequential`-style model builder mirroring PyTorch's `nn.Sequential`, and its lowering to
//! the graph IR. Layer indices match PyTorch's, so parameters get the same names (`0.weight`,
//! `3.bias`, ...) and checkpoints can line up with a PyTorch model.

use std::fmt;

use crate::graph::{Graph, GraphError, LayerRef, NodeId};
use crate::op::Op;
use crate::types::{DType, TensorType};

/// PyTorch's `nn.Conv2d` without groups, dilation or padding modes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conv2d {
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel_size: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
}

impl Conv2d {
    /// A square-kernel convolution with stride 1 and no padding, like `nn.Conv2d(in, out, k)`.
    pub fn new(in_channels: usize, out_channels: usize, kernel_size: usize) -> Self {
        Conv2d {
            in_channels,
            out_channels,
            kernel_size: [kernel_size; 2],
            stride: [1, 1],
            padding: [0, 0],
        }
    }

    pub fn padding(mut self, padding: usize) -> Self {
        self.padding = [padding; 2];
        self
    }

    pub fn stride(mut self, stride: usize) -> Self {
        self.stride = [stride; 2];
        self
    }
}

/// One layer of a [`Sequential`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layer {
    Conv2d(Conv2d),
    AvgPool2d {
        kernel_size: [usize; 2],
        stride: [usize; 2],
    },
    MaxPool2d {
        kernel_size: [usize; 2],
        stride: [usize; 2],
    },
    Sigmoid,
    ReLU,
    Tanh,
    /// `nn.SiLU()`: `x * sigmoid(x)`.
    SiLU,
    /// Flattens every dimension after the batch dimension, like `nn.Flatten()`.
    Flatten,
    Linear {
        in_features: usize,
        out_features: usize,
    },
}

impl From<Conv2d> for Layer {
    fn from(c: Conv2d) -> Self {
        Layer::Conv2d(c)
    }
}

impl Layer {
    /// `nn.AvgPool2d(kernel_size, stride)` with square windows.
    pub fn avg_pool2d(kernel_size: usize, stride: usize) -> Layer {
        Layer::AvgPool2d {
            kernel_size: [kernel_size; 2],
            stride: [stride; 2],
        }
    }

    /// `nn.MaxPool2d(kernel_size, stride)` with square windows.
    pub fn max_pool2d(kernel_size: usize, stride: usize) -> Layer {
        Layer::MaxPool2d {
            kernel_size: [kernel_size; 2],
            stride: [stride; 2],
        }
    }

    pub fn linear(in_features: usize, out_features: usize) -> Layer {
        Layer::Linear {
            in_features,
            out_features,
        }
    }

    /// The PyTorch class name (`Conv2d`, `Linear`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Layer::Conv2d(_) => "Conv2d",
            Layer::AvgPool2d { .. } => "AvgPool2d",
            Layer::MaxPool2d { .. } => "MaxPool2d",
            Layer::Sigmoid => "Sigmoid",
            Layer::ReLU => "ReLU",
            Layer::Tanh => "Tanh",
            Layer::SiLU => "SiLU",
            Layer::Flatten => "Flatten",
            Layer::Linear { .. } => "Linear",
        }
    }
}

/// Prints a square pair as PyTorch's repr does for pools (`2`) and an uneven one as `(2, 3)`.
struct Pair([usize; 2]);

impl fmt::Display for Pair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({}, {})", self.0[0], self.0[1])
    }
}

impl fmt::Display for Layer {
    /// The layer as PyTorch prints it, e.g. `Conv2d(1, 6, kernel_size=(5, 5), stride=(1, 1), padding=(2, 2))`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Layer::Conv2d(c) => write!(
                f,
                "Conv2d({}, {}, kernel_size={}, stride={}, padding={})",
                c.in_channels,
                c.out_channels,
                Pair(c.kernel_size),
                Pair(c.stride),
                Pair(c.padding)
            ),
            Layer::AvgPool2d {
                kernel_size,
                stride,
            }
            | Layer::MaxPool2d {
                kernel_size,
                stride,
            } => {
                let one = |p: [usize; 2]| {
                    if p[0] == p[1] {
                        p[0].to_string()
                    } else {
                        Pair(p).to_string()
                    }
                };
                write!(
                    f,
                    "{}(kernel_size={}, stride={})",
                    self.kind(),
                    one(*kernel_size),
                    one(*stride)
                )
            }
            Layer::Linear {
                in_features,
                out_features,
            } => write!(
                f,
                "Linear(in_features={in_features}, out_features={out_features})"
            ),
            Layer::Sigmoid | Layer::ReLU | Layer::Tanh | Layer::SiLU | Layer::Flatten => {
                write!(f, "{}()", self.kind())
            }
        }
    }
}

/// A model layer that cannot take the shape it is given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("layer {index} ({layer}): got input {input}: {message}")]
pub struct ShapeError {
    pub index: usize,
    /// The layer as PyTorch prints it.
    pub layer: String,
    pub input: TensorType,
    pub message: String,
}

/// An ordered stack of layers, like `nn.Sequential`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sequential {
    pub layers: Vec<Layer>,
}

/// One row of a [`Summary`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerSummary {
    pub index: usize,
    pub layer: Layer,
    pub output: TensorType,
    pub params: usize,
}

/// Per-layer output shapes and parameter counts, like the d2l chapter's printout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub input: TensorType,
    pub rows: Vec<LayerSummary>,
}

impl Summary {
    pub fn total_params(&self) -> usize {
        self.rows.iter().map(|r| r.params).sum()
    }
}

/// `61706` as `61,706`.
pub fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shape = |t: &TensorType| {
            let dims: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
            format!("[{}]", dims.join(", "))
        };
        writeln!(f, "input: {}", shape(&self.input))?;
        writeln!(
            f,
            "{:<4}{:<11}{:<18}{:>8}",
            "#", "layer", "output shape", "params"
        )?;
        for r in &self.rows {
            writeln!(
                f,
                "{:<4}{:<11}{:<18}{:>8}",
                r.index,
                r.layer.kind(),
                shape(&r.output),
                thousands(r.params)
            )?;
        }
        writeln!(f, "total params: {}", thousands(self.total_params()))
    }
}

impl Sequential {
    pub fn new() -> Self {
        Sequential::default()
    }

    /// Appends a layer; its index is its position, as in PyTorch.
    pub fn append(mut self, layer: impl Into<Layer>) -> Self {
        self.layers.push(layer.into());
        self
    }

    /// Lowers the model to a forward graph named `name` with one input `x` of type `input` and one
    /// output `output`, inferring every shape. A u8 input is first scaled to [0, 1] (`scale_u8`). Any shape a layer cannot take is a [`ShapeError`]
    /// naming the layer; no input makes this panic.
    pub fn build(&self, name: &str, input: TensorType) -> Result<Graph, ShapeError> {
        self.lower(name, input).map(|(g, _)| g)
    }

    /// Like [`Sequential::build`], with the outputs of the listed layers (by PyTorch index) as
    /// extra graph outputs named `layer.<index>`, for looking at activations.
    pub fn build_with_layer_outputs(
        &self,
        name: &str,
        input: TensorType,
        layers: &[usize],
    ) -> Result<Graph, ShapeError> {
        let (mut graph, outputs) = self.lower(name, input.clone())?;
        for &l in layers {
            let Some(&node) = outputs.get(l) else {
                return Err(ShapeError {
                    index: l,
                    layer: "output".into(),
                    input,
                    message: format!("the model has only {} layers", outputs.len()),
                });
            };
            graph
                .add_output(format!("layer.{l}"), node)
                .map_err(|e| ShapeError {
                    index: l,
                    layer: "output".into(),
                    input: input.clone(),
                    message: e.to_string(),
                })?;
        }
        Ok(graph)
    }

    /// Output shape and parameter count of every layer for the given input.
    pub fn summary(&self, input: TensorType) -> Result<Summary, ShapeError> {
        let (graph, layer_outputs) = self.lower("summary", input.clone())?;
        let rows = self
            .layers
            .iter()
            .enumerate()
            .zip(layer_outputs)
            .map(|((index, layer), out)| LayerSummary {
                index,
                layer: layer.clone(),
                output: graph.ty(out).clone(),
                params: graph
                    .params()
                    .filter(|(id, _, _)| {
                        graph
                            .node(*id)
                            .layer
                            .as_ref()
                            .is_some_and(|l| l.index == index)
                    })
                    .map(|(_, _, t)| t.numel())
                    .sum(),
            })
            .collect();
        Ok(Summary { input, rows })
    }

    fn lower(&self, name: &str, input: TensorType) -> Result<(Graph, Vec<NodeId>), ShapeError> {
        let mut graph = Graph::new(name);
        let mut x = graph
            .add_input("x", input.clone())
            .map_err(|e| ShapeError {
                index: 0,
                layer: "input".into(),
                input: input.clone(),
                message: e.to_string(),
            })?;
        if input.dtype == DType::U8 {
            // Raw image bytes are scaled to [0, 1] first, as torchvision's ToTensor does.
            x = graph.add(Op::ScaleU8, &[x]).map_err(|e| ShapeError {
                index: 0,
                layer: "input".into(),
                input: input.clone(),
                message: e.to_string(),
            })?;
        }
        let mut layer_outputs = Vec::with_capacity(self.layers.len());
        for (index, layer) in self.layers.iter().enumerate() {
            let x_ty = graph.ty(x).clone();
            let fail = |message: String| ShapeError {
                index,
                layer: layer.to_string(),
                input: x_ty.clone(),
                message,
            };
            let from_graph = |e: GraphError| match e {
                GraphError::Type { op, message, .. } => fail(format!("{op}: {message}")),
                other => fail(other.to_string()),
            };
            x = lower_layer(&mut graph, index, layer, x).map_err(|e| match e {
                LowerError::Layer(m) => fail(m),
                LowerError::Graph(e) => from_graph(e),
            })?;
            layer_outputs.push(x);
        }
        graph.add_output("output", x).map_err(|e| ShapeError {
            index: self.layers.len(),
            layer: "output".into(),
            input: graph.ty(x).clone(),
            message: e.to_string(),
        })?;
        Ok((graph, layer_outputs))
    }
}

enum LowerError {
    Layer(String),
    Graph(GraphError),
}

impl From<GraphError> for LowerError {
    fn from(e: GraphError) -> Self {
        LowerError::Graph(e)
    }
}

fn lower_layer(
    graph: &mut Graph,
    index: usize,
    layer: &Layer,
    x: NodeId,
) -> Result<NodeId, LowerError> {
    let tag = Some(LayerRef {
        index,
        kind: layer.kind().to_string(),
    });
    let x_ty = graph.ty(x).clone();
    if x_ty.dtype != DType::F32 {
        return Err(LowerError::Layer(format!(
            "needs f32 input, got {}",
            x_ty.dtype
        )));
    }
    let param = |graph: &mut Graph, what: &str, shape: Vec<usize>| {
        graph.add_param(
            format!("{index}.{what}"),
            TensorType::f32(shape),
            tag.clone(),
        )
    };
    Ok(match layer {
        Layer::Conv2d(c) => {
            if c.in_channels == 0 || c.out_channels == 0 {
                return Err(LowerError::Layer("channel counts must be positive".into()));
            }
            if c.kernel_size.contains(&0) || c.stride.contains(&0) {
                return Err(LowerError::Layer(
                    "kernel_size and stride must be positive".into(),
                ));
            }
            if x_ty.rank() != 4 || x_ty.shape[1] != c.in_channels {
                return Err(LowerError::Layer(format!(
                    "needs a 4-D input [N, {}, H, W] ({} input channel(s))",
                    c.in_channels, c.in_channels
                )));
            }
            let [kh, kw] = c.kernel_size;
            let w = param(graph, "weight", vec![c.out_channels, c.in_channels, kh, kw])?;
            let b = param(graph, "bias", vec![c.out_channels])?;
            let y = graph.add_in_layer(
                Op::Conv2d {
                    stride: c.stride,
                    padding: c.padding,
                },
                &[x, w],
                tag.clone(),
            )?;
            graph.add_in_layer(Op::BiasAdd { axis: 1 }, &[y, b], tag)?
        }
        Layer::AvgPool2d {
            kernel_size,
            stride,
        } => graph.add_in_layer(
            Op::AvgPool2d {
                kernel: *kernel_size,
                stride: *stride,
            },
            &[x],
            tag,
        )?,
        Layer::MaxPool2d {
            kernel_size,
            stride,
        } => graph.add_in_layer(
            Op::MaxPool2d {
                kernel: *kernel_size,
                stride: *stride,
            },
            &[x],
            tag,
        )?,
        Layer::Sigmoid => graph.add_in_layer(Op::Sigmoid, &[x], tag)?,
        Layer::ReLU => graph.add_in_layer(Op::Relu, &[x], tag)?,
        Layer::Tanh => graph.add_in_layer(Op::Tanh, &[x], tag)?,
        Layer::SiLU => graph.add_in_layer(Op::Silu, &[x], tag)?,
        Layer::Flatten => {
            if x_ty.rank() < 2 {
                return Err(LowerError::Layer(
                    "needs at least 2 dimensions [N, ...] to flatten".into(),
                ));
            }
            let rest: usize = x_ty.shape[1..].iter().product();
            graph.add_in_layer(
                Op::Reshape {
                    shape: vec![x_ty.shape[0], rest],
                },
                &[x],
                tag,
            )?
        }
        Layer::Linear {
            in_features,
            out_features,
        } => {
            if *in_features == 0 || *out_features == 0 {
                return Err(LowerError::Layer("feature counts must be positive".into()));
            }
            if x_ty.rank() != 2 || x_ty.shape[1] != *in_features {
                let hint = if x_ty.rank() > 2 {
                    "; add a Flatten before it"
                } else {
                    ""
                };
                return Err(LowerError::Layer(format!(
                    "needs a 2-D input [N, {in_features}] (in_features={in_features}){hint}"
                )));
            }
            let w = param(graph, "weight", vec![*out_features, *in_features])?;
            let b = param(graph, "bias", vec![*out_features])?;
            let y = graph.add_in_layer(
                Op::MatMul {
                    transpose_a: false,
                    transpose_b: true,
                },
                &[x, w],
                tag.clone(),
            )?;
            graph.add_in_layer(Op::BiasAdd { axis: 1 }, &[y, b], tag)?
        }
    })
}

/// LeNet-5 exactly as in "Dive into Deep Learning" (PyTorch edition), section 7.6.
pub fn lenet() -> Sequential {
    Sequential::new()
        .append(Conv2d::new(1, 6, 5).padding(2))
        .append(Layer::Sigmoid)
        .append(Layer::avg_pool2d(2, 2))
        .append(Conv2d::new(6, 16, 5))
        .append(Layer::Sigmoid)
        .append(Layer::avg_pool2d(2, 2))
        .append(Layer::Flatten)
        .append(Layer::linear(16 * 5 * 5, 120))
        .append(Layer::Sigmoid)
        .append(Layer::linear(120, 84))
        .append(Layer::Sigmoid)
        .append(Layer::linear(84, 10))
}

/// The LeNet variants of the d2l chapter's exercises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LenetVariant {
    /// d2l's LeNet-5: sigmoid activations, average pooling.
    Lenet,
    /// ReLU instead of sigmoid.
    Relu,
    /// Max pooling instead of average pooling.
    MaxPool,
    /// ReLU and max pooling.
    ReluMaxPool,
    /// Wider convolutions (16 and 32 channels) with ReLU and max pooling.
    Wide,
}

impl LenetVariant {
    pub const ALL: [LenetVariant; 5] = [
        LenetVariant::Lenet,
        LenetVariant::Relu,
        LenetVariant::MaxPool,
        LenetVariant::ReluMaxPool,
        LenetVariant::Wide,
    ];

    pub fn model(self) -> Sequential {
        let mut m = lenet();
        let relu = matches!(self, Self::Relu | Self::ReluMaxPool | Self::Wide);
        let max = matches!(self, Self::MaxPool | Self::ReluMaxPool | Self::Wide);
        if relu {
            for i in [1, 4, 8, 10] {
                m.layers[i] = Layer::ReLU;
            }
        }
        if max {
            for i in [2, 5] {
                m.layers[i] = Layer::max_pool2d(2, 2);
            }
        }
        if self == Self::Wide {
            m.layers[0] = Conv2d::new(1, 16, 5).padding(2).into();
            m.layers[3] = Conv2d::new(16, 32, 5).into();
            m.layers[7] = Layer::linear(32 * 5 * 5, 120);
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::verify;

    fn input(n: usize) -> TensorType {
        TensorType::f32([n, 1, 28, 28])
    }

    #[test]
    fn lenet_parameters_have_pytorch_names_and_shapes() {
        let g = lenet().build("lenet", input(1)).unwrap();
        verify(&g).unwrap();
        let params: Vec<(String, Vec<usize>)> = g
            .params()
            .map(|(_, n, t)| (n.to_string(), t.shape.clone()))
            .collect();
        let expect = [
            ("0.weight", vec![6, 1, 5, 5]),
            ("0.bias", vec![6]),
            ("3.weight", vec![16, 6, 5, 5]),
            ("3.bias", vec![16]),
            ("7.weight", vec![120, 400]),
            ("7.bias", vec![120]),
            ("9.weight", vec![84, 120]),
            ("9.bias", vec![84]),
            ("11.weight", vec![10, 84]),
            ("11.bias", vec![10]),
        ];
        let expect: Vec<(String, Vec<usize>)> = expect
            .into_iter()
            .map(|(n, s)| (n.to_string(), s))
            .collect();
        assert_eq!(params, expect);
        assert_eq!(g.param_count(), 61_706);
        assert_eq!(g.ty(g.output("output").unwrap()), &TensorType::f32([1, 10]));
        assert!(crate::verify::unused_nodes(&g).is_empty());
    }

    #[test]
    fn linear_with_wrong_in_features_names_the_layer() {
        let mut model = lenet();
        model.layers[7] = Layer::linear(401, 120);
        let e = model.build("m", input(1)).unwrap_err();
        assert_eq!(e.index, 7);
        assert_eq!(
            e.to_string(),
            "layer 7 (Linear(in_features=401, out_features=120)): got input f32[1,400]: \
             needs a 2-D input [N, 401] (in_features=401)"
        );
    }

    #[test]
    fn pool_larger_than_input_names_the_layer() {
        let model = Sequential::new()
            .append(Conv2d::new(1, 2, 3))
            .append(Layer::avg_pool2d(4, 4));
        let e = model.build("m", TensorType::f32([1, 1, 5, 5])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "layer 1 (AvgPool2d(kernel_size=4, stride=4)): got input f32[1,2,3,3]: \
             avg_pool2d: window 4x4 is larger than input f32[1,2,3,3]"
        );
    }

    #[test]
    fn conv_with_empty_output_names_the_layer() {
        let model = Sequential::new().append(Conv2d::new(1, 2, 7));
        let e = model.build("m", TensorType::f32([1, 1, 5, 5])).unwrap_err();
        assert_eq!(e.index, 0);
        assert!(e.to_string().starts_with(
            "layer 0 (Conv2d(1, 2, kernel_size=(7, 7), stride=(1, 1), padding=(0, 0))): got input f32[1,1,5,5]: conv2d: kernel 7x7"
        ), "{e}");
        assert!(e.to_string().ends_with("the output would be empty"), "{e}");
    }

    #[test]
    fn linear_after_conv_suggests_flatten() {
        let model = Sequential::new().append(Layer::linear(4, 2));
        let e = model.build("m", TensorType::f32([1, 1, 2, 2])).unwrap_err();
        assert!(e.message.ends_with("add a Flatten before it"), "{e}");
    }

    #[test]
    fn huge_layers_are_refused_not_overflowed() {
        let model = Sequential::new().append(Conv2d::new(1, usize::MAX, usize::MAX / 2));
        let e = model.build("m", TensorType::f32([1, 1, 5, 5])).unwrap_err();
        assert!(e.message.contains("too many elements"), "{e}");
    }

    #[test]
    fn u8_input_is_scaled_first() {
        let g = lenet()
            .build("lenet", TensorType::new(DType::U8, [2, 1, 28, 28]))
            .unwrap();
        assert_eq!(g.nodes()[1].op, Op::ScaleU8);
        assert_eq!(g.ty(g.output("output").unwrap()), &TensorType::f32([2, 10]));
        let e = lenet()
            .build("m", TensorType::new(DType::U32, [2, 1, 28, 28]))
            .unwrap_err();
        assert!(e.to_string().ends_with("needs f32 input, got u32"), "{e}");
    }

    #[test]
    fn thousands_separator() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(61_706), "61,706");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}
