//! The launch description: what every dispatch binds, checked against the kernels' layouts,
//! the buffers' sizes and the chunk schedules it comes from.

use kiln_autodiff::{evaluation_graph, read_batches_from_dataset, training_step};
use kiln_compiler::{
    Access, Compiled, DeviceClass, Launch, Resource, ScratchContents, Slot, Target, compile,
};
use kiln_ir::{DType, Graph, TensorType, lenet};

fn graphs(batch: usize) -> [Graph; 2] {
    let fwd = lenet()
        .build("lenet", TensorType::new(DType::U8, [batch, 1, 28, 28]))
        .unwrap();
    [
        read_batches_from_dataset(&training_step(&fwd, 0.9).unwrap(), 60_000).unwrap(),
        read_batches_from_dataset(&evaluation_graph(&fwd).unwrap(), 10_000).unwrap(),
    ]
}

fn words(bytes: &[u8], at: u64, n: usize) -> Vec<u32> {
    bytes[at as usize..at as usize + 4 * n]
        .chunks_exact(4)
        .map(|w| u32::from_le_bytes(w.try_into().unwrap()))
        .collect()
}

/// What holds for any launch: each dispatch binds every layout slot once, with a range inside
/// its buffer at an offset the slot's kind allows; plain kernels are one dispatch.
fn check_bindings(c: &Compiled, l: &Launch, target: &Target) {
    assert_eq!(l.kernels.len(), c.modules.len());
    assert_eq!(l.buffer_bytes.len(), c.plan.buffers.len());
    for (b, &bytes) in c.plan.buffers.iter().zip(&l.buffer_bytes) {
        assert!(bytes >= b.bytes() && bytes % 16 == 0, "{}", b.name);
    }
    for (m, k) in c.modules.iter().zip(&l.kernels) {
        let layout = m.layout();
        if m.chunks.is_none() {
            assert_eq!(k.dispatches.len(), 1, "{}", m.name);
            assert!(k.scratch.is_empty(), "{}", m.name);
        }
        for s in &k.scratch {
            assert_eq!(s.contents.len() % 16, 0, "{}", s.label);
        }
        for d in &k.dispatches {
            assert_eq!(d.workgroups, m.dispatch, "{}", m.name);
            let bound: Vec<u32> = d.bindings.iter().map(|b| b.binding).collect();
            let slots: Vec<u32> = layout.iter().map(|e| e.binding).collect();
            assert_eq!(bound, slots, "{}: every slot once, in order", m.name);
            for (b, e) in d.bindings.iter().zip(&layout) {
                let (offset, size, len) = match b.resource {
                    Resource::Buffer {
                        buffer,
                        offset,
                        size,
                    } => (offset, size, l.buffer_bytes[buffer]),
                    Resource::Scratch {
                        index,
                        offset,
                        size,
                    } => (offset, size, k.scratch[index].contents.len()),
                };
                let at = format!("{} binding {}", m.name, b.binding);
                assert!(offset + size.unwrap_or(0) <= len, "{at}: past the end");
                assert!(size.is_none_or(|s| s > 0), "{at}");
                let align = match e.slot {
                    Slot::Uniform => target.uniform_offset_alignment(),
                    Slot::Storage { .. } => target.storage_offset_alignment(),
                };
                assert_eq!(offset % align, 0, "{at}: offset {offset}");
            }
        }
    }
}

/// What chunked kernels' dispatches bind: windows covering each span's chunk, the span's slot
/// of the table (its chunk's range and window bases; all zero past the last chunk), the
/// running sums whole, split values part by part; and the sizes the runtime used to make.
fn check_chunks(c: &Compiled, l: &Launch) {
    for (m, k) in c.modules.iter().zip(&l.kernels) {
        for b in &m.bindings {
            if let Access::Split { parts, part_bytes } = b.access {
                for d in &k.dispatches {
                    let offsets: Vec<u64> = d
                        .bindings
                        .iter()
                        .filter(|r| (b.binding..b.binding + parts).contains(&r.binding))
                        .map(|r| match r.resource {
                            Resource::Buffer { buffer, offset, .. } => {
                                assert_eq!(buffer, b.buffer);
                                offset
                            }
                            Resource::Scratch { .. } => panic!("{}: a split part", m.name),
                        })
                        .collect();
                    let want: Vec<u64> = (0..parts).map(|p| u64::from(p) * part_bytes).collect();
                    assert_eq!(offsets, want, "{}", m.name);
                }
            }
        }
        let Some(ch) = &m.chunks else { continue };
        let spans = ch.spans.len();
        assert_eq!(k.dispatches.len(), ch.dispatches(), "{}", m.name);
        assert_eq!(k.scratch.len(), 1 + ch.sums.len(), "{}", m.name);
        let ScratchContents::Bytes(table) = &k.scratch[0].contents else {
            panic!("{}: the chunk table has its bytes", m.name);
        };
        // A slot: the range, then the bases at an offset both alignments allow.
        let bases_at = ch.alignment.max(ch.table_alignment).max(16);
        let stride = bases_at + (ch.bases_vec4s() as u64 * 16).div_ceil(bases_at) * bases_at;
        assert_eq!(
            table.len() as u64,
            stride * (ch.dispatches() * spans) as u64,
            "{}",
            m.name
        );
        for (s, sum) in ch.sums.iter().enumerate() {
            assert_eq!(
                k.scratch[1 + s].contents,
                ScratchContents::Zeroed((sum.words.max(4) as u64 * 4).div_ceil(16) * 16)
            );
        }
        for w in &ch.windows {
            let data = c.plan.buffers[w.buffer].bytes();
            assert_eq!(l.buffer_bytes[w.buffer], data + ch.alignment, "{}", m.name);
        }
        for (d, dispatch) in k.dispatches.iter().enumerate() {
            let find = |binding: u32| {
                dispatch
                    .bindings
                    .iter()
                    .find(|b| b.binding == binding)
                    .expect("bound")
                    .resource
            };
            for (s, span) in ch.spans.iter().enumerate() {
                let slot = (d * spans + s) as u64 * stride;
                let at = format!("{} dispatch {d} span {s}", m.name);
                assert_eq!(
                    find(span.table),
                    Resource::Scratch {
                        index: 0,
                        offset: slot,
                        size: Some(16)
                    },
                    "{at}"
                );
                let range = words(table, slot, 4);
                let chunk = d * spans + s;
                if chunk >= ch.count {
                    assert_eq!(range, [0; 4], "{at}: past the last chunk");
                    continue;
                }
                let first = chunk * ch.images;
                let end = (first + ch.images).min(ch.batch);
                assert_eq!(range[2..], [first as u32, end as u32], "{at}");
                let bases = if ch.bases_vec4s() > 0 {
                    assert_eq!(
                        find(span.bases),
                        Resource::Scratch {
                            index: 0,
                            offset: slot + bases_at,
                            size: Some(ch.bases_vec4s() as u64 * 16)
                        },
                        "{at}"
                    );
                    words(table, slot + bases_at, ch.windows.len())
                } else {
                    Vec::new()
                };
                for ((w, &binding), base) in ch.windows.iter().zip(&span.windows).zip(bases) {
                    let Resource::Buffer {
                        buffer,
                        offset,
                        size: Some(size),
                    } = find(binding)
                    else {
                        panic!("{at}: a window is a range of its buffer");
                    };
                    assert_eq!(buffer, w.buffer, "{at}");
                    assert_eq!(size, w.vec4s as u64 * 16, "{at}");
                    assert_eq!(u64::from(base) * 4, offset, "{at}: the base is the offset");
                    let image = (w.image_words * 4) as u64;
                    assert!(
                        offset <= first as u64 * image && end as u64 * image <= offset + size,
                        "{at}: window {offset}+{size} misses images {first}..{end}"
                    );
                }
            }
            for (s, sum) in ch.sums.iter().enumerate() {
                assert_eq!(
                    find(sum.binding),
                    Resource::Scratch {
                        index: 1 + s,
                        offset: 0,
                        size: None
                    }
                );
            }
        }
    }
}

#[test]
fn lenet_step_on_lavapipe_binds_each_span_its_chunk() {
    let t = Target::lavapipe();
    let [step, _] = graphs(256);
    let c = compile(&step, &t).unwrap();
    let l = c.launch();
    check_bindings(&c, &l, &t);
    check_chunks(&c, &l);
    // (kernel, dispatches, scratch bytes): the kernels of many chunks run several per
    // dispatch (`spans.rs`), and the dispatches of the last spans past the last chunk.
    let chunked: Vec<(&str, usize, Vec<u64>)> = c
        .modules
        .iter()
        .zip(&l.kernels)
        .filter(|(m, _)| m.chunks.is_some())
        .map(|(m, k)| {
            let sizes = k.scratch.iter().map(|s| s.contents.len()).collect();
            (m.name.as_str(), k.dispatches.len(), sizes)
        })
        .collect();
    // The same dispatches and scratch sizes as the runtime made before the description
    // existed (compared binding for binding when it was introduced). Table slots of 64 bytes
    // (range at 0, bases at 32); running sums in whole vec4s.
    let expected: [(&str, usize, &[u64]); 15] = [
        ("k01_avg_pool2d_l2", 13, &[832]),
        ("k02_reshape_l6", 20, &[1280]),
        ("k03_sigmoid_l8", 7, &[448]),
        ("k04_sigmoid_l10", 2, &[128]),
        ("k06_sigmoid_grad_l10", 2, &[128]),
        ("k07_sigmoid_grad_l8", 2, &[128]),
        ("k08_reshape_l6", 2, &[128]),
        // 26 chunks, five to a dispatch: 30 slots, the last four all zero.
        ("k09_sigmoid_grad_l4", 6, &[1920]),
        ("k10_conv2d_grad_input_l3", 26, &[1664]),
        ("k11_sigmoid_grad_l1", 18, &[5760]),
        // Conv1's weight gradient: two chunks to a dispatch; its weights' and bias's sums.
        ("k12_update_layer0", 43, &[5504, 32, 608]),
        ("k13_update_layer3", 26, &[1664, 64, 9600]),
        ("k14_update_layer7", 7, &[448, 480, 192000]),
        ("k15_update_layer9", 2, &[128, 336, 40320]),
        ("k16_update_layer11", 2, &[128, 48, 3360]),
    ];
    let expected: Vec<(&str, usize, Vec<u64>)> = expected
        .iter()
        .map(|(name, d, sizes)| (*name, *d, sizes.to_vec()))
        .collect();
    assert_eq!(chunked, expected);
    // Every kernel but the chunked ones is one dispatch: the step's dispatch count.
    let dispatches: usize = l.kernels.iter().map(|k| k.dispatches.len()).sum();
    assert_eq!(
        dispatches,
        c.modules.len() - chunked.len() + chunked.iter().map(|k| k.1).sum::<usize>()
    );
}

#[test]
fn launches_of_other_schedules_bind_every_slot_in_bounds() {
    // A batch whose last chunks are shorter, windows of 20 KiB (several chunks to a dispatch
    // at a small batch), and the portable schedules.
    let small = Target {
        class: DeviceClass::Cpu,
        max_uniform_buffer_binding_size: 20 << 10,
        ..Target::lavapipe()
    };
    let cases = [
        (Target::lavapipe(), 211),
        (small.clone(), 17),
        (small, 8),
        (Target::portable(), 256),
    ];
    for (t, batch) in cases {
        for g in graphs(batch) {
            let c = compile(&g, &t).unwrap();
            let l = c.launch();
            check_bindings(&c, &l, &t);
            check_chunks(&c, &l);
        }
    }
}
