//! LeNet-5 through the front end: the d2l layer table, the IR snapshot, and the text round trip.

use kiln::ir::{self, TensorType, lenet, parse, print, verify};

const D2L_TABLE: &str = "\
input: [1, 1, 28, 28]
#   layer      output shape        params
0   Conv2d     [1, 6, 28, 28]         156
1   Sigmoid    [1, 6, 28, 28]           0
2   AvgPool2d  [1, 6, 14, 14]           0
3   Conv2d     [1, 16, 10, 10]      2,416
4   Sigmoid    [1, 16, 10, 10]          0
5   AvgPool2d  [1, 16, 5, 5]            0
6   Flatten    [1, 400]                 0
7   Linear     [1, 120]            48,120
8   Sigmoid    [1, 120]                 0
9   Linear     [1, 84]             10,164
10  Sigmoid    [1, 84]                  0
11  Linear     [1, 10]                850
total params: 61,706
";

#[test]
fn summary_matches_the_d2l_chapter() {
    let summary = lenet().summary(TensorType::f32([1, 1, 28, 28])).unwrap();
    assert_eq!(summary.to_string(), D2L_TABLE);
    let shapes: Vec<(&str, Vec<usize>)> = summary
        .rows
        .iter()
        .map(|r| (r.layer.kind(), r.output.shape.clone()))
        .collect();
    assert_eq!(
        shapes,
        [
            ("Conv2d", vec![1, 6, 28, 28]),
            ("Sigmoid", vec![1, 6, 28, 28]),
            ("AvgPool2d", vec![1, 6, 14, 14]),
            ("Conv2d", vec![1, 16, 10, 10]),
            ("Sigmoid", vec![1, 16, 10, 10]),
            ("AvgPool2d", vec![1, 16, 5, 5]),
            ("Flatten", vec![1, 400]),
            ("Linear", vec![1, 120]),
            ("Sigmoid", vec![1, 120]),
            ("Linear", vec![1, 84]),
            ("Sigmoid", vec![1, 84]),
            ("Linear", vec![1, 10]),
        ]
    );
    assert_eq!(summary.total_params(), 61_706);
}

#[test]
fn lenet_ir_at_batch_256() {
    let g = lenet()
        .build("lenet", TensorType::f32([256, 1, 28, 28]))
        .unwrap();
    verify(&g).unwrap();
    let text = print(&g);
    insta::assert_snapshot!("lenet_forward_ir_b256", text);
    let parsed = parse(&text).unwrap();
    assert_eq!(parsed, g);
    assert_eq!(print(&parsed), text);
}

#[test]
fn layer_reprs_match_pytorch() {
    let reprs: Vec<String> = lenet().layers.iter().map(|l| l.to_string()).collect();
    assert_eq!(
        reprs[0],
        "Conv2d(1, 6, kernel_size=(5, 5), stride=(1, 1), padding=(2, 2))"
    );
    assert_eq!(reprs[2], "AvgPool2d(kernel_size=2, stride=2)");
    assert_eq!(reprs[6], "Flatten()");
    assert_eq!(reprs[7], "Linear(in_features=400, out_features=120)");
    assert_eq!(reprs[8], "Sigmoid()");
}

#[test]
fn shape_error_in_a_model_file_names_line_and_layer() {
    // A hand-edited model whose Linear expects 401 features after a 400-wide flatten.
    let g = lenet()
        .build("lenet", TensorType::f32([1, 1, 28, 28]))
        .unwrap();
    let text = print(&g).replace("f32[120,400]", "f32[120,401]");
    let e = ir::parse(&text).unwrap_err();
    assert_eq!(e.line, 18);
    assert_eq!(
        e.to_string(),
        "18:9: matmul: inner dimensions differ: left f32[1,400] gives K=400, right f32[120,401] \
         gives K=401 (transpose_a=false, transpose_b=true)"
    );
}

#[test]
fn lenet_training_step_ir_at_batch_256() {
    let forward = lenet()
        .build("lenet", TensorType::new(ir::DType::U8, [256, 1, 28, 28]))
        .unwrap();
    let step = kiln::autodiff::training_step(&forward, 0.9).unwrap();
    verify(&step).unwrap();
    let text = print(&step);
    insta::assert_snapshot!("lenet_train_step_ir_b256", text);
    assert_eq!(parse(&text).unwrap(), step);
    // Outputs: the loss sum, the correct count and every parameter, updated.
    let outputs: Vec<&str> = step.outputs().iter().map(|o| o.name.as_str()).collect();
    assert_eq!(
        outputs,
        [
            "loss_sum",
            "correct",
            "0.weight",
            "0.bias",
            "3.weight",
            "3.bias",
            "7.weight",
            "7.bias",
            "9.weight",
            "9.bias",
            "11.weight",
            "11.bias"
        ]
    );
    // The backward pass is derived: one gradient op per differentiable forward op, no more.
    let count = |name: &str| step.nodes().iter().filter(|n| n.op.name() == name).count();
    assert_eq!(count("conv2d_grad_weight"), 2);
    assert_eq!(count("conv2d_grad_input"), 1, "the image needs no gradient");
    assert_eq!(count("avg_pool2d_grad"), 2);
    assert_eq!(count("sigmoid_grad"), 4);
    assert_eq!(count("softmax_cross_entropy_grad"), 1);
    assert_eq!(
        count("matmul"),
        3 + 3 + 3,
        "forward, weight gradients, input gradients"
    );
    assert_eq!(count("sub"), 10);
}
