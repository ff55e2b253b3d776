//! naga's back ends for a compiled kernel: SPIR-V, MSL and HLSL translated from the naga IR
//! that validation produced ([`NagaModule`], kept by [`compile`](crate::compile)), so the
//! WGSL is not parsed again. This is what `--emit spirv|msl|hlsl` writes: the kernels for a
//! host program that drives Vulkan, Metal or Direct3D 12 itself, or for reading what a
//! driver is given.
//!
//! The options are the ones wgpu 30 uses for its own pipelines, except that where wgpu asks
//! the device (language versions), a file has no device, so the oldest version wgpu still
//! accepts is chosen:
//! - **SPIR-V 1.0** (`naga::back::spv`), what every Vulkan 1.0 driver loads (wgpu picks the
//!   device's newest, up to 1.6). Indices and buffer accesses are clamped (`Restrict`: wgpu's
//!   choice on devices without `robustBufferAccess2`), workgroup memory is zeroed by code
//!   (`Polyfill`, as WGSL requires), loops are bounded (`force_loop_bounding`), and the
//!   functions and variables keep their names (`OpName`, for disassemblers and debuggers).
//!   Resources keep the WGSL's decorations: `DescriptorSet 0`, `Binding n`.
//! - **MSL 2.0** (`naga::back::msl`, macOS 10.13 / iOS 11), with the same clamping, zeroing
//!   and loop bounding.
//! - **HLSL shader model 6.0** (`naga::back::hlsl`, for DXC): wgpu 30's Direct3D 12 back end
//!   refuses adapters below it.
//!
//! Every translation writes the compute entry point `main` only (the one the runtime
//! dispatches). Metal reserves the name `main`, so naga renames it; [`ShaderText::entry_point`]
//! carries the name each back end chose.
//!
//! Bindings. A kernel binds only buffers, all in `@group(0)`. The mapping is fixed by the
//! binding number, so a host program can bind the files' resources from the WGSL header's
//! `bindings:` list (copied into each MSL and HLSL file) without reflection:
//! - MSL: `@binding(n)` is `[[buffer(n)]]` (`device` for read-write storage, `const device`
//!   for read-only storage, `constant` for uniforms). Metal cannot ask a buffer its length,
//!   and the clamping needs the lengths of runtime-sized arrays: where there are any, the
//!   entry point takes one more buffer, `[[buffer(last binding + 1)]]`, holding each one's
//!   size in bytes (`uint`s, in binding order), as wgpu passes them. wgpu numbers Metal slots
//!   in layout order instead, the same numbering for layouts without gaps, which kiln's are.
//! - HLSL: `@binding(n)` is register `n` in `space0` of the class naga gives its address
//!   space: `b` for uniforms (`cbuffer`), `t` for read-only storage (`ByteAddressBuffer`), `u`
//!   for read-write storage (`RWByteAddressBuffer`). (wgpu numbers each class from 0 in
//!   layout order for its own root signature; a file here goes with the host's root
//!   signature, which this rule makes easy to write.)
//!
//! Missing bindings are errors (`fake_missing_bindings: false`) rather than made-up slots.

use std::collections::BTreeMap;

use naga::ShaderStage;
use naga::back::{hlsl, msl, spv};
use naga::proc::{BoundsCheckPolicies, BoundsCheckPolicy};

use crate::wgsl::{KernelModule, NagaModule};

/// The entry point of every kiln kernel.
pub const ENTRY_POINT: &str = "main";

/// One of naga's back ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    Spirv,
    Msl,
    Hlsl,
}

impl Backend {
    /// The file extension of its output: `spv`, `metal`, `hlsl`.
    pub fn extension(self) -> &'static str {
        match self {
            Backend::Spirv => "spv",
            Backend::Msl => "metal",
            Backend::Hlsl => "hlsl",
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Spirv => "SPIR-V",
            Backend::Msl => "MSL",
            Backend::Hlsl => "HLSL",
        })
    }
}

/// A back end refused a kernel's module (a naga limitation or a kiln bug: the module passed
/// validation).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("kernel {kernel}: naga's {backend} back end failed: {message}")]
pub struct BackendError {
    pub kernel: String,
    pub backend: Backend,
    pub message: String,
}

/// A kernel in a text shading language.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShaderText {
    /// The kernel's WGSL header comment, then naga's translation.
    pub text: String,
    /// The entry point's name in `text` (naga renames names a language reserves).
    pub entry_point: String,
}

/// The same clamping wgpu applies where the device does not guarantee robust buffer access,
/// so a translated kernel behaves as its WGSL does under WebGPU.
fn bounds_checks() -> BoundsCheckPolicies {
    BoundsCheckPolicies {
        index: BoundsCheckPolicy::Restrict,
        buffer: BoundsCheckPolicy::Restrict,
        image_load: BoundsCheckPolicy::Restrict,
        binding_array: BoundsCheckPolicy::Unchecked,
    }
}

/// The module's resource bindings (all buffers: `interface.rs` checked them against the
/// kernel's layout).
fn bindings(naga: &NagaModule) -> impl Iterator<Item = naga::ResourceBinding> + '_ {
    naga.module
        .global_variables
        .iter()
        .filter_map(|(_, g)| g.binding)
}

/// The kernel's SPIR-V (SPIR-V 1.0 words, the magic number first).
pub fn spirv(m: &KernelModule, naga: &NagaModule) -> Result<Vec<u32>, BackendError> {
    let binding_map = bindings(naga)
        .map(|b| {
            let info = spv::BindingInfo {
                descriptor_set: b.group,
                binding: b.binding,
                binding_array_size: None,
            };
            (b, info)
        })
        .collect();
    let options = spv::Options {
        lang_version: (1, 0),
        // Not the default's vertex-stage flags; `DEBUG` names things, as the debug-build
        // default does, so release and debug builds write the same file.
        flags: spv::WriterFlags::DEBUG,
        fake_missing_bindings: false,
        binding_map,
        bounds_check_policies: bounds_checks(),
        zero_initialize_workgroup_memory: spv::ZeroInitializeWorkgroupMemoryMode::Polyfill,
        force_loop_bounding: true,
        ..spv::Options::default()
    };
    let pipeline = spv::PipelineOptions {
        shader_stage: ShaderStage::Compute,
        entry_point: ENTRY_POINT.to_string(),
    };
    spv::write_vec(&naga.module, &naga.info, &options, Some(&pipeline))
        .map_err(|e| error(m, Backend::Spirv, e))
}

/// The kernel's Metal Shading Language (MSL 2.0).
pub fn msl(m: &KernelModule, naga: &NagaModule) -> Result<ShaderText, BackendError> {
    let mut resources = BTreeMap::new();
    let mut next_slot = 0;
    for binding in bindings(naga) {
        let slot = u8::try_from(binding.binding).map_err(|_| {
            error(
                m,
                Backend::Msl,
                format!("binding {} has no Metal buffer slot", binding.binding),
            )
        })?;
        resources.insert(
            binding,
            msl::BindTarget {
                buffer: Some(slot),
                ..msl::BindTarget::default()
            },
        );
        next_slot = next_slot.max(slot as u32 + 1);
    }
    let sizes_buffer = u8::try_from(next_slot).map_err(|_| {
        error(
            m,
            Backend::Msl,
            "no Metal buffer slot left for array lengths",
        )
    })?;
    let options = msl::Options {
        lang_version: (2, 0),
        per_entry_point_map: BTreeMap::from([(
            ENTRY_POINT.to_string(),
            msl::EntryPointResources {
                resources,
                immediates_buffer: None,
                sizes_buffer: Some(sizes_buffer),
            },
        )]),
        fake_missing_bindings: false,
        bounds_check_policies: bounds_checks(),
        zero_initialize_workgroup_memory: true,
        force_loop_bounding: true,
        ..msl::Options::default()
    };
    let pipeline = msl::PipelineOptions {
        entry_point: Some((ShaderStage::Compute, ENTRY_POINT.to_string())),
        ..msl::PipelineOptions::default()
    };
    let (text, info) = msl::write_string(&naga.module, &naga.info, &options, &pipeline)
        .map_err(|e| error(m, Backend::Msl, e))?;
    let entry_point = only_entry_point(m, Backend::Msl, info.entry_point_names)?;
    Ok(ShaderText {
        text: format!("{}{text}", header(m)),
        entry_point,
    })
}

/// The kernel's HLSL (shader model 6.0).
pub fn hlsl(m: &KernelModule, naga: &NagaModule) -> Result<ShaderText, BackendError> {
    let binding_map = bindings(naga)
        .map(|binding| {
            let target = hlsl::BindTarget {
                space: 0,
                register: binding.binding,
                ..hlsl::BindTarget::default()
            };
            (binding, target)
        })
        .collect();
    let options = hlsl::Options {
        shader_model: hlsl::ShaderModel::V6_0,
        binding_map,
        fake_missing_bindings: false,
        zero_initialize_workgroup_memory: true,
        restrict_indexing: true,
        force_loop_bounding: true,
        ..hlsl::Options::default()
    };
    let pipeline = hlsl::PipelineOptions {
        entry_point: Some((ShaderStage::Compute, ENTRY_POINT.to_string())),
    };
    let mut text = String::new();
    let info = hlsl::Writer::new(&mut text, &options, &pipeline)
        .write(&naga.module, &naga.info, None)
        .map_err(|e| error(m, Backend::Hlsl, e))?;
    let entry_point = only_entry_point(m, Backend::Hlsl, info.entry_point_names)?;
    Ok(ShaderText {
        text: format!("{}{text}", header(m)),
        entry_point,
    })
}

fn error(m: &KernelModule, backend: Backend, e: impl std::fmt::Display) -> BackendError {
    BackendError {
        kernel: m.name.clone(),
        backend,
        message: e.to_string(),
    }
}

/// The entry point's translated name; the back ends report a per-entry-point failure (a
/// missing binding) here rather than as an error of the whole translation.
fn only_entry_point<E: std::fmt::Display>(
    m: &KernelModule,
    backend: Backend,
    names: Vec<Result<String, E>>,
) -> Result<String, BackendError> {
    match <[_; 1]>::try_from(names) {
        Ok([name]) => name.map_err(|e| error(m, backend, e)),
        Err(names) => Err(error(
            m,
            backend,
            format!("{} entry points written, expected one", names.len()),
        )),
    }
}

/// The WGSL module's leading comment (kernel, schedule, dispatch size, bindings): what a host
/// program needs to dispatch the translation. MSL and HLSL take `//` comments too.
fn header(m: &KernelModule) -> String {
    let mut out = String::new();
    for line in m.wgsl.lines().take_while(|l| l.starts_with("//")) {
        out.push_str(line);
        out.push('\n');
    }
    out
}
