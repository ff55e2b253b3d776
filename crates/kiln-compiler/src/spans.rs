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
//! The copies are made on the emitted WGSL: every function that reads a window or the chunk
//! table, directly or through a call, is copied with its identifiers renamed (`buf3` ->
//! `buf3_s1`, `chunk` -> `chunk_s1`, `v57` -> `v57_s1`); the entry point's body becomes
//! `chunk_main`, and the new entry point calls each span's copy in turn. Within an
//! invocation, spans run in chunk order, so the running sums of a summing kernel carry from
//! span to span exactly as from dispatch to dispatch; a span past the last chunk has an
//! all-zero table, so its invocations return at once.

use std::collections::{HashMap, HashSet};

use crate::chunks::{Chunks, Span};

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

/// A top-level function of a module: its name and its whole text (header to closing brace).
struct Function<'a> {
    name: &'a str,
    text: &'a str,
}

/// Repeats a chunked module's span-dependent code so that one dispatch runs up to
/// [`MAX_SPANS`] chunks, as many as the free binding slots allow (each span takes one
/// uniform slot per window and for its bases, one storage slot for its range) and
/// [`MAX_COPIED_BYTES`] of
/// copies. Returns the new module text, and sets `chunks.spans`; a module that gains nothing
/// is returned unchanged.
pub(crate) fn repeat(wgsl: &str, chunks: &mut Chunks, free: FreeSlots) -> String {
    let sum_words: usize = chunks.sums.iter().map(|s| s.words).sum();
    if sum_words > MAX_SPAN_SUM_WORDS || chunks.count < MIN_CHUNKS {
        return wgsl.to_string();
    }
    // Each span's windows and its bases take uniform slots (no bases without windows).
    let by_uniforms = match chunks.windows.len() {
        0 => usize::MAX,
        w => 1 + free.uniforms as usize / (w + 1),
    };
    let by_slots = by_uniforms.min(1 + free.storage as usize);
    let Some((functions, entry_at)) = functions(wgsl) else {
        return wgsl.to_string();
    };
    let mut renamed: HashSet<String> = chunks
        .windows
        .iter()
        .map(|w| format!("buf{}", w.binding))
        .chain(["chunk".to_string(), "bases".to_string()])
        .collect();
    // Functions reading a renamed name, directly or through a call, are copied per span.
    let mut copied: Vec<bool> = vec![false; functions.len()];
    loop {
        let mut grew = false;
        for (k, f) in functions.iter().enumerate() {
            if !copied[k] && identifiers(f.text).any(|w| renamed.contains(w) && w != f.name) {
                copied[k] = true;
                renamed.insert(f.name.to_string());
                grew = true;
            }
        }
        if !grew {
            break;
        }
    }
    let entry = &wgsl[entry_at..];
    // Only what the entry point reaches is copied (the module also carries the scalar forms
    // of blocked functions).
    let mut reached: HashSet<&str> = identifiers(entry).collect();
    loop {
        let before = reached.len();
        for f in &functions {
            if reached.contains(f.name) {
                reached.extend(identifiers(f.text));
            }
        }
        if reached.len() == before {
            break;
        }
    }
    for (k, f) in functions.iter().enumerate() {
        copied[k] &= reached.contains(f.name);
    }
    let copy_bytes: usize = functions
        .iter()
        .zip(&copied)
        .filter(|(_, c)| **c)
        .map(|(f, _)| f.text.len())
        .sum::<usize>()
        + entry.len();
    let by_size = 1 + MAX_COPIED_BYTES / copy_bytes.max(1);
    let most = by_slots.min(by_size).min(MAX_SPANS).min(chunks.count);
    if most < 2 {
        return wgsl.to_string();
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

    let body_start = entry.find('{').expect("the entry point has a body");
    let main_body = &entry[body_start..];
    let mut out = String::with_capacity(wgsl.len() + copy_bytes * spans);
    let header_end = wgsl.find("\n\n").map_or(0, |e| e + 1);
    let per_dispatch = format!(
        ", {spans} per dispatch ({dispatches} dispatches; each chunk reads its own windows)"
    );
    for line in wgsl[..header_end].lines() {
        if line.starts_with("// chunks: ") {
            out.push_str(&line.replace(ONE_PER_DISPATCH, &per_dispatch));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    // The extra spans' bindings, listed after the others.
    let listed: Vec<String> = all
        .iter()
        .enumerate()
        .skip(1)
        .map(|(s, span)| {
            format!(
                "//   {}-{}: span {s}: {} windows, then its chunk range and window bases",
                span.windows.first().copied().unwrap_or(span.table),
                span.bases,
                span.windows.len()
            )
        })
        .collect();
    if !listed.is_empty() {
        out.push_str(&listed.join("\n"));
        out.push('\n');
    }
    // Declarations: the originals, then each span's copies of the windows and the table.
    let decls_end = entry_at.min(
        functions
            .first()
            .map_or(entry_at, |f| offset_in(wgsl, f.text)),
    );
    let decls = &wgsl[header_end..decls_end];
    let decl_lines: Vec<&str> = decls.lines().collect();
    let last_decl = decl_lines
        .iter()
        .rposition(|l| l.starts_with("@group(0)"))
        .unwrap_or(0);
    for (k, line) in decl_lines.iter().enumerate() {
        out.push_str(line);
        out.push('\n');
        if k == last_decl {
            for (s, span) in all.iter().enumerate().skip(1) {
                for (w, b) in chunks.windows.iter().zip(&span.windows) {
                    let decl = declaration(decls, "var<uniform>", &format!("buf{}", w.binding));
                    out.push_str(&format!(
                        "@group(0) @binding({b}) var<uniform> buf{}_s{s}{}\n",
                        w.binding, decl
                    ));
                }
                let decl = declaration(decls, "var<storage, read>", "chunk");
                out.push_str(&format!(
                    "@group(0) @binding({}) var<storage, read> chunk_s{s}{}\n",
                    span.table, decl
                ));
                if !chunks.windows.is_empty() {
                    let decl = declaration(decls, "var<uniform>", "bases");
                    out.push_str(&format!(
                        "@group(0) @binding({}) var<uniform> bases_s{s}{}\n",
                        span.bases, decl
                    ));
                }
            }
        }
    }
    out.push_str(&wgsl[decls_end..entry_at]);
    for s in 1..spans {
        let map: HashMap<&str, String> = renamed
            .iter()
            .map(|name| (name.as_str(), format!("{name}_s{s}")))
            .collect();
        for (f, _) in functions.iter().zip(&copied).filter(|(_, c)| **c) {
            out.push_str(&rename(f.text, &map));
            out.push('\n');
        }
    }
    let workgroup = entry
        .lines()
        .next()
        .expect("the entry point starts with its attributes");
    let mut calls = String::new();
    for s in 0..spans {
        let map: HashMap<&str, String> = renamed
            .iter()
            .map(|name| (name.as_str(), format!("{name}_s{s}")))
            .collect();
        let (name, body) = if s == 0 {
            ("chunk_main".to_string(), main_body.to_string())
        } else {
            (format!("chunk_main_s{s}"), rename(main_body, &map))
        };
        out.push_str(&format!("fn {name}(gid: vec3<u32>) {body}\n"));
        calls.push_str(&format!("    {name}(gid);\n"));
    }
    out.push_str(&format!(
        "{workgroup}\nfn main(@builtin(global_invocation_id) gid: vec3<u32>) {{\n{calls}}}\n"
    ));
    chunks.spans = all;
    out
}

/// Byte offset of `part` (a slice of `whole`) in `whole`.
fn offset_in(whole: &str, part: &str) -> usize {
    part.as_ptr() as usize - whole.as_ptr() as usize
}

/// The text after `var<SPACE> NAME` in its declaration line (`: array<...>;`).
fn declaration<'a>(decls: &'a str, space: &str, name: &str) -> &'a str {
    let key = format!("{space} {name}:");
    let line = decls
        .lines()
        .find(|l| l.contains(&key))
        .expect("the chunk table and windows are declared");
    let at = line.find(&key).expect("found") + key.len() - 1;
    &line[at..]
}

/// The module's top-level functions, and where its entry point's attributes start; `None`
/// when the module does not have the shape [`crate::wgsl`] emits.
fn functions(wgsl: &str) -> Option<(Vec<Function<'_>>, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    let mut entry = None;
    while at < wgsl.len() {
        let rest = &wgsl[at..];
        let line_end = rest.find('\n').map_or(wgsl.len(), |e| at + e + 1);
        if rest.starts_with("@compute") {
            entry = Some(at);
            break;
        }
        if let Some(decl) = rest.strip_prefix("fn ") {
            let name_end = decl.find('(')?;
            let close = rest.find("\n}\n")?;
            let end = at + close + 3;
            out.push(Function {
                name: &decl[..name_end],
                text: &wgsl[at..end - 1],
            });
            at = end;
            continue;
        }
        at = line_end;
    }
    let entry = entry?;
    // The entry point must be the chunked one: `main` over `gid`, ending the module.
    let tail = &wgsl[entry..];
    let ok = tail.lines().nth(1)
        == Some("fn main(@builtin(global_invocation_id) gid: vec3<u32>) {")
        && tail.trim_end().ends_with('}')
        && tail.matches("\nfn ").count() == 1;
    ok.then_some((out, entry))
}

/// The identifiers of WGSL text (outside comments and number literals).
fn identifiers(text: &str) -> impl Iterator<Item = &str> {
    tokens(text).filter_map(|(word, is_ident)| is_ident.then_some(word))
}

/// WGSL text cut into identifiers (`true`) and everything between them (`false`): comments,
/// number literals with their suffixes, punctuation, whitespace.
fn tokens(text: &str) -> impl Iterator<Item = (&str, bool)> {
    let bytes = text.as_bytes();
    let mut at = 0;
    std::iter::from_fn(move || {
        if at >= bytes.len() {
            return None;
        }
        let start = at;
        let c = bytes[at];
        let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
        if c.is_ascii_alphabetic() || c == b'_' {
            while at < bytes.len() && word(bytes[at]) {
                at += 1;
            }
            return Some((&text[start..at], true));
        }
        while at < bytes.len() {
            let c = bytes[at];
            if c == b'/' && bytes.get(at + 1) == Some(&b'/') {
                at += text[at..].find('\n').unwrap_or(text.len() - at);
            } else if c.is_ascii_digit() {
                while at < bytes.len() && (word(bytes[at]) || bytes[at] == b'.') {
                    at += 1;
                }
            } else if c.is_ascii_alphabetic() || c == b'_' {
                break;
            } else {
                at += 1;
            }
        }
        Some((&text[start..at], false))
    })
}

/// `text` with every identifier in `map` replaced.
fn rename(text: &str, map: &HashMap<&str, String>) -> String {
    let mut out = String::with_capacity(text.len() + 256);
    for (word, is_ident) in tokens(text) {
        match map.get(word) {
            Some(new) if is_ident => out.push_str(new),
            _ => out.push_str(word),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renaming_skips_comments_literals_and_longer_names() {
        let map: HashMap<&str, String> = [("buf0", "buf0_s1".to_string()), ("v3", "v3_s1".into())]
            .into_iter()
            .collect();
        let text = "// buf0 v3\nlet a = buf0[3u] + v3(2u) + v35(1u) + buf0_1[0] * 1e3f; // v3\n";
        assert_eq!(
            rename(text, &map),
            "// buf0 v3\nlet a = buf0_s1[3u] + v3_s1(2u) + v35(1u) + buf0_1[0] * 1e3f; // v3\n"
        );
        let idents: Vec<&str> = identifiers("x2 = 0x1fu + y_3;").collect();
        assert_eq!(idents, ["x2", "y_3"]);
    }
}
