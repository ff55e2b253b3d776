//! Each op of the reference executor against small cases computed by hand.

use std::collections::HashMap;

use kiln_ir::{DType, Graph, NodeId, Op, TensorType, lenet};
use kiln_reference::{ExecError, Tensor, execute};

/// Runs a one-op graph over f32 inputs `a0, a1, ...` and returns the op's value.
fn run(op: Op, operands: Vec<Tensor>) -> Result<Tensor, ExecError> {
    let mut g = Graph::new("t");
    let mut feeds = HashMap::new();
    let ids: Vec<NodeId> = operands
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let name = format!("a{i}");
            let id = g.add_input(&name, t.ty()).unwrap();
            feeds.insert(name, t);
            id
        })
        .collect();
    let y = g.add(op, &ids).unwrap();
    g.add_output("y", y).unwrap();
    let values = execute(&g, &feeds, &HashMap::new())?;
    Ok(values.output("y").unwrap().clone())
}

fn f(shape: &[usize], v: &[f32]) -> Tensor {
    Tensor::from_f32(shape, v.to_vec()).unwrap()
}

fn ramp(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    f(shape, &(1..=n).map(|i| i as f32).collect::<Vec<_>>())
}

fn values(t: &Tensor) -> Vec<f32> {
    t.as_f32().unwrap().to_vec()
}

fn assert_close(got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "got {got:?}, want {want:?}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol,
            "element {i}: got {g}, want {w} (all: {got:?})"
        );
    }
}

const KERNEL: [f32; 9] = [1.0, 2.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0];

#[test]
fn conv2d_3x3_known_weights() {
    let y = run(
        Op::Conv2d {
            stride: [1, 1],
            padding: [0, 0],
        },
        vec![ramp(&[1, 1, 4, 4]), f(&[1, 1, 3, 3], &KERNEL)],
    )
    .unwrap();
    assert_eq!(y.shape(), [1, 1, 2, 2]);
    assert_eq!(values(&y), [0.0, 3.0, 12.0, 15.0]);
}

#[test]
fn conv2d_padding_and_stride() {
    let y = run(
        Op::Conv2d {
            stride: [2, 2],
            padding: [1, 1],
        },
        vec![ramp(&[1, 1, 4, 4]), f(&[1, 1, 3, 3], &KERNEL)],
    )
    .unwrap();
    assert_eq!(y.shape(), [1, 1, 2, 2]);
    assert_eq!(values(&y), [-5.0, -5.0, 5.0, 15.0]);
}

#[test]
fn conv2d_sums_over_input_channels_per_output_channel() {
    // Channel 0 is the ramp, channel 1 is all ones. Output 0 applies KERNEL to channel 0 and a
    // 3x3 box of 0.5 to channel 1 (adds 4.5); output 1 reads only channel 1 with weight 1 (= 9).
    let mut x = values(&ramp(&[1, 1, 4, 4]));
    x.extend([1.0; 16]);
    let mut w = KERNEL.to_vec();
    w.extend([0.5; 9]);
    w.extend([0.0; 9]);
    w.extend([1.0; 9]);
    let y = run(
        Op::Conv2d {
            stride: [1, 1],
            padding: [0, 0],
        },
        vec![f(&[1, 2, 4, 4], &x), f(&[2, 2, 3, 3], &w)],
    )
    .unwrap();
    assert_eq!(y.shape(), [1, 2, 2, 2]);
    assert_eq!(values(&y), [4.5, 7.5, 16.5, 19.5, 9.0, 9.0, 9.0, 9.0]);
}

#[test]
fn bias_add_broadcasts_along_its_axis() {
    let y = run(
        Op::BiasAdd { axis: 1 },
        vec![f(&[2, 2, 1, 2], &[0.0; 8]), f(&[2], &[1.0, -1.0])],
    )
    .unwrap();
    assert_eq!(values(&y), [1.0, 1.0, -1.0, -1.0, 1.0, 1.0, -1.0, -1.0]);
    let y = run(
        Op::BiasAdd { axis: 0 },
        vec![f(&[2, 3], &[0.0; 6]), f(&[2], &[5.0, 7.0])],
    )
    .unwrap();
    assert_eq!(values(&y), [5.0, 5.0, 5.0, 7.0, 7.0, 7.0]);
}

#[test]
fn pooling_a_known_4x4_map() {
    let avg = run(
        Op::AvgPool2d {
            kernel: [2, 2],
            stride: [2, 2],
        },
        vec![ramp(&[1, 1, 4, 4])],
    )
    .unwrap();
    assert_eq!(values(&avg), [3.5, 5.5, 11.5, 13.5]);
    let max = run(
        Op::MaxPool2d {
            kernel: [2, 2],
            stride: [2, 2],
        },
        vec![ramp(&[1, 1, 4, 4])],
    )
    .unwrap();
    assert_eq!(values(&max), [6.0, 8.0, 14.0, 16.0]);
    let overlapping = run(
        Op::MaxPool2d {
            kernel: [3, 3],
            stride: [1, 1],
        },
        vec![ramp(&[1, 1, 4, 4])],
    )
    .unwrap();
    assert_eq!(overlapping.shape(), [1, 1, 2, 2]);
    assert_eq!(values(&overlapping), [11.0, 12.0, 15.0, 16.0]);
    // Windows that do not tile the input leave the remainder out, as PyTorch does.
    let uneven = run(
        Op::AvgPool2d {
            kernel: [2, 2],
            stride: [2, 2],
        },
        vec![ramp(&[1, 1, 3, 3])],
    )
    .unwrap();
    assert_eq!(values(&uneven), [3.0]);
}

#[test]
fn max_pool_propagates_nan() {
    let y = run(
        Op::MaxPool2d {
            kernel: [2, 2],
            stride: [2, 2],
        },
        vec![f(&[1, 1, 2, 2], &[1.0, f32::NAN, 3.0, 2.0])],
    )
    .unwrap();
    assert!(values(&y)[0].is_nan());
}

#[test]
fn activations() {
    let x = f(&[4], &[0.0, 2.0, -3.0, 0.5]);
    let s = run(Op::Sigmoid, vec![x.clone()]).unwrap();
    let want: Vec<f32> = [0.0f64, 2.0, -3.0, 0.5]
        .iter()
        .map(|v| 1.0 / (1.0 + (-v).exp()))
        .map(|v| v as f32)
        .collect();
    assert_close(&values(&s), &want, 0.0);
    assert_eq!(values(&s)[0], 0.5);
    assert_eq!(
        values(&run(Op::Relu, vec![x.clone()]).unwrap()),
        [0.0, 2.0, 0.0, 0.5]
    );
    let t = values(&run(Op::Tanh, vec![x]).unwrap());
    assert_close(&t, &[0.0, 0.964_027_6, -0.995_054_8, 0.462_117_16], 1e-7);
    // torch.nn.functional.silu(torch.tensor([1., -2., 0., 3.5], dtype=torch.float64)).
    let x = f(&[4], &[1.0, -2.0, 0.0, 3.5]);
    let s = values(&run(Op::Silu, vec![x.clone()]).unwrap());
    assert_close(&s, &[0.731_058_6, -0.238_405_84, 0.0, 3.397_407_2], 1e-7);
    // Its gradient at x for dy = 2: 2 * sigmoid(x) * (1 + x * (1 - sigmoid(x))).
    let dy = f(&[4], &[2.0; 4]);
    let g = values(&run(Op::SiluGrad, vec![x, dy]).unwrap());
    assert_close(&g, &[1.855_341, -0.181_568_5, 1.0, 2.140_546_7], 1e-6);
}

#[test]
fn matmul_with_transposes() {
    let a = f(&[2, 2], &[1.0, 2.0, 3.0, 4.0]);
    let b = f(&[2, 2], &[5.0, 6.0, 7.0, 8.0]);
    let mm = |ta, tb| {
        values(
            &run(
                Op::MatMul {
                    transpose_a: ta,
                    transpose_b: tb,
                },
                vec![a.clone(), b.clone()],
            )
            .unwrap(),
        )
    };
    assert_eq!(mm(false, false), [19.0, 22.0, 43.0, 50.0]);
    assert_eq!(mm(false, true), [17.0, 23.0, 39.0, 53.0]);
    assert_eq!(mm(true, false), [26.0, 30.0, 38.0, 44.0]);
    assert_eq!(mm(true, true), [23.0, 31.0, 34.0, 46.0]);
    // Non-square: [2,3] x [3,1].
    let y = run(
        Op::MatMul {
            transpose_a: false,
            transpose_b: false,
        },
        vec![ramp(&[2, 3]), f(&[3, 1], &[1.0, 0.0, -1.0])],
    )
    .unwrap();
    assert_eq!(y.shape(), [2, 1]);
    assert_eq!(values(&y), [-2.0, -2.0]);
}

#[test]
fn softmax_cross_entropy_matches_closed_form() {
    let logits = f(
        &[3, 3],
        &[0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 1000.0, 0.0, -1000.0],
    );
    let labels = Tensor::from_u32([3], vec![1, 2, 1]).unwrap();
    let y = run(Op::SoftmaxCrossEntropy, vec![logits.clone(), labels]).unwrap();
    let ln3 = 3f64.ln() as f32;
    let second = ((1f64.exp() + 2f64.exp() + 3f64.exp()).ln() - 3.0) as f32;
    // The third row would overflow a naive exp; the stable form gives exactly 1000.
    assert_close(&values(&y), &[ln3, second, 1000.0], 1e-6);
    let signed = Tensor::from_i32([3], vec![0, 0, 0]).unwrap();
    let y = run(Op::SoftmaxCrossEntropy, vec![logits.clone(), signed]).unwrap();
    assert_close(&values(&y)[2..], &[0.0], 0.0);

    let bad = Tensor::from_i32([3], vec![0, -1, 0]).unwrap();
    let e = run(Op::SoftmaxCrossEntropy, vec![logits.clone(), bad]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "%2 (softmax_cross_entropy): label -1 of example 1 is not a class in 0..3"
    );
    let bad = Tensor::from_u32([3], vec![0, 0, 3]).unwrap();
    assert!(matches!(
        run(Op::SoftmaxCrossEntropy, vec![logits, bad]).unwrap_err(),
        ExecError::BadLabel {
            row: 2,
            label: 3,
            classes: 3,
            ..
        }
    ));
}

#[test]
fn reductions() {
    let x = ramp(&[2, 3]);
    assert_eq!(
        values(&run(Op::ReduceSum { axes: vec![0] }, vec![x.clone()]).unwrap()),
        [5.0, 7.0, 9.0]
    );
    assert_eq!(
        values(&run(Op::ReduceMean { axes: vec![1] }, vec![x.clone()]).unwrap()),
        [2.0, 5.0]
    );
    let all = run(Op::ReduceSum { axes: vec![0, 1] }, vec![x.clone()]).unwrap();
    assert_eq!(all.shape(), [] as [usize; 0]);
    assert_eq!(values(&all), [21.0]);
    assert_eq!(
        values(&run(Op::ReduceSum { axes: vec![] }, vec![x]).unwrap()),
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    );
    let y = run(Op::ReduceSum { axes: vec![0, 2] }, vec![ramp(&[2, 2, 2])]).unwrap();
    // [[1,2],[3,4]] + [[5,6],[7,8]] summed over the first and last axes: (1+2+5+6), (3+4+7+8).
    assert_eq!(values(&y), [14.0, 22.0]);
}

#[test]
fn reshape_keeps_row_major_order() {
    let y = run(Op::Reshape { shape: vec![3, 2] }, vec![ramp(&[2, 3])]).unwrap();
    assert_eq!(y.shape(), [3, 2]);
    assert_eq!(values(&y), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
}

#[test]
fn scale_u8_maps_bytes_to_unit_interval() {
    let y = run(
        Op::ScaleU8,
        vec![Tensor::from_u8([3], vec![0, 255, 51]).unwrap()],
    )
    .unwrap();
    assert_eq!(values(&y), [0.0, 1.0, 0.2]);
}

#[test]
fn feeds_are_checked_by_name_and_type() {
    let g = lenet()
        .build("lenet", TensorType::f32([1, 1, 28, 28]))
        .unwrap();
    let x = Tensor::<f32>::zeros(&TensorType::f32([1, 1, 28, 28]));
    let inputs = HashMap::from([("x".to_string(), x)]);
    let e = execute(&g, &inputs, &HashMap::new()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "no value fed for param `0.weight` (f32[6,1,5,5])"
    );
    let wrong = HashMap::from([(
        "x".to_string(),
        Tensor::<f32>::zeros(&TensorType::new(DType::U8, [1, 1, 28, 28])),
    )]);
    let e = execute(&g, &wrong, &HashMap::new()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "input `x` is declared f32[1,1,28,28] but was fed u8[1,1,28,28]"
    );
}

/// Deterministic pseudo-random values in [-0.5, 0.5), so the test needs no RNG crate.
fn noise(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

#[test]
fn lenet_forward_is_per_example() {
    // Each example's logits depend only on that example: a batch of 3 gives the same rows as
    // three batches of 1. This exercises every layer of the model, with real shapes.
    let batch = |n| {
        lenet()
            .build("lenet", TensorType::f32([n, 1, 28, 28]))
            .unwrap()
    };
    let g3 = batch(3);
    let params: HashMap<String, Tensor> = g3
        .params()
        .enumerate()
        .map(|(i, (_, name, ty))| {
            (
                name.to_string(),
                Tensor::from_f32(ty.shape.clone(), noise(i as u64, ty.numel())).unwrap(),
            )
        })
        .collect();
    let images = noise(99, 3 * 784)
        .iter()
        .map(|v| v + 0.5)
        .collect::<Vec<_>>();
    let inputs = HashMap::from([("x".to_string(), f(&[3, 1, 28, 28], &images))]);
    let all = execute(&g3, &inputs, &params).unwrap();
    let logits = all.output("output").unwrap();
    assert_eq!(logits.shape(), [3, 10]);
    assert!(values(logits).iter().all(|v| v.is_finite()));
    let g1 = batch(1);
    for i in 0..3 {
        let one = HashMap::from([(
            "x".to_string(),
            f(&[1, 1, 28, 28], &images[i * 784..(i + 1) * 784]),
        )]);
        let row = execute(&g1, &one, &params).unwrap();
        assert_eq!(
            values(row.output("output").unwrap()),
            values(logits)[i * 10..(i + 1) * 10]
        );
    }
    // Different examples give different logits (the model is not constant).
    assert_ne!(values(logits)[0..10], values(logits)[10..20]);
}

#[test]
fn max_pool_grad_routes_to_the_first_maximum_and_accumulates_overlaps() {
    // Window values tie (5, 5): the first in row-major order gets the gradient.
    let x = f(&[1, 1, 2, 4], &[5.0, 5.0, 1.0, 2.0, 0.0, 1.0, 3.0, 2.0]);
    let dy = f(&[1, 1, 1, 2], &[10.0, 20.0]);
    let dx = run(
        Op::MaxPool2dGrad {
            kernel: [2, 2],
            stride: [2, 2],
        },
        vec![x, dy],
    )
    .unwrap();
    assert_eq!(values(&dx), [10.0, 0.0, 0.0, 0.0, 0.0, 0.0, 20.0, 0.0]);
    // Overlapping 2x2 windows with stride 1 over a peak at the centre: all four send it theirs.
    let x = f(
        &[1, 1, 3, 3],
        &[0.0, 0.0, 0.0, 0.0, 9.0, 0.0, 0.0, 0.0, 0.0],
    );
    let dy = f(&[1, 1, 2, 2], &[1.0, 2.0, 3.0, 4.0]);
    let dx = run(
        Op::MaxPool2dGrad {
            kernel: [2, 2],
            stride: [1, 1],
        },
        vec![x, dy],
    )
    .unwrap();
    assert_eq!(values(&dx), [0.0, 0.0, 0.0, 0.0, 10.0, 0.0, 0.0, 0.0, 0.0]);
}

#[test]
fn avg_pool_grad_spreads_evenly_and_skips_the_remainder() {
    let dy = f(&[1, 1, 1, 1], &[4.0]);
    let op = Op::AvgPool2dGrad {
        kernel: [2, 2],
        stride: [2, 2],
        input_size: [3, 3],
    };
    let dx = run(op, vec![dy]).unwrap();
    assert_eq!(values(&dx), [1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
}

#[test]
fn conv_gradients_of_a_single_tap() {
    // y = conv(x, w) with a 1x1x2x2 input and a 1x1x1x1 kernel of 3: dx = 3 dy, dw = sum(x dy).
    let dy = f(&[1, 1, 2, 2], &[1.0, 2.0, 3.0, 4.0]);
    let op = Op::Conv2dGradInput {
        stride: [1, 1],
        padding: [0, 0],
        input_size: [2, 2],
    };
    let dx = run(op, vec![dy.clone(), f(&[1, 1, 1, 1], &[3.0])]).unwrap();
    assert_eq!(values(&dx), [3.0, 6.0, 9.0, 12.0]);
    let op = Op::Conv2dGradWeight {
        stride: [1, 1],
        padding: [0, 0],
        kernel: [1, 1],
    };
    let dw = run(op, vec![ramp(&[1, 1, 2, 2]), dy]).unwrap();
    assert_eq!(values(&dw), [1.0 + 4.0 + 9.0 + 16.0]);
}

#[test]
fn softmax_cross_entropy_grad_is_softmax_minus_onehot() {
    let logits = f(&[2, 3], &[0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    let labels = Tensor::from_u32([2], vec![1, 2]).unwrap();
    let dloss = f(&[2], &[1.0, 0.5]);
    let g = run(Op::SoftmaxCrossEntropyGrad, vec![logits, labels, dloss]).unwrap();
    let third = 1.0 / 3.0;
    assert_close(
        &values(&g),
        &[
            third,
            third - 1.0,
            third,
            0.5 * third,
            0.5 * third,
            0.5 * (third - 1.0),
        ],
        1e-7,
    );
}

#[test]
fn argmax_takes_the_first_maximum_and_count_equal_counts() {
    let x = f(&[3, 3], &[1.0, 3.0, 3.0, -1.0, -2.0, -3.0, 0.0, 0.0, 7.0]);
    let a = run(Op::Argmax, vec![x]).unwrap();
    assert_eq!(a, Tensor::from_u32([3], vec![1, 0, 2]).unwrap());
    let b = Tensor::from_i32([3], vec![1, 2, 2]).unwrap();
    let c = run(Op::CountEqual, vec![a, b]).unwrap();
    assert_eq!(c, Tensor::from_u32([], vec![2]).unwrap());
}

#[test]
fn elementwise_constants_and_broadcast() {
    let a = f(&[2], &[1.0, 2.0]);
    let b = f(&[2], &[0.5, 4.0]);
    assert_eq!(
        values(&run(Op::Add, vec![a.clone(), b.clone()]).unwrap()),
        [1.5, 6.0]
    );
    assert_eq!(
        values(&run(Op::Sub, vec![a.clone(), b]).unwrap()),
        [0.5, -2.0]
    );
    let s = run(
        Op::Scale {
            factor: kiln_ir::Scalar(-2.0),
        },
        vec![a.clone()],
    )
    .unwrap();
    assert_eq!(values(&s), [-2.0, -4.0]);
    let y = run(
        Op::Broadcast {
            shape: vec![2, 2, 3],
            axes: vec![0, 2],
        },
        vec![a],
    )
    .unwrap();
    assert_eq!(
        values(&y),
        [1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0]
    );
    let y = f(&[3], &[0.5, 0.0, 2.0]);
    let dy = f(&[3], &[4.0, 4.0, 4.0]);
    assert_eq!(
        values(&run(Op::SigmoidGrad, vec![y.clone(), dy.clone()]).unwrap()),
        [1.0, 0.0, -8.0]
    );
    assert_eq!(
        values(&run(Op::ReluGrad, vec![y.clone(), dy.clone()]).unwrap()),
        [4.0, 0.0, 4.0]
    );
    assert_eq!(
        values(&run(Op::TanhGrad, vec![y, dy]).unwrap()),
        [3.0, 4.0, -12.0]
    );
}

#[test]
fn gather_picks_rows_and_checks_indices() {
    let data = Tensor::from_u8([3, 2], vec![1, 2, 3, 4, 5, 6]).unwrap();
    let idx = Tensor::from_u32([4], vec![2, 0, 2, 1]).unwrap();
    let y = run(Op::Gather, vec![data.clone(), idx]).unwrap();
    assert_eq!(
        y,
        Tensor::from_u8([4, 2], vec![5, 6, 1, 2, 5, 6, 3, 4]).unwrap()
    );
    let bad = Tensor::from_u32([2], vec![0, 3]).unwrap();
    assert_eq!(
        run(Op::Gather, vec![data, bad]).unwrap_err().to_string(),
        "%2 (gather): index 3 at position 1 is outside the 3 rows"
    );
}
