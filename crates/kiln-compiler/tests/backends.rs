//! naga's back ends on every kernel of LeNet's training step and evaluation graph, for the
//! portable target and lavapipe's CPU-class schedules: the SPIR-V reads back into naga and
//! validates, MSL and HLSL name the entry point and every binding.

use kiln_autodiff::{evaluation_graph, read_batches_from_dataset, training_step};
use kiln_compiler::backends::{self, Backend};
use kiln_compiler::{Compiled, Slot, Target, compile};
use kiln_ir::{DType, TensorType, lenet};

const SPIRV_MAGIC: u32 = 0x0723_0203;

fn lenet_graphs(batch: usize) -> Vec<kiln_ir::Graph> {
    let forward = lenet()
        .build("lenet", TensorType::new(DType::U8, [batch, 1, 28, 28]))
        .unwrap();
    vec![
        read_batches_from_dataset(&training_step(&forward, 0.9).unwrap(), 60_000).unwrap(),
        read_batches_from_dataset(&evaluation_graph(&forward).unwrap(), 10_000).unwrap(),
    ]
}

fn compiled() -> Vec<Compiled> {
    let mut out = Vec::new();
    for target in [Target::portable(), Target::lavapipe()] {
        for graph in lenet_graphs(256) {
            out.push(compile(&graph, &target).unwrap());
        }
    }
    out
}

#[test]
fn every_kernel_has_one_naga_module() {
    for c in compiled() {
        assert_eq!(c.naga().len(), c.modules.len());
        for (m, n) in c.kernels() {
            // The MSL mapping (binding n = buffer n) is wgpu's layout-order numbering only
            // for layouts without gaps.
            let bindings: Vec<u32> = m.layout().iter().map(|e| e.binding).collect();
            assert_eq!(
                bindings,
                (0..bindings.len() as u32).collect::<Vec<_>>(),
                "{}",
                m.name
            );
            // The kept IR is the module's own: its entry point and workgroup size.
            let ep = &n.module.entry_points[0];
            assert_eq!(ep.name, backends::ENTRY_POINT, "{}", m.name);
            assert_eq!(ep.workgroup_size[0], m.workgroup_size, "{}", m.name);
        }
    }
}

#[test]
fn spirv_reads_back_and_validates() {
    use naga::valid::{Capabilities, ValidationFlags, Validator};
    for c in compiled() {
        for (m, n) in c.kernels() {
            let words = backends::spirv(m, n).unwrap();
            assert_eq!(words[0], SPIRV_MAGIC, "{}", m.name);
            // Version word: 1.0.
            assert_eq!(words[1], 0x0001_0000, "{}", m.name);
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            let back = naga::front::spv::parse_u8_slice(&bytes, &Default::default())
                .unwrap_or_else(|e| panic!("{} of {}: {e}", m.name, c.graph.name));
            Validator::new(ValidationFlags::all(), Capabilities::empty())
                .validate(&back)
                .unwrap_or_else(|e| panic!("{} of {}: {e:?}", m.name, c.graph.name));
            assert_eq!(back.entry_points.len(), 1, "{}", m.name);
            assert_eq!(back.entry_points[0].name, backends::ENTRY_POINT);
            assert_eq!(back.entry_points[0].stage, naga::ShaderStage::Compute);
            let mut bound: Vec<u32> = back
                .global_variables
                .iter()
                .filter_map(|(_, g)| g.binding.map(|b| b.binding))
                .collect();
            bound.sort();
            let layout: Vec<u32> = m.layout().iter().map(|e| e.binding).collect();
            assert_eq!(bound, layout, "{}", m.name);
        }
    }
}

#[test]
fn msl_and_hlsl_name_the_entry_point_and_every_binding() {
    for c in compiled() {
        for (m, n) in c.kernels() {
            let msl = backends::msl(m, n).unwrap();
            assert!(!msl.text.is_empty());
            assert!(
                msl.text
                    .contains(&format!("kernel void {}(", msl.entry_point)),
                "{}:\n{}",
                m.name,
                msl.text
            );
            let hlsl = backends::hlsl(m, n).unwrap();
            assert!(
                hlsl.text.contains(&format!("void {}(", hlsl.entry_point)),
                "{}:\n{}",
                m.name,
                hlsl.text
            );
            assert_eq!(hlsl.entry_point, backends::ENTRY_POINT);
            assert!(hlsl.text.contains("[numthreads("), "{}", m.name);
            for text in [&msl.text, &hlsl.text] {
                assert!(text.starts_with(&format!("// kiln kernel {} ", m.name)));
            }
            for e in m.layout() {
                let b = e.binding;
                assert!(
                    msl.text.contains(&format!("[[buffer({b})]]")),
                    "{} binding {b}:\n{}",
                    m.name,
                    msl.text
                );
                let register = match e.slot {
                    Slot::Uniform => format!("register(b{b})"),
                    Slot::Storage { read_only: true } => format!("register(t{b})"),
                    Slot::Storage { read_only: false } => format!("register(u{b})"),
                };
                assert!(
                    hlsl.text.contains(&register),
                    "{} binding {b}: no {register}:\n{}",
                    m.name,
                    hlsl.text
                );
            }
        }
    }
}

#[test]
fn backends_name_themselves() {
    assert_eq!(Backend::Spirv.to_string(), "SPIR-V");
    assert_eq!(Backend::Msl.extension(), "metal");
    assert_eq!(Backend::Hlsl.extension(), "hlsl");
}
