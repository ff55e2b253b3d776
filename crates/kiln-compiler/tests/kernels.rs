//! Whole compiled kernels run on the kernel IR's interpreter against the reference executor.
//! Every kernel (`KernelModule::kernel_ir`) is run over buffers holding the reference values
//! of what it reads — packed u8 data sets, uniform parameters, parameters updated in place —
//! invocation by invocation (the classifier head's workgroup all at once, meeting at its
//! barriers) with bounds-checked reads and writes, and what it stores is compared with the
//! reference's values of those nodes. This
//! checks the generated loads, stores, entry point and fusion of real training steps (LeNet
//! and its variants, SGD and Adam, the zoo at 28x28 and real channel counts) without a device.
//!
//! Tolerance: within 1e-4 of the reference relative to its size, as the GPU tests.

mod common;

use std::collections::BTreeSet;

use common::{bind, close, feeds, words, zoo};
use kiln_autodiff::{Optimizer, evaluation_graph, read_batches_from_dataset, training_step_with};
use kiln_compiler::kir::interp::{Buffers, ChunkTable, Runner, Value};
use kiln_compiler::{Compiled, KernelKind, Target, compile, recipes};
use kiln_ir::{DType, Graph, LenetVariant, Model, NodeId, TensorType};
use kiln_reference::execute;

/// The global kernel `k` stores node `s` through (`buf<binding>`).
fn stored_global(compiled: &Compiled, k: usize, s: NodeId) -> String {
    let b = compiled.plan.buffer_of[s.0].expect("stored nodes have buffers");
    let binding = compiled.modules[k]
        .bindings
        .iter()
        .find(|x| x.buffer == b)
        .expect("bound");
    format!("buf{}", binding.binding)
}

/// Elements `elements` of node `s` as a kernel stored them (`got`) are the reference's.
fn assert_elements(
    what: &str,
    g: &Graph,
    s: NodeId,
    got: &[Value],
    want: &[Value],
    elements: impl IntoIterator<Item = usize>,
) {
    for e in elements {
        assert!(
            close(got[e], want[e]),
            "{what} stores {s} = {} element {e}: interpreter {:?}, reference {:?}",
            g.node(s).op.name(),
            got[e],
            want[e]
        );
    }
}

/// Invocations run per kernel at most (evenly spread, the last included).
const INVOCATIONS: usize = 300;

/// Invocations run per kernel (and chunk) of the blocked and chunked schedules, whose
/// invocations each compute several outputs, some summing over the whole batch.
const SCHEDULE_INVOCATIONS: usize = 40;

/// Runs every interpretable kernel of `g` compiled for `target`; returns how many ran.
fn check(what: &str, g: &Graph, target: &Target) -> usize {
    let compiled = compile(g, target).unwrap();
    let (inputs, params) = feeds(g, 5, 10);
    let values = execute(g, &inputs, &params).unwrap();
    let plan = &compiled.plan;
    let value_of = |n: NodeId| values.get(n);
    let mut ran = 0;
    for (k, (kernel, module)) in plan.kernels.iter().zip(&compiled.modules).enumerate() {
        if let KernelKind::Head(_) = kernel.kind {
            check_head(what, g, &compiled, k, &value_of);
            ran += 1;
            continue;
        }
        let ir = &module.kernel_ir;
        // What the kernel reads from each buffer (an in-place update reads the parameter it
        // overwrites), else zeros.
        let (mut buffers, _) = bind(&compiled, k, &|n| value_of(n).clone(), &|_| Value::F32(0.0));
        let invocations = module.dispatch[0] as usize * module.workgroup_size as usize;
        let step = invocations.div_ceil(INVOCATIONS).max(1);
        let mut ids: Vec<usize> = (0..invocations).step_by(step).collect();
        // The last too, once: an invocation run twice would update its parameter twice.
        if ids.last() != Some(&(invocations - 1)) {
            ids.push(invocations - 1);
        }
        let KernelKind::Map { roots } = &kernel.kind else {
            unreachable!("the head ran above")
        };
        let runner = Runner::new(ir).unwrap_or_else(|e| panic!("{what}: {}: {e}", kernel.name));
        for &id in &ids {
            runner
                .run([id as u32, 0], &mut buffers)
                .unwrap_or_else(|e| panic!("{what}: {} invocation {id}: {e}", kernel.name));
        }
        for &s in &kernel.stores {
            let global = stored_global(&compiled, k, s);
            let b = plan.buffer_of[s.0].expect("stored nodes have buffers");
            let got = &buffers[&global];
            let want = words(value_of(s), false);
            let numel = g.ty(s).numel();
            // The elements the invocations run computed: element i of each root at
            // invocation i, as of a state updated in place beside its parameter (same shape);
            // of another saved value, whatever was written over the zeros.
            let in_place = kernel.reads.iter().any(|r| plan.buffer_of[r.0] == Some(b));
            let checked: Vec<usize> = if roots.contains(&s) || in_place {
                ids.iter().copied().filter(|&i| i < numel).collect()
            } else {
                (0..numel).filter(|&i| got[i] != Value::F32(0.0)).collect()
            };
            assert!(
                !checked.is_empty() || !roots.contains(&s),
                "{what}: {}: nothing of {s} computed",
                kernel.name
            );
            assert_elements(
                &format!("{what}: {}", kernel.name),
                g,
                s,
                got,
                &want,
                checked,
            );
        }
        ran += 1;
    }
    ran
}

/// Runs the classifier head, kernel `k` of `compiled` — its one workgroup at once, the
/// invocations meeting at its barriers, every race an error — over buffers of reference
/// values, and compares every element it stores (the loss, the count of hits, the logits'
/// gradient) with the reference.
fn check_head<'v>(
    what: &str,
    g: &Graph,
    compiled: &Compiled,
    k: usize,
    value_of: &dyn Fn(NodeId) -> &'v kiln_reference::Tensor,
) {
    let kernel = &compiled.plan.kernels[k];
    let name = &kernel.name;
    let (mut buffers, _) = bind(compiled, k, &|n| value_of(n).clone(), &unwritten);
    Runner::new(&compiled.modules[k].kernel_ir)
        .and_then(|r| r.run_workgroup(&mut buffers))
        .unwrap_or_else(|e| panic!("{what}: {name}: {e}"));
    assert!(!kernel.stores.is_empty(), "{what}: {name} stores nothing");
    for &s in &kernel.stores {
        let got = &buffers[&stored_global(compiled, k, s)];
        let want = words(value_of(s), false);
        let all = 0..g.ty(s).numel();
        assert_elements(&format!("{what}: {name}"), g, s, got, &want, all);
    }
}

/// The portable schedule without register blocking: one invocation per element.
fn unblocked() -> Target {
    Target {
        block_outputs: false,
        ..Target::portable()
    }
}

fn graphs(model: &Model, name: &str, batch: usize, optimizer: &Optimizer) -> [Graph; 2] {
    let forward = model
        .forward(name, TensorType::new(DType::U8, [batch, 1, 28, 28]))
        .unwrap();
    [
        read_batches_from_dataset(&training_step_with(&forward, optimizer).unwrap(), 40).unwrap(),
        read_batches_from_dataset(&evaluation_graph(&forward).unwrap(), 40).unwrap(),
    ]
}

#[test]
fn lenet_variants_kernels_match_reference_on_the_interpreter() {
    for v in LenetVariant::ALL {
        for optimizer in [Optimizer::from(0.9), Optimizer::adam(1e-3)] {
            let what = format!("{v:?} {}", optimizer.torch_name());
            let [step, eval] = graphs(&v.model().into(), "lenet", 4, &optimizer);
            let kernels = compile(&step, &unblocked()).unwrap().modules.len();
            let ran = check(&what, &step, &unblocked());
            assert_eq!(ran, kernels, "{what}: kernels not run on the interpreter");
            assert!(check(&what, &eval, &unblocked()) > 0);
        }
    }
}

#[test]
fn zoo_kernels_match_reference_on_the_interpreter() {
    for (name, model) in zoo() {
        let [step, _] = graphs(&model, &name, 3, &Optimizer::adamw(1e-3));
        assert!(
            check(&name, &step, &unblocked()) > 0,
            "{name}: no kernel ran"
        );
    }
}

/// A value no kernel computes: what an output buffer holds before the kernel runs, so that
/// the elements it wrote can be told from the rest.
fn unwritten(dtype: DType) -> Value {
    match dtype {
        DType::F32 => Value::F32(-7.25e33),
        DType::I32 => Value::I32(-0x2bad_f00d),
        _ => Value::U32(0xdead_beef),
    }
}

/// Runs every kernel of `g` compiled for `target` that is all kernel IR — register-blocked
/// lanes and rows, uniform windows over image chunks, running sums carried from chunk to
/// chunk, one chunk per dispatch as the launch lays them out — over buffers of reference
/// values, sampled invocations of every chunk, and compares each element the kernel wrote
/// with the reference. Returns how many kernels ran and how many of them were chunked, and
/// adds the recipe of each (its header's `// recipe:` line) to `recipes`.
fn check_schedules(
    what: &str,
    g: &Graph,
    target: &Target,
    recipes: &mut BTreeSet<String>,
) -> (usize, usize) {
    let compiled = compile(g, target).unwrap();
    let (inputs, params) = feeds(g, 7, 10);
    let values = execute(g, &inputs, &params).unwrap();
    let plan = &compiled.plan;
    let launch = compiled.launch();
    let value_of = |n: NodeId| values.get(n);
    let (mut ran, mut chunked) = (0, 0);
    for (k, (kernel, module)) in plan.kernels.iter().zip(&compiled.modules).enumerate() {
        let ir = &module.kernel_ir;
        let name = &kernel.name;
        let recipe = module
            .wgsl
            .lines()
            .find_map(|l| l.strip_prefix("// recipe: "))
            .unwrap_or_else(|| panic!("{what}: {name} names no recipe"));
        recipes.insert(recipe.to_string());
        if let KernelKind::Head(_) = kernel.kind {
            check_head(what, g, &compiled, k, &value_of);
            ran += 1;
            continue;
        }
        // Each binding's data, whole; a window is cut from it chunk by chunk.
        let (mut buffers, whole) = bind(&compiled, k, &|n| value_of(n).clone(), &unwritten);
        let runner = Runner::new(ir).unwrap_or_else(|e| panic!("{what}: {name}: {e}"));
        let row = module.dispatch[0] as usize * module.workgroup_size as usize;
        let spread = |first: usize, end: usize| -> Vec<usize> {
            let step = (end - first).div_ceil(SCHEDULE_INVOCATIONS).max(1);
            let mut ids: Vec<usize> = (first..end).step_by(step).collect();
            if ids.last() != Some(&(end - 1)) {
                ids.push(end - 1);
            }
            ids
        };
        let run = |buffers: &mut Buffers, j: usize, first: usize, chunk: Option<&ChunkTable>| {
            let rel = j - first;
            runner
                .run_in([(rel % row) as u32, (rel / row) as u32], buffers, chunk)
                .unwrap_or_else(|e| panic!("{what}: {name} invocation {j}: {e}"));
        };
        match &module.chunks {
            None => {
                let all = row * module.dispatch[1] as usize;
                for j in spread(0, all) {
                    run(&mut buffers, j, 0, None);
                }
            }
            Some(c) => {
                chunked += 1;
                for s in &c.sums {
                    buffers.insert(
                        format!("sum{}", s.node.0),
                        vec![Value::F32(0.0); s.words.div_ceil(4) * 4],
                    );
                }
                let summing = !c.sums.is_empty();
                let ids = if summing {
                    spread(0, c.invocations)
                } else {
                    spread(0, c.invocations * c.batch / c.images)
                };
                for k in 0..c.count {
                    let entry = c.entry(k, &|b| launch.buffer_bytes[b]);
                    let [first, end, first_image, end_image] = [0, 1, 2, 3].map(|t| entry.table[t]);
                    for (w, window) in c.windows.iter().enumerate() {
                        let global = format!("buf{}", window.binding);
                        let data = &whole.iter().find(|(n, _)| *n == global).expect("bound").1;
                        let from = (entry.window_offsets[w] / 4) as usize;
                        let mut slice: Vec<Value> = data
                            [from.min(data.len())..(from + window.vec4s * 4).min(data.len())]
                            .to_vec();
                        slice.resize(window.vec4s * 4, Value::F32(0.0));
                        buffers.insert(global, slice);
                    }
                    let table = ChunkTable {
                        first_invocation: first,
                        end_invocation: end,
                        first_image,
                        end_image,
                        window_bases: entry.table[4..4 + c.windows.len()].to_vec(),
                    };
                    for &j in &ids {
                        if summing || (first as usize..end as usize).contains(&j) {
                            run(&mut buffers, j, first as usize, Some(&table));
                        }
                    }
                }
            }
        }
        for &s in &kernel.stores {
            let global = stored_global(&compiled, k, s);
            let before = &whole.iter().find(|(n, _)| *n == global).expect("bound").1;
            let got = &buffers[&global];
            let want = words(value_of(s), false);
            let numel = g.ty(s).numel();
            let written: Vec<usize> = (0..numel).filter(|&e| got[e] != before[e]).collect();
            let KernelKind::Map { roots } = &kernel.kind else {
                unreachable!("the head ran above")
            };
            assert!(
                !written.is_empty() || !roots.contains(&s),
                "{what}: {name}: nothing of {s} written"
            );
            assert_elements(&format!("{what}: {name}"), g, s, got, &want, written);
        }
        ran += 1;
    }
    (ran, chunked)
}

/// Every recipe `target`'s rules can choose ran on the interpreter.
fn assert_every_recipe_ran(what: &str, target: &Target, ran: &BTreeSet<String>) {
    for recipe in recipes(target.class) {
        assert!(
            ran.contains(recipe),
            "{what} on {target}: no kernel took the recipe `{recipe}` (took {ran:?})"
        );
    }
}

#[test]
fn lenet_blocked_and_chunked_schedules_match_reference_on_the_interpreter() {
    let lavapipe = Target::lavapipe();
    for target in [lavapipe.clone(), Target::portable_for(&lavapipe)] {
        let mut ran_recipes = BTreeSet::new();
        for v in LenetVariant::ALL {
            let batch = if v == LenetVariant::Lenet { 256 } else { 96 };
            let [step, eval] = graphs(&v.model().into(), "lenet", batch, &Optimizer::from(0.9));
            let what = format!("{v:?} on {target}");
            let (ran, chunked) = check_schedules(&what, &step, &target, &mut ran_recipes);
            assert!(ran >= 8, "{what}: only {ran} kernels on the kernel IR");
            if target.class == kiln_compiler::DeviceClass::Cpu {
                assert!(chunked >= 3, "{what}: only {chunked} chunked kernels ran");
            }
            assert!(check_schedules(&what, &eval, &target, &mut ran_recipes).0 > 0);
        }
        // The portable schedules with lavapipe's loop limit chunk the weight gradients
        // that would loop too long, so every portable recipe runs; LeNet on lavapipe has no
        // kernel left to one invocation per element (the zoo's test covers that one).
        if target.class != kiln_compiler::DeviceClass::Cpu {
            assert_every_recipe_ran("LeNet variants", &target, &ran_recipes);
        }
    }
}

#[test]
fn zoo_blocked_and_chunked_schedules_match_reference_on_the_interpreter() {
    for target in [Target::lavapipe(), Target::portable()] {
        let mut ran_recipes = BTreeSet::new();
        for (name, model) in zoo() {
            let [step, _] = graphs(&model, &name, 64, &Optimizer::adamw(1e-3));
            let what = format!("{name} on {target}");
            assert!(
                check_schedules(&what, &step, &target, &mut ran_recipes).0 > 0,
                "{what}: no kernel ran"
            );
        }
        if target.class == kiln_compiler::DeviceClass::Cpu {
            assert_every_recipe_ran("the zoo", &target, &ran_recipes);
        }
    }
}

/// Where blockings do as much blocked work, the kernel takes the one whose module issues the
/// fewest weighted loads, and says so: every `// tie:` line's choice costs at most each
/// candidate's, and the strided model's stride-2 convolutions (no convolution over quads),
/// whose first candidate puts the lanes on channels, take lanes over images for fewer loads.
#[test]
fn blockings_doing_as_much_work_take_the_fewest_loads() {
    let mut cheaper = BTreeSet::new();
    for (name, model) in zoo() {
        let [step, _] = graphs(&model, &name, 256, &Optimizer::from(0.9));
        let compiled = compile(&step, &Target::lavapipe()).unwrap();
        for m in &compiled.modules {
            let Some(tie) = m.wgsl.lines().find(|l| l.starts_with("// tie: ")) else {
                continue;
            };
            let number = |s: &str| s.trim_matches(|c: char| !c.is_ascii_digit()).parse::<u64>();
            let (listed, chosen) = tie.split_once(": the ").expect(tie);
            let costs: Vec<u64> = listed
                .rsplit_once("per step ")
                .expect(tie)
                .1
                .split(", ")
                .map(|c| number(c).expect(tie))
                .collect();
            let took = number(chosen.split_whitespace().nth(1).expect(tie)).expect(tie);
            assert!(costs.len() > 1, "{name} {}: {tie}", m.name);
            assert!(costs.iter().all(|&c| took <= c), "{name} {}: {tie}", m.name);
            if took < costs[0] {
                cheaper.insert(format!("{name} {}", m.name));
            }
        }
    }
    assert!(
        cheaper.iter().any(|k| k.starts_with("strided k01")),
        "no kernel took a cheaper blocking than the first: {cheaper:?}"
    );
}

/// A graph that outputs the predicted classes beside the loss and the count (the frontend
/// fuzzer's finding): no classifier head forms around logits whose argmax is stored, so the
/// argmax and the loss get kernels of their own over stored logits, and every kernel matches
/// the reference (one element per invocation, and both targets' schedules).
#[test]
fn an_argmax_output_beside_the_loss_compiles_and_matches_reference() {
    let g = kiln_ir::parse(include_str!("../../../tests/graphs/argmax_output.kir")).unwrap();
    for target in [unblocked(), Target::lavapipe(), Target::portable()] {
        let compiled = compile(&g, &target).unwrap_or_else(|e| panic!("{target}: {e}"));
        assert!(
            compiled
                .plan
                .kernels
                .iter()
                .all(|k| matches!(k.kind, KernelKind::Map { .. })),
            "{target}: a head formed around logits whose argmax is an output"
        );
        let what = format!("argmax output on {target}");
        let ran = if target.block_outputs {
            check_schedules(&what, &g, &target, &mut BTreeSet::new()).0
        } else {
            check(&what, &g, &target)
        };
        assert_eq!(ran, compiled.plan.kernels.len(), "{what}");
    }
}
