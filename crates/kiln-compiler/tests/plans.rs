//! Fusion plans and generated WGSL: LeNet's structure, the verifier's teeth, and random models.

use kiln_autodiff::{evaluation_graph, read_batches_from_dataset, training_step};
use kiln_compiler::{
    CodegenError, KernelKind, Placement, Plan, Target, describe, emit_wgsl, fuse, validate_wgsl,
    verify_plan,
};
use kiln_ir::testing::{random_layer, random_model};
use kiln_ir::{DType, Graph, NodeId, Sequential, TensorType, lenet};
use proptest::prelude::*;

fn step_graph(model: &Sequential, batch: usize, rows: usize) -> Graph {
    let fwd = model
        .build("lenet", TensorType::new(DType::U8, [batch, 1, 28, 28]))
        .unwrap();
    read_batches_from_dataset(&training_step(&fwd, 0.9).unwrap(), rows).unwrap()
}

fn eval_graph(model: &Sequential, batch: usize, rows: usize) -> Graph {
    let fwd = model
        .build("lenet", TensorType::new(DType::U8, [batch, 1, 28, 28]))
        .unwrap();
    read_batches_from_dataset(&evaluation_graph(&fwd).unwrap(), rows).unwrap()
}

fn ops_of(g: &Graph, plan: &Plan, k: usize) -> Vec<&'static str> {
    plan.kernels[k]
        .nodes
        .iter()
        .map(|&n| g.node(n).op.name())
        .collect()
}

#[test]
fn lenet_step_fuses_into_few_kernels_by_the_rules() {
    let g = step_graph(&lenet(), 256, 60_000);
    let t = Target::portable();
    let plan = fuse(&g, &t).unwrap();
    verify_plan(&g, &plan, &t).unwrap();
    // 12 layers: the scaled batch, 5 forward kernels (the head included), 3 input-gradient
    // kernels, 3 kernels storing upsampled activation gradients that convolutions re-read, 5
    // layer updates.
    assert_eq!(plan.kernels.len(), 17, "{}", describe(&g, &plan));
    // The batch is gathered and scaled to f32 once: conv1 reads each pixel 150 times.
    assert_eq!(ops_of(&g, &plan, 0), ["gather", "scale_u8"]);
    // Conv, bias, sigmoid and pooling in one kernel; the sigmoid output is saved for backward
    // as it is computed.
    assert_eq!(
        ops_of(&g, &plan, 1),
        ["conv2d", "bias_add", "sigmoid", "avg_pool2d"]
    );
    let sigmoid = plan.kernels[1].nodes[2];
    assert!(matches!(plan.placement[sigmoid.0], Placement::Side { .. }));
    assert_eq!(plan.kernels[1].stores.len(), 2);
    // Linear + bias + sigmoid in one kernel.
    assert_eq!(ops_of(&g, &plan, 3), ["matmul", "bias_add", "sigmoid"]);
    // Logits, cross-entropy, its gradient, the loss sum and the correct count in one kernel.
    let head = plan
        .kernels
        .iter()
        .position(|k| matches!(k.kind, KernelKind::Head(_)))
        .unwrap();
    let head_ops = ops_of(&g, &plan, head);
    for op in [
        "matmul",
        "bias_add",
        "softmax_cross_entropy",
        "softmax_cross_entropy_grad",
        "reduce_sum",
        "argmax",
        "count_equal",
    ] {
        assert!(head_ops.contains(&op), "{head_ops:?}");
    }
    // Each weight gradient is reduced in the kernel that applies its SGD update, and the
    // pool-gradient upsampling and sigmoid derivative are read through, not stored.
    for k in &plan.kernels {
        if k.name.contains("update_3.weight") {
            let ops: Vec<&str> = k.nodes.iter().map(|&n| g.node(n).op.name()).collect();
            for op in [
                "avg_pool2d_grad",
                "sigmoid_grad",
                "conv2d_grad_weight",
                "scale",
                "sub",
            ] {
                assert!(ops.contains(&op), "{ops:?}");
            }
        }
    }
    let stored_ops: Vec<&str> = g
        .iter()
        .filter(|(id, _)| plan.placement[id.0] == Placement::Stored)
        .map(|(_, n)| n.op.name())
        .collect();
    assert!(
        !stored_ops.contains(&"avg_pool2d_grad") && !stored_ops.contains(&"gather"),
        "{stored_ops:?}"
    );
    // No weight is updated before every kernel that reads its old value ran.
    for &(u, p) in &plan.updates {
        let uk = plan.producer(u).unwrap();
        for (k, kernel) in plan.kernels.iter().enumerate() {
            if kernel.reads.contains(&p) && k != uk {
                assert!(
                    k < uk,
                    "{} reads {p} after {} updates it",
                    kernel.name,
                    plan.kernels[uk].name
                );
            }
        }
    }
}

#[test]
fn lenet_graphs_compile_to_valid_wgsl() {
    let t = Target::portable();
    let relu = kiln_ir::LenetVariant::ReluMaxPool.model();
    for model in [lenet(), relu] {
        for g in [
            step_graph(&model, 256, 60_000),
            step_graph(&model, 96, 60_000),
            eval_graph(&model, 256, 10_000),
        ] {
            let plan = fuse(&g, &t).unwrap();
            verify_plan(&g, &plan, &t).unwrap();
            let modules = emit_wgsl(&g, &plan, &t).unwrap();
            assert_eq!(modules.len(), plan.kernels.len());
            for m in &modules {
                assert!(m.wgsl.starts_with(&format!("// kiln kernel {}", m.name)));
                assert!(m.bindings.len() <= 8);
            }
        }
    }
}

#[test]
fn evaluation_graph_is_forward_kernels_plus_one_head() {
    let g = eval_graph(&lenet(), 96, 10_000);
    let plan = fuse(&g, &Target::portable()).unwrap();
    assert_eq!(plan.kernels.len(), 6, "{}", describe(&g, &plan));
    assert!(matches!(plan.kernels[5].kind, KernelKind::Head(_)));
}

#[test]
fn invalid_wgsl_is_reported_with_the_kernel_and_naga_diagnostic() {
    let e =
        validate_wgsl("k07_broken", "fn f() -> u32 { let x: i32 = 1u; return x; }").unwrap_err();
    let CodegenError::Invalid { kernel, diagnostic } = &e else {
        panic!("{e}")
    };
    assert_eq!(kernel, "k07_broken");
    assert!(diagnostic.contains("wgsl:1"), "{diagnostic}");
    assert!(
        e.to_string()
            .starts_with("kernel k07_broken failed WGSL validation:")
    );
}

#[test]
fn verifier_rejects_broken_plans() {
    let g = step_graph(&lenet(), 8, 100);
    let t = Target::portable();
    let plan = fuse(&g, &t).unwrap();
    verify_plan(&g, &plan, &t).unwrap();
    let err = |p: &Plan| verify_plan(&g, p, &t).unwrap_err().to_string();

    let mut swapped = plan.clone();
    swapped.kernels.swap(0, 1);
    assert!(
        err(&swapped).contains("before k00_scale_u8 writes it"),
        "{}",
        err(&swapped)
    );

    let mut dropped = plan.clone();
    let conv = dropped.kernels[1].nodes.remove(0);
    assert!(
        err(&dropped).contains(&format!("{conv} (conv2d) is computed by no kernel")),
        "{}",
        err(&dropped)
    );

    // Moving an update between the kernels that read the parameter's old value: 7.weight is
    // read by the forward kernel k03 and by the input-gradient kernel k08.
    let mut early = plan.clone();
    let u = early
        .kernels
        .iter()
        .position(|k| k.name == "k14_update_layer7")
        .unwrap();
    let update = early.kernels.remove(u);
    early.kernels.insert(8, update);
    let e = err(&early);
    assert!(
        e.starts_with("plan for `lenet_step`: k08_reshape_l6 reads %")
            && e.ends_with("after k14_update_layer7 updated it in place"),
        "{e}"
    );

    let tight = Target {
        max_storage_buffers_per_stage: 5,
        ..Target::portable()
    };
    assert!(
        verify_plan(&g, &plan, &tight)
            .unwrap_err()
            .to_string()
            .contains("storage buffers; the target allows 5")
    );
}

#[test]
fn a_tight_binding_limit_splits_kernels() {
    let g = step_graph(&lenet(), 8, 100);
    let tight = Target {
        max_storage_buffers_per_stage: 5,
        ..Target::portable()
    };
    let plan = fuse(&g, &tight).unwrap();
    verify_plan(&g, &plan, &tight).unwrap();
    assert!(plan.kernels.len() > 16);
    emit_wgsl(&g, &plan, &tight).unwrap();
    let impossible = Target {
        max_storage_buffers_per_stage: 2,
        ..Target::portable()
    };
    let e = fuse(&g, &impossible).unwrap_err().to_string();
    assert!(
        e.contains("the device allows 2 (max_storage_buffers_per_shader_stage)"),
        "{e}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn random_models_plan_and_compile(
        convs in proptest::collection::vec(random_layer(), 0..5),
        hidden in proptest::collection::vec((1usize..9, any::<u8>()), 0..3),
        classes in 1usize..80,
        batch in 1usize..5,
        side in 3usize..9,
        buffers in 5u32..9,
        uniform_bytes in proptest::sample::select(vec![256u64, 1024, 65536]),
    ) {
        let Some(model) = random_model(1, side, convs, hidden, classes) else {
            return Err(TestCaseError::reject("layers do not fit"));
        };
        let fwd = model.build("m", TensorType::new(DType::U8, [batch, 1, side, side])).unwrap();
        let portable = Target { max_storage_buffers_per_stage: buffers, ..Target::portable() };
        // The CPU-class schedules too (chunks through small windows, vec4 rows, quads).
        let cpu = Target { max_uniform_buffer_binding_size: uniform_bytes, ..lavapipe() };
        for (t, g) in [portable, cpu].into_iter().flat_map(|t| {
            [
                read_batches_from_dataset(&training_step(&fwd, 0.1).unwrap(), 7).unwrap(),
                read_batches_from_dataset(&evaluation_graph(&fwd).unwrap(), 5).unwrap(),
                training_step(&fwd, 0.5).unwrap(),
            ]
            .map(|g| (t.clone(), g))
        }) {
            let plan = fuse(&g, &t).unwrap();
            verify_plan(&g, &plan, &t).map_err(|e| TestCaseError::fail(format!("{e}\n{}", describe(&g, &plan))))?;
            emit_wgsl(&g, &plan, &t).map_err(|e| TestCaseError::fail(e.to_string()))?;
            // Every node is either a leaf or computed somewhere.
            for (id, n) in g.iter() {
                prop_assert!(n.op.is_leaf() || plan.kernels.iter().any(|k| k.nodes.contains(&NodeId(id.0))));
            }
        }
    }
}

fn schedule_line(wgsl: &str) -> &str {
    wgsl.lines()
        .find(|l| l.starts_with("// schedule: "))
        .expect("every module states its schedule")
}

#[test]
fn register_blocking_shares_the_operand_the_outputs_have_in_common() {
    let t = Target::portable();
    let g = step_graph(&lenet(), 256, 60_000);
    let plan = fuse(&g, &t).unwrap();
    let modules = emit_wgsl(&g, &plan, &t).unwrap();
    let schedule = |name: &str| {
        let m = modules.iter().find(|m| m.name == name).unwrap();
        (schedule_line(&m.wgsl).to_string(), m.dispatch)
    };
    // conv1 has 6 output channels, not a multiple of four: four images share each weight,
    // three channels share each pixel; bias, sigmoid and the 2x2 pooling follow per row (at
    // most four rows under a pooling: each row is evaluated once per window tap).
    let (s, d) = schedule("k01_avg_pool2d_l2");
    assert!(
        s.contains("conv2d (4 lanes on axis 0 x 3 rows on axis 1)"),
        "{s}"
    );
    assert_eq!(d, [256 * 6 * 14 * 14 / 12 / 64, 1, 1]);
    // conv2's 16 output channels share each input pixel (blocked through the flatten), four
    // images share each weight.
    let (s, _) = schedule("k02_reshape_l6");
    assert!(
        s.contains("lanes at stride 25")
            && s.contains("conv2d (4 lanes on axis 1 x 4 rows on axis 0)"),
        "{s}"
    );
    // fc1: four columns share each row's input, eight rows share each column block of the
    // weights; bias and sigmoid follow per row.
    let (s, d) = schedule("k03_sigmoid_l8");
    assert!(
        s.contains("32 elements of") && s.contains("matmul (4 lanes on axis 1 x 8 rows on axis 0)"),
        "{s}"
    );
    assert_eq!(d, [(256 * 120 / 32usize).div_ceil(64) as u32, 1, 1]);
    // conv2's input gradient: four images share each weight, six input channels share each
    // dy load.
    let s = schedule("k10_conv2d_grad_input_l3").0;
    assert!(
        s.contains("conv2d_grad_input (4 lanes on axis 0 x 6 rows on axis 1)"),
        "{s}"
    );
    // conv2's weight gradient: four output channels share each input pixel, the five kernel
    // columns share each dy load; the bias update rides along in the same invocations.
    let (s, d) = schedule("k13_update_layer3");
    assert!(
        s.contains("conv2d_grad_weight (4 lanes on axis 0 x 5 rows on axis 3)"),
        "{s}"
    );
    // Only 120 invocations, each summing over the batch: workgroups of 8, so that there are
    // 15 of them to spread over the cores.
    assert_eq!(d, [15, 1, 1]);
    assert!(s.ends_with("workgroup size 8"), "{s}");
    // Through a flatten: fc1's input gradient is stored as the [N,16,5,5] conv2 reads.
    assert!(schedule("k08_reshape_l6").0.contains("x 8 rows on axis 0"));
    // The classifier head keeps its own schedule.
    assert!(schedule("k05_classifier_head").0.contains("one workgroup"));

    // With no axis a multiple of four (batch 6, 6 channels) conv1 stays one output per
    // invocation; turning blocking off leaves no lane function anywhere.
    let g6 = step_graph(&lenet(), 6, 60);
    let m6 = emit_wgsl(&g6, &fuse(&g6, &t).unwrap(), &t).unwrap();
    assert!(schedule_line(&m6[1].wgsl).contains("one invocation per element"));
    assert!(m6[1].wgsl.contains("\n// recipe: elements\n"));
    let plain = Target {
        block_outputs: false,
        ..Target::portable()
    };
    for m in emit_wgsl(&g, &fuse(&g, &plain).unwrap(), &plain).unwrap() {
        assert!(!m.wgsl.contains("vec4<f32>("), "{}", m.name);
    }
}

#[test]
fn kernel_costs_count_the_useful_work_and_compulsory_traffic() {
    use kiln_compiler::kernel_cost;
    let t = Target::portable();
    let g = step_graph(&lenet(), 256, 60_000);
    let plan = fuse(&g, &t).unwrap();
    let cost = |name: &str| {
        let k = plan.kernels.iter().find(|k| k.name == name).unwrap();
        kernel_cost(&g, &plan, k)
    };
    // conv1: 256*6*28*28 outputs of 25 multiply-adds, then bias, sigmoid, 2x2 average pool.
    let c = cost("k01_avg_pool2d_l2");
    let conv = 2 * 256 * 6 * 28 * 28 * 25;
    let elementwise = 2 * 256 * 6 * 28 * 28 + 256 * 6 * 14 * 14 * 4;
    assert_eq!(c.flops, conv + elementwise);
    // Reads the scaled f32 batch and the weights; writes the saved sigmoid and the pooled
    // output.
    let reads = 4 * 256 * 784 + 608 + 32;
    let writes = 4 * (256 * 6 * 28 * 28 + 256 * 6 * 14 * 14);
    assert_eq!(c.bytes, reads + writes);
    // conv2's weight gradient: every dy element meets the 6*5*5 weights of its channel.
    let c = cost("k13_update_layer3");
    assert!(c.flops >= 2 * 256 * 16 * 10 * 10 * 150, "{c:?}");
    // fc1 forward: 256x400 times 400x120.
    assert_eq!(
        cost("k03_sigmoid_l8").flops,
        2 * 256 * 120 * 400 + 2 * 256 * 120
    );
}

#[test]
fn the_scaled_batch_is_read_from_the_data_set_only_a_batch_at_a_time() {
    use kiln_compiler::kernel_cost;
    let t = Target::portable();
    let g = step_graph(&lenet(), 256, 60_000);
    let plan = fuse(&g, &t).unwrap();
    let c = kernel_cost(&g, &plan, &plan.kernels[0]);
    // 256 gathered images of u8 pixels and their indices in, the f32 batch out.
    assert_eq!(c.bytes, 256 * 784 + 256 * 4 + 4 * 256 * 784);
    assert_eq!(c.flops, 256 * 784);
}

#[test]
fn a_kernels_loads_per_step_follow_its_schedule() {
    use kiln_compiler::Loads;
    let g = step_graph(&lenet(), 256, 60_000);
    // Portable: one invocation per pixel, each loading its image's index and the packed
    // word holding its byte.
    let t = Target::portable();
    let plan = fuse(&g, &t).unwrap();
    let modules = emit_wgsl(&g, &plan, &t).unwrap();
    assert_eq!(
        modules[0].loads_per_step(),
        Some(Loads {
            storage: 2 * 256 * 784,
            uniform: 0,
            workgroup: 0
        }),
        "{}",
        modules[0].wgsl
    );
    // CPU-class: four pixels per invocation from one word (the index too); every loop of
    // every kernel is bounded, so every kernel has a count, and the classifier head's tree
    // reduction reads workgroup memory.
    let t = Target::lavapipe();
    let plan = fuse(&g, &t).unwrap();
    let modules = emit_wgsl(&g, &plan, &t).unwrap();
    assert_eq!(
        modules[0].loads_per_step().map(|l| l.storage),
        Some(2 * 256 * 784 / 4),
        "{}",
        modules[0].wgsl
    );
    for m in &modules {
        let loads = m.loads_per_step().unwrap_or_else(|| panic!("{}", m.wgsl));
        assert!(loads.storage + loads.uniform > 0, "{}", m.name);
        let head = matches!(
            plan.kernels.iter().find(|k| k.name == m.name).unwrap().kind,
            KernelKind::Head(_)
        );
        assert_eq!(head, loads.workgroup > 0, "{}", m.name);
    }
}

/// Asserts that generated `wgsl` contains every needle, showing the module when one is missing.
fn assert_contains(wgsl: &str, needles: &[&str]) {
    for needle in needles {
        assert!(wgsl.contains(needle), "{needle}\n{wgsl}");
    }
}

#[test]
fn kernels_of_many_small_chunks_run_several_to_a_dispatch_on_cpus() {
    let g = step_graph(&lenet(), 256, 60_000);
    let t = lavapipe();
    let plan = fuse(&g, &t).unwrap();
    let modules = emit_wgsl(&g, &plan, &t).unwrap();
    // (kernel, chunks, chunks per dispatch, dispatches): only kernels of 16 chunks or more
    // whose copies are small; conv1's weight gradient (a loop nest per copy) takes two.
    let spanned: Vec<(&str, usize, usize, usize)> = modules
        .iter()
        .filter_map(|m| {
            let c = m.chunks.as_ref()?;
            (c.spans.len() > 1).then_some((m.name.as_str(), c.count, c.spans.len(), c.dispatches()))
        })
        .collect();
    assert_eq!(
        spanned,
        [
            ("k09_sigmoid_grad_l4", 26, 5, 6),
            ("k11_sigmoid_grad_l1", 86, 5, 18),
            ("k12_update_layer0", 86, 2, 43),
        ]
    );
    for m in &modules {
        let Some(c) = &m.chunks else { continue };
        // Every span has one binding per window and a table, none shared with another.
        let mut bindings: Vec<u32> = c
            .spans
            .iter()
            .flat_map(|s| s.windows.iter().copied().chain([s.table]))
            .collect();
        assert!(c.spans.iter().all(|s| s.windows.len() == c.windows.len()));
        bindings.sort();
        bindings.dedup();
        assert_eq!(
            bindings.len(),
            c.spans.len() * (c.windows.len() + 1),
            "{}",
            m.name
        );
        assert_eq!(c.dispatches(), c.count.div_ceil(c.spans.len()));
    }
    let act_grad = &modules[11].wgsl;
    assert_contains(
        act_grad,
        &[
            "// chunks: 86 of 3 images, the last of 1 (3528 invocations each), reading %8 (56480 bytes), %54 (14144 bytes) through uniform windows, 5 per dispatch (18 dispatches; each chunk reads its own windows)",
            "//   17-20: span 4: 2 windows, then its chunk range and window bases",
            "@group(0) @binding(5) var<uniform> buf0_s1: array<vec4<f32>, 3530>;",
            "@group(0) @binding(19) var<storage, read> chunk_s4: array<vec4<u32>, 1>;",
            // Each span's copy reads its own window through its own table.
            "fn v8_x4s1_s3(i: u32) -> vec4<f32> {\n    return buf0_s3[(i - bases_s3[0].x) >> 2u];",
            "    let g0 = v54_s2(b);",
            "fn chunk_main_s4(gid: vec3<u32>) {\n    let j = gid.x + gid.y * 3584u + chunk_s4[0].x;\n    if (j >= chunk_s4[0].y) {\n        return;\n    }",
            "    let value = v57_x4s1_s4(i);\n    buf2[i >> 2u] = value;",
            "@compute @workgroup_size(64)\nfn main(@builtin(global_invocation_id) gid: vec3<u32>) {\n    chunk_main(gid);\n    chunk_main_s1(gid);\n    chunk_main_s2(gid);\n    chunk_main_s3(gid);\n    chunk_main_s4(gid);\n}",
        ],
    );
    // Functions that read no window are not copied.
    assert!(!act_grad.contains("fn v57_s1("));
    // conv1's weight gradient: both spans add to the same running sums, in chunk order.
    let conv1_dw = &modules[12].wgsl;
    assert_contains(
        conv1_dw,
        &[
            "@group(0) @binding(6) var<storage, read_write> sum58: array<f32>;",
            "@group(0) @binding(8) var<uniform> buf0_s1: array<vec4<f32>, 590>;",
            "@group(0) @binding(9) var<uniform> buf3_s1: array<vec4<f32>, 3530>;",
            "@group(0) @binding(10) var<storage, read> chunk_s1: array<vec4<u32>, 1>;",
            "        var rows = v59_columns_chunk_s1(i);",
            "    chunk_main(gid);\n    chunk_main_s1(gid);\n}",
        ],
    );
    assert_eq!(conv1_dw.matches("        sum59[i] = rows[0u];").count(), 2);
    assert_eq!(
        conv1_dw.matches("    if (chunk_s1[0].w < 256u) {").count(),
        1
    );
}

fn lavapipe() -> Target {
    Target {
        name: "llvmpipe".into(),
        class: kiln_compiler::DeviceClass::Cpu,
        max_storage_buffers_per_stage: 32,
        max_uniform_buffers_per_stage: 15,
        min_uniform_buffer_offset_alignment: 32,
        subgroup_size: Some(8),
        ..Target::portable()
    }
}

#[test]
fn image_local_kernels_read_batches_through_uniform_windows_on_cpus() {
    let g = step_graph(&lenet(), 256, 60_000);
    let t = lavapipe();
    let plan = fuse(&g, &t).unwrap();
    let modules = emit_wgsl(&g, &plan, &t).unwrap();
    let chunked: Vec<(&str, usize, usize)> = modules
        .iter()
        .filter_map(|m| {
            m.chunks
                .as_ref()
                .filter(|c| c.sums.is_empty())
                .map(|c| (m.name.as_str(), c.count, c.images))
        })
        .collect();
    // Forward and input-gradient kernels split their invocations by image; the head is not
    // image-local and has no windows. conv1's activation gradient (k11) has no load to share:
    // it computes four consecutive columns per invocation (one image, so chunks of two images
    // fit its 28x28x6 saved sigmoid outputs in a window).
    assert_eq!(
        chunked,
        [
            ("k01_avg_pool2d_l2", 13, 20),
            ("k02_reshape_l6", 20, 13),
            ("k03_sigmoid_l8", 7, 40),
            ("k04_sigmoid_l10", 2, 128),
            ("k06_sigmoid_grad_l10", 2, 128),
            ("k07_sigmoid_grad_l8", 2, 128),
            ("k08_reshape_l6", 2, 128),
            ("k09_sigmoid_grad_l4", 26, 10),
            ("k10_conv2d_grad_input_l3", 26, 10),
            ("k11_sigmoid_grad_l1", 86, 3),
        ],
        "{}",
        describe(&g, &plan)
    );
    let act_grad = &modules[11].wgsl;
    assert_contains(
        act_grad,
        &[
            "4 elements of %57 per invocation, lanes at stride 1 (301056 invocations; no reduction to block: vec4 reads)",
            "// recipe: register blocking",
            // The saved sigmoid output: one vec4 of its window.
            "    return buf0[(i - bases[0].x) >> 2u];",
            // Four columns of the 2x2 average pooling's gradient fall in two windows.
            "    return vec4<f32>(g0, g0, g1, g1) / 4.0f;",
            // Its four consecutive outputs are stored as one vec4.
            "//   2: %57 f32[256,6,28,28] (read_write, stored as vec4)",
            "var<storage, read_write> buf2: array<vec4<f32>>;",
            "    buf2[i >> 2u] = value;",
        ],
    );
    // conv2's pooled activation gradient: rows of 10 are not in fours, images of 1,600 are.
    let conv2_act = &modules[9].wgsl;
    assert_contains(
        conv2_act,
        &[
            "4 elements of %52 per invocation, lanes at stride 1 (102400 invocations; no reduction to block: vec4 reads)",
            "    return buf0[(i - bases[0].x) >> 2u];",
            "    return vec4<f32>(v51(i), v51(i + 1u), v51(i + 2u), v51(i + 3u));",
            "    buf2[i >> 2u] = value;",
        ],
    );
    // conv2's input gradient runs in whole rows: both rows of a row pair, every column, of
    // three input channels per invocation, looping over output channels and kernel rows;
    // each dy row (10 wide: starting at a multiple of four or two past one) is read as vec4s
    // shared by the channels, and the rows are stored as vec4s.
    let conv2_dx = &modules[10].wgsl;
    assert_contains(
        conv2_dx,
        &[
            "// schedule: 2 rows x every column of 3 channels of %54 per invocation (whole rows: vec4 output-gradient rows shared by the channels, one weight load per row of multiply-adds; 3584 invocations)",
            "// recipe: conv quads",
            "//   2: %54 f32[256,6,14,14] (read_write, stored as vec4)",
            "    let s = j % 2u;\n    let c0 = s * 3u;",
            "    for (var o = 0u; o < 16u; o++) {\n        for (var ky = 0u; ky < 5u; ky++) {",
            "            let w2_4 = buf0[(wb2 + 4u) >> 2u][(wb2 + 4u) & 3u];",
            "                let oy = i32(g * 2u + 1u) - i32(ky);",
            "                let dat = ((n * 16u + o) * 10u + u32(clamp(oy, 0i, 9i))) * 10u - bases[0].x;",
            "                let dq2 = select(vec4<f32>(0.0f), buf1[(dat >> 2u) + 2u], ok);",
            "                let d9 = select(dq2.y, dq2.w, dskew != 0u);",
            // Column 13 of row 1 takes dy column 9 through kernel column 4.
            "                a2_1_13 += d9 * w2_4;",
            "    buf2[((n * 6u + c0 + 2u) * 14u + g * 2u) * 14u / 4u + 3u] = vec4<f32>(a2_0_12, a2_0_13, a2_1_0, a2_1_1);",
        ],
    );
    // Weight gradients run every invocation per chunk over the chunk's images, carrying
    // their sums (weight and bias) from chunk to chunk; the update runs in the last.
    let summing: Vec<(&str, usize, usize, usize)> = modules
        .iter()
        .filter_map(|m| {
            let c = m.chunks.as_ref()?;
            (!c.sums.is_empty()).then_some((m.name.as_str(), c.count, c.invocations, c.sums.len()))
        })
        .collect();
    assert_eq!(
        summing,
        [
            ("k12_update_layer0", 86, 30, 2),
            ("k13_update_layer3", 26, 120, 2),
            ("k14_update_layer7", 7, 1500, 2),
            ("k15_update_layer9", 2, 360, 2),
            ("k16_update_layer11", 2, 42, 2),
        ]
    );
    // fc1's weight gradient carries its running sums a vec4 per row of lanes.
    assert_contains(
        &modules[14].wgsl,
        &[
            "var<storage, read_write> sum49: array<vec4<f32>>;",
            "            rows[7u] += sum49[(i + 2800u) >> 2u];",
            "        sum49[(i + 2800u) >> 2u] = rows[7u];",
            "    return array<vec4<f32>, 8>(sum49[i >> 2u], sum49[(i + 400u) >> 2u],",
            // Its bias sum stays scalar.
            "var<storage, read_write> sum47: array<f32>;",
        ],
    );
    // conv1's weight gradient (6 output channels, no axis in fours) computes the 5 kernel
    // columns of one (o, c, ky) per invocation, sliding along each input row four output
    // columns a step: its rows of 28 are whole vec4s of the uniform windows.
    let conv1_dw = &modules[12].wgsl;
    assert_contains(
        conv1_dw,
        &[
            "5 kernel columns of %61 per invocation, sliding along the input rows four output columns a step (vec4 loads) (30 invocations",
            "// recipe: kernel columns",
            "fn v59_columns_chunk(i: u32) -> array<f32, 5> {",
            // Pixels ox - 2 ..= ox + 5 of the four columns: vec4s q - 1 ..= q + 1 of the row,
            // zero outside it.
            "            var p0 = select(vec4<f32>(0.0f), buf0[xq + u32(clamp(-1i, 0i, 6i))], -1i >= 0i && -1i < 7i);",
            "                let p2 = select(vec4<f32>(0.0f), buf0[xq + u32(clamp(last, 0i, 6i))], last >= 0i && last < 7i);",
            "                let d = buf3[dq + q];",
            "                acc0 += dot(vec4<f32>(p0.z, p0.w, p1.x, p1.y), d);",
            "                acc4 += dot(vec4<f32>(p1.z, p1.w, p2.x, p2.y), d);",
            "        var rows = v59_columns_chunk(i);",
            // Its bias gradient sums each image's channel plane a vec4 at a time.
            "        let q = (r0 * 4704u + k1 * 784u - bases[0].y) >> 2u;",
            "            acc += buf3[q + r];",
            "    return acc.x + acc.y + acc.z + acc.w;",
        ],
    );
    // conv2's weight gradient: the five kernel columns of four output channels per
    // invocation, each input row and dy row read as vec4s (rows of 14 and 10), each pixel
    // serving 20 multiply-adds; the running sums and the update cover the four channels.
    let conv2_dw = &modules[13].wgsl;
    assert_contains(
        conv2_dw,
        &[
            "// schedule: 5 kernel columns x 4 output channels of %65 per invocation, in whole rows (vec4 rows of the input and dy, each pixel serving 20 multiply-adds; 120 invocations; %55 conv2d_grad_weight)",
            "// recipe: weight-gradient rows",
            "fn v55_columns_chunk(i: u32) -> array<f32, 20> {",
            "            let xat = ((n * 6u + c) * 14u + oy + ky - 0u) * 14u - bases[0].x;",
            "                let dat = ((n * 16u + o + 3u) * 10u + oy) * 10u - bases[0].y;",
            "                a3_4 += d0 * x4 + d1 * x5 + d2 * x6 + d3 * x7 + d4 * x8 + d5 * x9 + d6 * x10 + d7 * x11 + d8 * x12 + d9 * x13;",
            "// nest: [16, 6, 5, 5], axis 0 / 4 rows, axis 3 / 5 columns: grid 4 x 30",
            "    let g0 = j / 30u;\n    let g1 = j % 30u;\n    let i = g0 * 600u + g1 * 5u;",
            "            rows[19u] += sum55[i + 454u];",
            "    buf1[i + 454u] = v65(i + 454u);",
            // The batch loop covers the chunk's images only.
            "for (var n = chunk[0].z; n < chunk[0].w; n++) {",
            // Before the last chunk the running sums are stored instead of the update.
            "    if (chunk[0].w < 256u) {",
            "@group(0) @binding(7) var<storage, read_write> sum55: array<f32>;",
            // The sums so far are added after the first chunk.
            "    if (chunk[0].z != 0u) {",
        ],
    );
    // The batch is scaled four pixels at a time: one packed word of the data set each.
    assert_contains(
        &modules[0].wgsl,
        &[
            "fn v2_word(i: u32) -> u32 {\n    let row = i / 784u;\n    return v1_word(v0(row) * 784u + i % 784u);\n}",
            "    let w = v2_word(i);",
            "    buf2[i >> 2u] = value;",
        ],
    );
    // conv1 (one input channel, 6 outputs, rows of 28) runs in column quads: four output
    // columns of both rows of a pooling window per invocation, every channel, pixel rows
    // read as vec4s shared by the taps, weights at constant indices, the saved activation
    // stored as vec4s.
    let conv1 = &modules[1].wgsl;
    assert_contains(
        conv1,
        &[
            "// schedule: 2 rows x 4 columns of every channel of %6 per invocation (column quads: vec4 pixel rows, constant-index weights; 25088 invocations)",
            "// recipe: conv quads",
            "//   3: %8 f32[256,6,28,28] (read_write, stored as vec4)",
            "@group(0) @binding(3) var<storage, read_write> buf3: array<vec4<f32>>;",
            "            let p0 = select(vec4<f32>(0.0f), buf0[xq + u32(clamp(qi + -1i, 0i, 6i))], ok && qi + -1i >= 0i && qi + -1i < 7i);",
            // Each channel's weights are vec4s at constant indices; the quad's pixels under
            // each kernel column are shared by both rows.
            "        let wq0 = buf1[0u];",
            "            let s0 = vec4<f32>(p0.z, p0.w, p1.x, p1.y);",
            "            let s4 = vec4<f32>(p1.z, p1.w, p2.x, p2.y);",
            "            a0 += s0 * wq0.x;",
            // The last weight (o 5, ky 4, kx 4) for the second row.
            "        let wq37 = buf1[37u];",
            "            a1 += s4 * wq37.y;",
            "        buf3[((n * 6u + 5u) * 28u + g * 2u + 1u) * 7u + q] = e1_1;",
            "        buf4[((n * 6u + 0u) * 14u + g) * 14u + q * 2u + 1u] = (e0_1.z + e0_1.w + e1_1.z + e1_1.w) / 4.0f;",
        ],
    );
    let conv2 = &modules[2];
    let c = conv2.chunks.as_ref().unwrap();
    // 20 invocations per image (5 pooled rows x 4 sets of 4 channels), 13 images a chunk.
    assert_eq!(c.invocations, 260);
    assert_eq!(c.windows.len(), 1);
    assert_eq!(plan.buffers[c.windows[0].buffer].ty.shape, [256, 6, 14, 14]);
    // Each window covers its 13 images wherever they start, within 64 KiB.
    assert!(c.windows[0].vec4s * 16 >= 13 * 1176 * 4 + 28 && c.windows[0].vec4s <= 4096);
    // conv2 (rows of 14 -> 10, 2,400 weights) runs in whole rows: both rows of a pooling
    // window, every column, four channels per invocation; an input row starts at a multiple
    // of four (even rows) or two past one (odd rows) and is read as whole vec4s from there.
    assert_contains(
        &conv2.wgsl,
        &[
            "// schedule: 2 rows x every column of 4 channels of %12 per invocation (whole rows: vec4 pixel rows shared by the channels, one weight load per row of multiply-adds; 5120 invocations)",
            "// recipe: conv quads",
            "// chunks: 20 of 13 images, the last of 9 (260 invocations each), reading %9 (61184 bytes) through uniform windows, one per dispatch",
            "var<storage, read> chunk: array<vec4<u32>, 1>;",
            "    let j = gid.x + gid.y * 288u + chunk[0].x;",
            "    let n = j / 20u;\n    let g = (j / 4u) % 5u;\n    let s = j % 4u;\n    let o0 = s * 4u;",
            "        for (var ky = 0u; ky < 5u; ky++) {",
            "            let wb1 = (((o0 + 1u) * 6u + c) * 5u + ky) * 5u;",
            "            let w1_4 = buf1[(wb1 + 4u) >> 2u][(wb1 + 4u) & 3u];",
            "                let iy = i32(g * 2u + 1u + ky) - 0i;",
            "                let xat = ((n * 6u + c) * 14u + u32(clamp(iy, 0i, 13i))) * 14u - bases[0].x;",
            "                let xskew = xat & 3u;",
            "                let xq3 = select(vec4<f32>(0.0f), buf0[(xat >> 2u) + 3u], ok);",
            // Pixel 13 is lane 13 of an even row's vec4s, lane 15 of an odd one's.
            "                let x13 = select(xq3.y, xq3.w, xskew != 0u);",
            "                a0_1_9 += x13 * w0_4;",
            // Both rows' 20 saved activations are five vec4s; the pooled row five scalars.
            "        buf3[((n * 16u + o) * 10u + g * 2u) * 10u / 4u + 4u] = e4_1;",
            "        buf4[((n * 16u + o) * 5u + g) * 5u + 4u] = (e2_1.x + e2_1.y + e4_1.z + e4_1.w) / 4.0f;",
        ],
    );
    // The GPU tests' small-window schedule (20 KiB) chunks their batch of 8 too: both
    // convolutions, both pooled activation gradients and both convolution weight gradients.
    let g8 = step_graph(&lenet(), 8, 64);
    let small = Target {
        max_uniform_buffer_binding_size: 20 << 10,
        ..lavapipe()
    };
    let m8 = emit_wgsl(&g8, &fuse(&g8, &small).unwrap(), &small).unwrap();
    let chunked8: Vec<(&str, usize, usize)> = m8
        .iter()
        .filter_map(|m| {
            let c = m.chunks.as_ref()?;
            (c.count > 1).then_some((m.name.as_str(), c.count, c.images))
        })
        .collect();
    // conv2's pooled activation gradient, input gradient and weight gradient run 3 + 3 + 2
    // images: the GPU tests cover a shorter last chunk of each kind.
    assert_eq!(
        chunked8,
        [
            ("k01_avg_pool2d_l2", 2, 4),
            ("k02_reshape_l6", 2, 4),
            ("k09_sigmoid_grad_l4", 3, 3),
            ("k10_conv2d_grad_input_l3", 3, 3),
            ("k11_sigmoid_grad_l1", 8, 1),
            ("k12_update_layer0", 8, 1),
            ("k13_update_layer3", 3, 3)
        ]
    );
    // fc1's weights (120x400 f32, 192,000 bytes) exceed one uniform binding: four parts of
    // 30 whole rows, so that no load reads every part. The forward kernel's lanes lie a
    // quarter of the 120 features apart (lane k reads part k, at the same index), consecutive
    // invocations one feature apart; its bias lanes too.
    let fc1 = &modules[3].wgsl;
    assert_contains(
        fc1,
        &[
            "lanes at stride 30 (960 invocations; blocked: %19 matmul (4 lanes on axis 1 x 8 rows on axis 0))",
            "//   1: 7.weight f32[120,400] (4 uniform parts)",
            "@group(0) @binding(4) var<uniform> buf1_3: array<vec4<f32>, 3000>;",
            "fn v17_x4s12000(i: u32) -> vec4<f32> {\n    return vec4<f32>(buf1_0[i >> 2u][i & 3u], buf1_1[i >> 2u][i & 3u], buf1_2[i >> 2u][i & 3u], buf1_3[i >> 2u][i & 3u]);",
            // The rows share the lanes' operand: loaded once per step for all eight.
            "        let at0 = r * 400u + p;\n        let shared0 = v17_x4s12000(c * 400u + p);\n        acc0 += v16(at0) * shared0;",
            "        acc7 += v16(at0 + 2800u) * shared0;",
            "    return red + v18_x4s30((i / 1u) % 120u);",
            "    let g0 = j / 30u;\n    let g1 = j % 30u;\n    let i = g0 * 960u + g1;",
            "    buf6[i + 90u] = rows[0u].w;\n    buf6[i + 120u] = rows[1u].x;",
        ],
    );
    // Its input gradient sums over the weights' rows: one loop per part, each reading four
    // consecutive columns as one vec4 of its part.
    let fc1_dx = &modules[8].wgsl;
    assert_contains(
        fc1_dx,
        &[
            "//   0: 7.weight f32[120,400] (4 uniform parts)",
            "    for (var p = 0u; p < 30u; p++) {\n        let at0 = r * 120u + p;\n        let shared0 = buf0_0[(p * 400u + c) >> 2u];",
            "    for (var p = 90u; p < 120u; p++) {\n        let at0 = r * 120u + p;\n        let shared0 = buf0_3[(p * 400u + c - 36000u) >> 2u];\n        acc0 += v46(at0) * shared0;",
        ],
    );
    // A load that may fall in any part still reads every part and selects (the scalar form).
    assert!(fc1.contains(
        "    return select(select(select(p0, p1, q >= 3000u), p2, q >= 6000u), p3, q >= 9000u);"
    ));
    // Other devices keep one dispatch per kernel.
    let portable = emit_wgsl(
        &g,
        &fuse(&g, &Target::portable()).unwrap(),
        &Target::portable(),
    );
    assert!(portable.unwrap().iter().all(|m| m.chunks.is_none()));
}

/// The zoo's MLP (tests/zoo/mlp.kir): its bias updates sum a chunked `[256, 256]` gradient,
/// whose vec4 lane function once called the finished-sum loader instead of the chunk's part,
/// so the module declared a window it never read (and computed from stale sums). The
/// compiler now refuses any module whose WGSL does not use exactly its binding list.
#[test]
fn chunked_bias_updates_read_their_windows() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/zoo/mlp.kir");
    let model: kiln_ir::Model = kiln_ir::parse_file(std::path::Path::new(path))
        .unwrap()
        .into();
    let fwd = model
        .forward("mlp", TensorType::new(DType::U8, [256, 1, 28, 28]))
        .unwrap();
    let g = read_batches_from_dataset(&training_step(&fwd, 0.1).unwrap(), 60_000).unwrap();
    let t = lavapipe();
    let plan = fuse(&g, &t).unwrap();
    let modules = emit_wgsl(&g, &plan, &t).unwrap();
    let bias = modules
        .iter()
        .find(|m| m.name.ends_with("update_1.bias"))
        .unwrap();
    assert!(bias.chunks.is_some(), "{}", bias.wgsl);
    assert!(bias.wgsl.contains("v26_chunk(i + 1u)"), "{}", bias.wgsl);
}

/// lavapipe ends an invocation's loops after 65,535 iterations: the classifier head of an
/// evaluation over 10,000 images takes more invocations until each fits, and a batch no
/// workgroup can cover is refused with the limit's name.
#[test]
fn kernels_stay_within_the_loop_limit_or_are_refused() {
    let t = Target {
        max_loop_iterations: Some(kiln_compiler::LAVAPIPE_LOOP_ITERATIONS),
        max_workgroup_size_x: 1024,
        ..lavapipe()
    };
    let g = eval_graph(&lenet(), 10_000, 10_000);
    let plan = fuse(&g, &t).unwrap();
    let modules = emit_wgsl(&g, &plan, &t).unwrap();
    for m in &modules {
        let n = m.loop_iterations.unwrap();
        assert!(n <= 65_535, "{}: {n}", m.name);
    }
    let head = modules.iter().find(|m| m.name.contains("head")).unwrap();
    assert!(head.workgroup_size > 64, "{}", head.workgroup_size);
    // 60,000 rows in workgroups of at most 256 are 235 rows per invocation, too many to
    // multiply 84 x 10 in each: the last matrix product is a kernel of its own and the head
    // only adds the bias, with every kernel within the limit.
    let small = Target {
        max_workgroup_size_x: 256,
        ..t.clone()
    };
    let g = eval_graph(&lenet(), 60_000, 60_000);
    let plan = fuse(&g, &small).unwrap();
    let modules = emit_wgsl(&g, &plan, &small).unwrap();
    let head = modules.iter().find(|m| m.name.contains("head")).unwrap();
    assert!(!head.wgsl.contains("matmul"), "{}", head.wgsl);
    assert!(modules.iter().any(|m| m.name.contains("matmul")));
    for m in &modules {
        assert!(m.loop_iterations.unwrap() <= 65_535, "{}", m.name);
    }
    // The portable schedule has no such limit of its own; on lavapipe it gets the device's,
    // and conv1's weight gradient (416,256 iterations over the whole batch) then sums the
    // batch in chunks of images read straight from storage, carrying running sums.
    let step = step_graph(&lenet(), 256, 60_000);
    let portable = Target::portable_for(&t);
    let modules = emit_wgsl(&step, &fuse(&step, &portable).unwrap(), &portable).unwrap();
    for m in &modules {
        assert!(m.loop_iterations.unwrap() <= 65_535, "{}", m.name);
    }
    let dw = modules
        .iter()
        .find(|m| m.name.contains("update_layer0"))
        .unwrap();
    let c = dw.chunks.as_ref().expect("chunked");
    assert!(c.windows.is_empty() && !c.sums.is_empty(), "{c:?}");
    assert!(c.count > 1 && c.images * c.count >= 256, "{c:?}");
    assert!(!dw.wgsl.contains("bases"), "{}", dw.wgsl);
    assert!(
        emit_wgsl(
            &step,
            &fuse(&step, &Target::portable()).unwrap(),
            &Target::portable()
        )
        .is_ok()
    );
}

/// Which stored values each update kernel of a step writes, by output name.
fn update_stores(g: &Graph, plan: &Plan) -> Vec<Vec<String>> {
    let names: std::collections::HashMap<NodeId, &str> = g
        .outputs()
        .iter()
        .map(|o| (o.node, o.name.as_str()))
        .collect();
    plan.kernels
        .iter()
        .filter(|k| k.name.contains("update"))
        .map(|k| {
            let mut s: Vec<String> = k
                .stores
                .iter()
                .filter_map(|n| names.get(n).map(|n| n.to_string()))
                .collect();
            s.sort();
            s
        })
        .collect()
}

#[test]
fn optimizer_state_is_updated_in_the_parameters_kernel() {
    use kiln_autodiff::{Optimizer, training_step_with};
    let fwd = lenet()
        .build("lenet", TensorType::new(DType::U8, [256, 1, 28, 28]))
        .unwrap();
    let momentum = Optimizer::Sgd {
        lr: 0.1,
        momentum: 0.9,
        nesterov: false,
        weight_decay: 1e-4,
    };
    let target = Target::portable();
    // Momentum: the gradient, the buffer and the parameter in one kernel per layer, as many
    // kernels as plain SGD.
    let g = read_batches_from_dataset(&training_step_with(&fwd, &momentum).unwrap(), 1000).unwrap();
    let plan = fuse(&g, &target).unwrap();
    verify_plan(&g, &plan, &target).unwrap();
    let sgd = fuse(&step_graph(&lenet(), 256, 1000), &target).unwrap();
    assert_eq!(plan.kernels.len(), sgd.kernels.len());
    let stores = update_stores(&g, &plan);
    assert!(
        stores.contains(&vec![
            "0.bias".into(),
            "0.weight".into(),
            "optim.0.bias.momentum_buffer".into(),
            "optim.0.weight.momentum_buffer".into(),
        ]),
        "{stores:?}"
    );
    // Adam: each gradient stored once (both moments read it), then one kernel per parameter
    // writes the parameter and its two moments; the step count has its own.
    let g = read_batches_from_dataset(
        &training_step_with(&fwd, &Optimizer::adam(1e-3)).unwrap(),
        1000,
    )
    .unwrap();
    let plan = fuse(&g, &target).unwrap();
    verify_plan(&g, &plan, &target).unwrap();
    let stores = update_stores(&g, &plan);
    assert!(
        stores.contains(&vec!["optim.step".to_string()]),
        "{stores:?}"
    );
    assert!(
        stores.contains(&vec![
            "3.weight".into(),
            "optim.3.weight.exp_avg".into(),
            "optim.3.weight.exp_avg_sq".into(),
        ]),
        "{stores:?}"
    );
    assert_eq!(stores.len(), 11, "{stores:?}");
    emit_wgsl(&g, &plan, &target).unwrap();
}

/// Found by the `frontend` fuzz target: two parameters multiplied together (a factorised
/// linear layer) could not be ordered, each fused update reading the other's old value.
#[test]
fn a_factorised_layer_stores_its_updates_deltas_and_trains() {
    let text = "graph \"factored\" {
  %0 = input \"x\" : f32[8,1,28,28]
  %1 = reshape(%0) shape=[8,784] : f32[8,784]
  %2 = param \"a\" : f32[10,4]
  %3 = param \"b\" : f32[4,784]
  %4 = matmul(%2, %3) transpose_a=false transpose_b=false : f32[10,784]
  %5 = matmul(%1, %4) transpose_a=false transpose_b=true : f32[8,10]
  output \"output\" = %5
}
";
    let fwd = kiln_ir::parse(text).unwrap();
    let step = training_step(&fwd, 0.1).unwrap();
    for target in [Target::portable(), lavapipe()] {
        let plan = fuse(&step, &target).unwrap();
        verify_plan(&step, &plan, &target).unwrap();
        emit_wgsl(&step, &plan, &target).unwrap();
    }
}

/// A 3x3/2 max pooling's gradient, inlined into the convolution's weight gradient, recomputes
/// each window's maximum per product: on lavapipe's loop limit that kernel cannot run, so the
/// compiler stores the pool gradient instead (found by the random-model GPU test on 7x7
/// images; since the gradient loops over only the windows that can hold an element, it takes
/// 15x15 images at batch 8 to pass the limit).
#[test]
fn a_window_gradient_recomputed_past_the_loop_limit_is_stored() {
    use kiln_compiler::compile;
    use kiln_ir::{Conv2d, Layer};
    let model = Sequential::new()
        .append(Layer::from(Conv2d::new(1, 1, 2)))
        .append(Layer::max_pool2d(3, 2))
        .append(Layer::Flatten)
        .append(Layer::linear(36, 2));
    let fwd = model
        .build("random", TensorType::new(DType::U8, [8, 1, 15, 15]))
        .unwrap();
    let step = read_batches_from_dataset(&training_step(&fwd, 0.5).unwrap(), 9).unwrap();
    // Without the loop limit the pool gradient is inlined into the weight gradient.
    let unlimited = Target {
        max_loop_iterations: None,
        ..Target::lavapipe()
    };
    let pool_grad_roots = |c: &kiln_compiler::Compiled| {
        c.plan
            .kernels
            .iter()
            .filter(|k| {
                matches!(&k.kind, KernelKind::Map { roots }
                    if roots.iter().any(|r| step.node(*r).op.name() == "max_pool2d_grad"))
            })
            .count()
    };
    assert_eq!(pool_grad_roots(&compile(&step, &unlimited).unwrap()), 0);
    let c = compile(&step, &Target::lavapipe()).unwrap();
    assert_eq!(pool_grad_roots(&c), 1, "{}", c.describe());
    for m in &c.modules {
        assert!(m.loop_iterations.unwrap() <= 65_535, "{}", m.name);
    }
}

/// A linear layer straight on the flattened batch (no convolution) reads each scaled pixel
/// once per output feature through the flatten: the batch is gathered and scaled once by its
/// own kernel, and no matmul kernel recomputes the gather (measured: the first layer's kernel
/// of a 784-256-10 MLP 55-64 -> 19-26 ms per step on lavapipe).
#[test]
fn a_linear_layer_on_the_flattened_batch_reads_it_stored() {
    let mlp = Sequential::new()
        .append(kiln_ir::Layer::Flatten)
        .append(kiln_ir::Layer::linear(784, 256))
        .append(kiln_ir::Layer::ReLU)
        .append(kiln_ir::Layer::linear(256, 10));
    let g = step_graph(&mlp, 256, 60_000);
    for t in [Target::portable(), Target::lavapipe()] {
        let plan = fuse(&g, &t).unwrap();
        verify_plan(&g, &plan, &t).unwrap();
        assert_eq!(ops_of(&g, &plan, 0), ["gather", "scale_u8"], "{t}");
        for k in 1..plan.kernels.len() {
            let ops = ops_of(&g, &plan, k);
            assert!(
                !ops.contains(&"scale_u8"),
                "{t}: kernel {k} recomputes the scaled batch: {ops:?}\n{}",
                describe(&g, &plan)
            );
        }
    }
}
