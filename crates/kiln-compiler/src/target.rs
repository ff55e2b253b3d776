//! What the code generator may assume about the device it compiles for.

use std::fmt;

/// Loop iterations after which lavapipe (Mesa 22.3's llvmpipe) ends every loop of an
/// invocation, measured (see the trips module).
pub const LAVAPIPE_LOOP_ITERATIONS: u64 = 65_535;

/// The broad class of device, which decides the kernel schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceClass {
    /// A CPU emulating a GPU (lavapipe, SwiftShader, WARP): caches act as shared memory.
    Cpu,
    IntegratedGpu,
    DiscreteGpu,
    /// Unknown or virtual devices get the portable defaults.
    Other,
}

/// The device facts codegen needs, derived from the adapter by the runtime (or a portable
/// default for `--emit` without a device).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    pub name: String,
    pub class: DeviceClass,
    /// Storage buffers one kernel may bind (WebGPU guarantees 8).
    pub max_storage_buffers_per_stage: u32,
    pub max_storage_buffer_binding_size: u64,
    pub max_workgroup_size_x: u32,
    pub max_workgroups_per_dimension: u32,
    pub min_storage_buffer_offset_alignment: u32,
    /// Small read-only parameters are bound as uniform buffers up to this size (faster on
    /// lavapipe by about 2x; a broadcast read through the constant cache on GPUs).
    pub max_uniform_buffer_binding_size: u64,
    pub max_uniform_buffers_per_stage: u32,
    pub min_uniform_buffer_offset_alignment: u32,
    /// Invocations per subgroup (SIMD width) the adapter reports, when it does: lavapipe runs
    /// 8 invocations per AVX2 lane group. Shown in each module's header; the schedules do not
    /// depend on it yet.
    pub subgroup_size: Option<u32>,
    /// Compute four outputs per invocation where a kernel's reductions can share operand
    /// loads between them (see the blocking module). Off only to compare the two schedules.
    pub block_outputs: bool,
    /// Loop iterations one invocation may run in all, where the device stops loops beyond
    /// some count (lavapipe: 65,535, silently; see the trips module); kernels that would
    /// run more are rescheduled or refused.
    pub max_loop_iterations: Option<u64>,
}

impl Target {
    /// WebGPU's guaranteed limits on an unknown device: what `--emit` assumes.
    pub fn portable() -> Target {
        Target {
            name: "portable WebGPU defaults".into(),
            class: DeviceClass::Other,
            max_storage_buffers_per_stage: 8,
            max_storage_buffer_binding_size: 128 << 20,
            max_workgroup_size_x: 256,
            max_workgroups_per_dimension: 65_535,
            min_storage_buffer_offset_alignment: 256,
            max_uniform_buffer_binding_size: 64 << 10,
            max_uniform_buffers_per_stage: 12,
            min_uniform_buffer_offset_alignment: 256,
            subgroup_size: None,
            block_outputs: true,
            // WebGPU sets no such limit; a runtime compiling the portable schedule for a
            // device that has one (lavapipe) sets the device's (`Target::portable_for`).
            max_loop_iterations: None,
        }
    }

    /// What the runtime derives from lavapipe (Mesa 22.3's llvmpipe on a 256-bit AVX2 host,
    /// the software GPU of CI): the CPU-class schedule that the snapshot tests pin without a
    /// device. A runtime test checks that lavapipe's adapter still gives exactly this.
    pub fn lavapipe() -> Target {
        Target {
            name: "llvmpipe (LLVM 15.0.6, 256 bits)".into(),
            class: DeviceClass::Cpu,
            max_storage_buffers_per_stage: 32,
            max_storage_buffer_binding_size: 128 << 20,
            max_workgroup_size_x: 1024,
            max_workgroups_per_dimension: 65_535,
            min_storage_buffer_offset_alignment: 32,
            max_uniform_buffer_binding_size: 64 << 10,
            max_uniform_buffers_per_stage: 15,
            min_uniform_buffer_offset_alignment: 32,
            subgroup_size: Some(8),
            block_outputs: true,
            max_loop_iterations: Some(LAVAPIPE_LOOP_ITERATIONS),
        }
    }

    /// The portable schedule for a device whose own target is `device`: WebGPU's defaults,
    /// with the device's loop limit (what `--target portable` runs).
    pub fn portable_for(device: &Target) -> Target {
        Target {
            max_loop_iterations: device.max_loop_iterations,
            ..Target::portable()
        }
    }

    /// Bytes a uniform binding's offset is a multiple of (at least a `vec4`, so that windows
    /// and parts start on one).
    pub fn uniform_offset_alignment(&self) -> u64 {
        u64::from(self.min_uniform_buffer_offset_alignment.max(16))
    }

    /// Alignment of storage binding offsets, in bytes (at least 16, a `vec4`).
    pub fn storage_offset_alignment(&self) -> u64 {
        u64::from(self.min_storage_buffer_offset_alignment.max(16))
    }

    /// Invocations per workgroup of map kernels: 256 on GPUs (enough warps per workgroup to
    /// hide memory latency), 64 elsewhere (lavapipe runs a workgroup as one coroutine over
    /// 8-wide lane groups; bigger groups only make the last one emptier).
    pub fn workgroup_size(&self) -> u32 {
        let size = match self.class {
            DeviceClass::DiscreteGpu | DeviceClass::IntegratedGpu => 256,
            DeviceClass::Cpu | DeviceClass::Other => 64,
        };
        size.min(self.max_workgroup_size_x)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:?}", self.name, self.class)?;
        if let Some(n) = self.subgroup_size {
            write!(f, ", subgroups of {n}")?;
        }
        write!(f, ")")
    }
}
