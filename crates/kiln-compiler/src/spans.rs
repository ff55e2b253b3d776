//! Several image chunks per dispatch: a chunked kernel's code is repeated once per *span*, each
//! copy reading its own windows and chunk table, so one dispatch runs several consecutive
//! chunks (see [`crate::chunks`]).
//!
//! Why: a dispatch costs lavapipe (Mesa 22.3) ~23 us however small it is, plus ~0.3 us per
//! workgroup: the queue thread wakes the worker threads and waits for them (measured with a
//! micro-benchmark of empty kernels on the 2-core CI machine: 21-25 us for one workgroup,
//! 33-40 us for 56). A 64 KiB window holds only three images of conv1's activation, so its
//! gradient kernels ran 86 dispatches each, 172 of a step's 311: ~4 ms of dispatching in an
//! 80 ms step (the activation-gradient kernel with its loads and stores removed still took
//! 4 ms). Choosing a window per lane at run time would load from every window (llvmpipe runs
//! both sides of a branch and every lane of a gather), so each span gets its own code.
//!
//! The copies are made on the kernel IR: every function that reads a window or the chunk
//! table, directly or through a call, is cloned with its globals and callees renamed
//! (`buf3` -> `buf3_s1`, `v57` -> `v57_s1`) and its chunk table and window bases those of its
//! span (`Function::span`: `chunk_s1`, `bases_s1`); the entry point's body becomes
//! `chunk_main` and each span's clone of it `chunk_main_s<k>` (`Entry::spans`), which `main`
//! calls in turn. Within an invocation, spans run in chunk order, so the running sums of a
//! summing kernel carry from span to span exactly as from dispatch to dispatch; a span past
//! the last chunk has an all-zero table, so its invocations return at once.

use std::collections::HashSet;

use crate::chunks::{Chunks, Span};
use crate::kir::module::{Declaration, Item, Module, print_items};
use crate::kir::wgsl::{Callee, span_suffix};
use crate::kir::{self, ExprKind, Function};

/// Most bytes of WGSL the copies may add to a module. Every copy is JIT-compiled again at
/// the first dispatch, and a copy with loops costs far more than its size suggests (first
/// dispatch with `MESA_SHADER_CACHE_DISABLE`, one span -> five: the activation-gradient
/// kernels 32 -> 97 and 65 -> 153 ms, conv1's weight gradient 227 -> 1,648 ms, fc1's
/// forward kernel 257 -> 1,216 ms with four; conv2's weight gradient 1,049 -> 2,154 ms with
/// two): all of them together made the cold start 7 -> 12 s.
pub const MAX_COPIED_BYTES: usize = 4_000;

/// Fewest chunks a kernel must have to use spans: a few dispatches' ~25 us each never pay
/// for a copy's JIT time.
pub const MIN_CHUNKS: usize = 16;

/// Most chunks one dispatch runs.
pub const MAX_SPANS: usize = 6;

/// Most words of running sums a kernel may carry to use spans: every span loads and stores
/// them through storage, a loop over the SIMD lanes on lavapipe (fc1's weight gradient, 48,000
/// words, took 7.0 -> 7.7 ms per step with three spans; conv1's, 156 words, 9.5 -> 8.5).
pub const MAX_SPAN_SUM_WORDS: usize = 4096;

/// How the header's chunk line ends for a kernel running one chunk per dispatch.
pub(crate) const ONE_PER_DISPATCH: &str = ", one per dispatch";

/// Binding slots a kernel leaves unused, per kind.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FreeSlots {
    pub uniforms: u32,
    pub storage: u32,
}

/// How the header's chunk line ends: one chunk per dispatch, or several (`chunks.spans`).
pub(crate) fn per_dispatch(c: &Chunks) -> String {
    if c.spans.len() > 1 {
        format!(
            ", {} per dispatch ({} dispatches; each chunk reads its own windows)",
            c.spans.len(),
            c.dispatches()
        )
    } else {
        ONE_PER_DISPATCH.to_string()
    }
}

/// The callees' names a function calls.
fn called(callees: &[Callee]) -> impl Iterator<Item = &str> {
    callees.iter().filter_map(|c| match c {
        Callee::Call(name) | Callee::CallWith(name, _) => Some(name.as_str()),
        Callee::Value(_) => None,
    })
}

/// `f` as span `span` runs it: its chunk table and window bases the span's, its windows and
/// the copied functions it calls renamed.
fn for_span(
    (f, callees): (&Function, &[Callee]),
    span: u32,
    windows: &HashSet<String>,
    copied: &HashSet<String>,
) -> (Function, Vec<Callee>) {
    let suffix = format!("_s{span}");
    let mut f = f.clone();
    f.span = span;
    for g in &mut f.globals {
        if windows.contains(&g.name) {
            g.name.push_str(&suffix);
        }
    }
    let rename = |name: &str| {
        if copied.contains(name) {
            format!("{name}{suffix}")
        } else {
            name.to_string()
        }
    };
    let callees = callees
        .iter()
        .map(|c| match c {
            Callee::Call(name) => Callee::Call(rename(name)),
            Callee::CallWith(name, with) => Callee::CallWith(rename(name), with.clone()),
            Callee::Value(name) => Callee::Value(name.clone()),
        })
        .collect();
    (f, callees)
}

/// Repeats a chunked module's span-dependent functions so that one dispatch runs up to
/// [`MAX_SPANS`] chunks, as many as the free binding slots allow (each span takes one
/// uniform slot per window and for its bases, one storage slot for its range) and
/// [`MAX_COPIED_BYTES`] of printed copies. Adds the copies and the spans' declarations to
/// `module` and sets `chunks.spans`; a module that gains nothing is left as it is.
pub(crate) fn repeat(module: &mut Module, chunks: &mut Chunks, free: FreeSlots) {
    let sum_words: usize = chunks.sums.iter().map(|s| s.words).sum();
    if sum_words > MAX_SPAN_SUM_WORDS || chunks.count < MIN_CHUNKS {
        return;
    }
    // Each span's windows and its bases take uniform slots (no bases without windows).
    let by_uniforms = match chunks.windows.len() {
        0 => usize::MAX,
        w => 1 + free.uniforms as usize / (w + 1),
    };
    let by_slots = by_uniforms.min(1 + free.storage as usize);
    let windows: HashSet<String> = chunks
        .windows
        .iter()
        .map(|w| format!("buf{}", w.binding))
        .collect();
    let functions: Vec<(&str, &Function, &[Callee])> =
        module.items.iter().map(Item::function).collect();
    let reads_chunk = |f: &Function| {
        f.globals.iter().any(|g| windows.contains(&g.name))
            || f.exprs
                .iter()
                .any(|e| matches!(e, ExprKind::Chunk(_) | ExprKind::WindowBase(_)))
    };
    // Functions reading a window or the table, directly or through a call, are copied per
    // span.
    let mut copied: HashSet<String> = HashSet::new();
    loop {
        let before = copied.len();
        for &(name, f, callees) in &functions {
            if !copied.contains(name)
                && (reads_chunk(f) || called(callees).any(|c| copied.contains(c)))
            {
                copied.insert(name.to_string());
            }
        }
        if copied.len() == before {
            break;
        }
    }
    // Only what the entry point reaches is copied (a module may carry a blocked function's
    // scalar form that nothing calls).
    let mut reached: HashSet<&str> = called(&module.entry.callees).collect();
    loop {
        let before = reached.len();
        for &(name, _, callees) in &functions {
            if reached.contains(name) {
                reached.extend(called(callees));
            }
        }
        if reached.len() == before {
            break;
        }
    }
    copied.retain(|name| reached.contains(name.as_str()));
    let copies: Vec<&Item> = module
        .items
        .iter()
        .filter(|i| copied.contains(i.function().0))
        .collect();
    // The copies' code, comments aside: what the driver compiles again per span.
    let code_bytes = |item: &Item| {
        let mut bare = item.clone();
        let Item::Function { comment, .. } = &mut bare;
        *comment = None;
        print_items(std::slice::from_ref(&bare)).map_or(0, |t| t.len())
    };
    let copy_bytes: usize = copies.iter().map(|i| code_bytes(i)).sum::<usize>()
        + module.entry.print().map_or(0, |t| t.len());
    let by_size = 1 + MAX_COPIED_BYTES / copy_bytes.max(1);
    let most = by_slots.min(by_size).min(MAX_SPANS).min(chunks.count);
    if most < 2 {
        return;
    }
    // As few dispatches as `most` allows, with the chunks spread evenly over them.
    let dispatches = chunks.count.div_ceil(most);
    let spans = chunks.count.div_ceil(dispatches);
    let mut next = chunks.next_binding();
    let mut all = vec![Span {
        windows: chunks.windows.iter().map(|w| w.binding).collect(),
        table: chunks.table_binding,
        bases: chunks.table_binding + 1,
    }];
    for _ in 1..spans {
        let windows = (0..chunks.windows.len() as u32).map(|k| next + k).collect();
        next += chunks.windows.len() as u32;
        all.push(Span {
            windows,
            table: next,
            bases: next + 1,
        });
        next += 2;
    }
    let mut added = Vec::new();
    for span in 1..spans as u32 {
        for item in &copies {
            let (name, function, callees) = item.function();
            let (function, callees) = for_span((function, callees), span, &windows, &copied);
            added.push(Item::Function {
                name: format!("{name}_s{span}"),
                comment: None,
                function,
                callees,
            });
        }
    }
    // Each further span's windows, chunk range and window bases.
    for (k, span) in all.iter().enumerate().skip(1) {
        let k = k as u32;
        for (w, &slot) in chunks.windows.iter().zip(&span.windows) {
            module.declarations.push(Declaration {
                slot,
                global: kir::Global {
                    name: format!("buf{}{}", w.binding, span_suffix(k)),
                    space: kir::Space::Uniform,
                    elem: kir::Ty::VEC4_F32,
                },
                len: Some(w.vec4s as u32),
            });
        }
        module
            .declarations
            .push(Declaration::chunk_range(span.table, k));
        if !chunks.windows.is_empty() {
            module.declarations.push(Declaration::window_bases(
                span.bases,
                k,
                chunks.bases_vec4s() as u32,
            ));
        }
    }
    let entry = &module.entry;
    module.entry.spans = (1..spans as u32)
        .map(|span| for_span((&entry.function, &entry.callees), span, &windows, &copied))
        .collect();
    module.items.extend(added);
    chunks.spans = all;
}
