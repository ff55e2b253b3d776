//! Property tests over randomly built graphs: the text form round-trips exactly, the verifier
//! accepts everything the builder makes, and no builder input panics.

use kiln_ir::{
    Conv2d, DType, Graph, Layer, LayerRef, NodeId, Op, OpPattern, Sequential, TensorType, parse,
    print, verify,
};
use proptest::prelude::*;

/// One construction step: which op to try, and seeds for its operands and attributes.
#[derive(Clone, Debug)]
struct Step {
    kind: u8,
    a: usize,
    b: usize,
    layer: Option<(usize, u8)>,
}

fn step() -> impl Strategy<Value = Step> {
    (
        0u8..12,
        any::<usize>(),
        any::<usize>(),
        proptest::option::of((0usize..20, 0u8..4)),
    )
        .prop_map(|(kind, a, b, layer)| Step { kind, a, b, layer })
}

fn dims(seed: usize, rank: usize) -> Vec<usize> {
    (0..rank).map(|i| 1 + (seed >> (3 * i)) % 6).collect()
}

/// Builds a valid graph from `steps`, skipping steps whose op does not fit the picked operands.
fn build(name: &str, leaf_names: &[String], steps: &[Step]) -> Graph {
    let mut g = Graph::new(name);
    let f32s = |g: &Graph| -> Vec<NodeId> {
        g.iter()
            .filter(|(_, n)| n.ty.dtype == DType::F32)
            .map(|(id, _)| id)
            .collect()
    };
    let mut fresh = 0usize;
    let mut next_name = |prefix: &str| {
        fresh += 1;
        format!("{}{}{fresh}", leaf_names[fresh % leaf_names.len()], prefix)
    };
    g.add_input(next_name("x"), TensorType::f32(dims(steps.len() * 7919, 4)))
        .unwrap();
    for s in steps {
        let pick = |g: &Graph, seed: usize| {
            let c = f32s(g);
            c[seed % c.len()]
        };
        let layer = s.layer.map(|(index, k)| LayerRef {
            index,
            kind: ["Conv2d", "Linear", "ReLU", "Block_2"][k as usize].to_string(),
        });
        let x = pick(&g, s.a);
        let xt = g.ty(x).clone();
        let r = match s.kind {
            0 => g.add_input(next_name("in"), TensorType::f32(dims(s.b, 1 + s.b % 4))),
            1 if xt.rank() == 4 => {
                let k = [1 + s.b % 3, 1 + (s.b / 3) % 3];
                let w = g
                    .add_param(
                        next_name("w"),
                        TensorType::f32([1 + (s.b / 9) % 4, xt.shape[1], k[0], k[1]]),
                        layer.clone(),
                    )
                    .unwrap();
                let op = Op::Conv2d {
                    stride: [1 + (s.b / 50) % 2, 1 + (s.b / 100) % 3],
                    padding: [(s.b / 300) % 3, (s.b / 900) % 2],
                };
                g.add_in_layer(op, &[x, w], layer)
            }
            2 if xt.rank() > 0 => {
                let axis = s.b % xt.rank();
                let b = g
                    .add_param(
                        next_name("b"),
                        TensorType::f32([xt.shape[axis]]),
                        layer.clone(),
                    )
                    .unwrap();
                g.add_in_layer(Op::BiasAdd { axis }, &[x, b], layer)
            }
            3 | 4 => {
                let kernel = [1 + s.b % 3, 1 + (s.b / 3) % 3];
                let stride = [1 + (s.b / 9) % 3, 1 + (s.b / 27) % 2];
                let op = if s.kind == 3 {
                    Op::AvgPool2d { kernel, stride }
                } else {
                    Op::MaxPool2d { kernel, stride }
                };
                g.add_in_layer(op, &[x], layer)
            }
            5 => {
                let op = [Op::Sigmoid, Op::Relu, Op::Tanh, Op::Silu][s.b % 4].clone();
                g.add_in_layer(op, &[x], layer)
            }
            6 => {
                let n = xt.numel();
                let shape = match s.b % 3 {
                    0 => vec![n],
                    1 => vec![1, n],
                    _ if xt.rank() > 1 => vec![xt.shape[0], n / xt.shape[0]],
                    _ => vec![n, 1],
                };
                g.add_in_layer(Op::Reshape { shape }, &[x], layer)
            }
            7 if xt.rank() == 2 => {
                let (ta, tb) = (s.b % 2 == 1, (s.b / 2) % 2 == 1);
                let k = if ta { xt.shape[0] } else { xt.shape[1] };
                let n = 1 + (s.b / 4) % 5;
                let wshape = if tb { [n, k] } else { [k, n] };
                let w = g
                    .add_param(next_name("w"), TensorType::f32(wshape), layer.clone())
                    .unwrap();
                g.add_in_layer(
                    Op::MatMul {
                        transpose_a: ta,
                        transpose_b: tb,
                    },
                    &[x, w],
                    layer,
                )
            }
            8 if xt.rank() == 2 => {
                let dtype = if s.b % 2 == 0 { DType::U32 } else { DType::I32 };
                let labels = g
                    .add_input(next_name("labels"), TensorType::new(dtype, [xt.shape[0]]))
                    .unwrap();
                g.add_in_layer(Op::SoftmaxCrossEntropy, &[x, labels], layer)
            }
            9 | 10 => {
                let axes: Vec<usize> = (0..xt.rank()).filter(|a| (s.b >> a) & 1 == 1).collect();
                let op = if s.kind == 9 {
                    Op::ReduceSum { axes }
                } else {
                    Op::ReduceMean { axes }
                };
                g.add_in_layer(op, &[x], layer)
            }
            11 => {
                let raw = g
                    .add_input(
                        next_name("raw"),
                        TensorType::new(DType::U8, dims(s.b, 1 + s.b % 4)),
                    )
                    .unwrap();
                g.add_in_layer(Op::ScaleU8, &[raw], layer)
            }
            _ => continue,
        };
        if let Ok(id) = r {
            if s.b % 5 == 0 {
                g.add_output(next_name("out"), id).unwrap();
            }
        }
    }
    let last = NodeId(g.nodes().len() - 1);
    g.add_output(next_name("result"), last).unwrap();
    g
}

fn names() -> impl Strategy<Value = Vec<String>> {
    // Quotes, backslashes and non-ASCII need escaping; control characters are refused.
    proptest::collection::vec("[a-zA-Z0-9._ \"\\\\é'-]{0,6}", 1..5)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn text_form_round_trips(
        graph_name in "[a-z \"\\\\]{0,10}",
        leaf_names in names(),
        steps in proptest::collection::vec(step(), 0..40),
    ) {
        let g = build(&graph_name, &leaf_names, &steps);
        verify(&g).unwrap();
        let text = print(&g);
        let parsed = parse(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(&parsed, &g);
        prop_assert_eq!(print(&parsed), text);
    }

    /// The op table's categories agree with the typing rules: leaves and constants read
    /// nothing, elementwise ops read operands of their own shape, broadcasts one of it.
    #[test]
    fn op_patterns_agree_with_the_typing_rules(
        leaf_names in names(),
        steps in proptest::collection::vec(step(), 0..40),
    ) {
        let g = build("patterns", &leaf_names, &steps);
        for (_, node) in g.iter() {
            let shapes: Vec<&[usize]> = node.inputs.iter().map(|&i| g.ty(i).shape.as_slice()).collect();
            match node.op.pattern() {
                OpPattern::Leaf | OpPattern::Constant => prop_assert!(shapes.is_empty()),
                OpPattern::Elementwise => {
                    prop_assert!(shapes.iter().all(|s| *s == node.ty.shape.as_slice()), "{}", node.op.name())
                }
                OpPattern::Broadcast => prop_assert_eq!(shapes[0], node.ty.shape.as_slice()),
                _ => prop_assert!(!shapes.is_empty()),
            }
        }
    }

    #[test]
    fn sequential_build_never_panics(
        layers in proptest::collection::vec(layer(), 0..10),
        input in proptest::collection::vec(0usize..40, 0..6),
    ) {
        let model = Sequential { layers };
        match model.build("m", TensorType::f32(input)) {
            Ok(g) => verify(&g).unwrap(),
            Err(e) => {
                let text = e.to_string();
                prop_assert!(text.starts_with(&format!("layer {} (", e.index)), "{}", text);
            }
        }
    }

    #[test]
    fn parser_never_panics_on_random_text(text in "\\PC{0,200}", bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        for t in [text, String::from_utf8_lossy(&bytes).into_owned()] {
            if let Ok(g) = parse(&t) {
                verify(&g).unwrap();
                prop_assert_eq!(parse(&print(&g)).unwrap(), g);
            }
        }
    }

    #[test]
    fn parser_never_panics_on_mutated_text(
        steps in proptest::collection::vec(step(), 0..12),
        cut in any::<usize>(),
        insert in "[%@=(),:\\[\\]{}\"a-z0-9 \n]{0,4}",
    ) {
        let text = print(&build("g", &["p".to_string()], &steps));
        let mut at = cut % (text.len() + 1);
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        let mutated = format!("{}{}{}", &text[..at], insert, &text[at..]);
        if let Ok(g) = parse(&mutated) {
            verify(&g).unwrap();
        }
    }
}

fn layer() -> impl Strategy<Value = Layer> {
    let small = 0usize..8;
    prop_oneof![
        (
            small.clone(),
            small.clone(),
            small.clone(),
            0usize..3,
            0usize..3
        )
            .prop_map(|(i, o, k, s, p)| Layer::from(Conv2d::new(i, o, k).stride(s).padding(p))),
        (small.clone(), small.clone()).prop_map(|(k, s)| Layer::avg_pool2d(k, s)),
        (small.clone(), small.clone()).prop_map(|(k, s)| Layer::max_pool2d(k, s)),
        Just(Layer::Sigmoid),
        Just(Layer::ReLU),
        Just(Layer::Tanh),
        Just(Layer::SiLU),
        Just(Layer::Flatten),
        (0usize..200, small).prop_map(|(i, o)| Layer::linear(i, o)),
        Just(Layer::from(Conv2d::new(1, usize::MAX, 3))),
    ]
}
