//! The device: adapter selection by wgpu's conventions, the limits a plan may use, and errors
//! that name what failed instead of panicking.

use std::sync::{Arc, Mutex};

use kiln_compiler::{DeviceClass, Target};

/// Why the runtime could not do what was asked. Every variant names its culprit.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "no GPU adapter found ({0}). kiln runs on any Vulkan, Metal or DX12 device: install your \
         GPU's driver, or on a machine without a GPU a software Vulkan driver \
         (Debian/Ubuntu: `sudo apt-get install mesa-vulkan-drivers libvulkan1`). \
         WGPU_BACKEND and WGPU_ADAPTER_NAME choose among several adapters"
    )]
    NoAdapter(String),
    #[error("cannot open device {adapter}: {message}")]
    RequestDevice { adapter: String, message: String },
    #[error(
        "{what} needs {limit} = {needed}, but {adapter} allows only {available}; use a smaller \
         batch or model"
    )]
    Limit {
        what: String,
        limit: &'static str,
        needed: u64,
        available: u64,
        adapter: String,
    },
    #[error("wgpu rejected {what}: {message}")]
    Wgpu { what: String, message: String },
    #[error("reading back {what} failed: {message}")]
    Readback { what: String, message: String },
    #[error("{0}")]
    Setup(String),
    #[error(
        "training diverged: the loss became {loss} in {where_}; the weights are no longer \
         usable. Try a lower learning rate (--lr)"
    )]
    Diverged { where_: String, loss: f32 },
    #[error("interrupted in {where_}")]
    Interrupted { where_: String },
}

/// An opened device with its queue and the compile target derived from it.
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub target: Target,
    /// Errors wgpu reported outside any error scope; checked after work completes.
    uncaptured: Arc<Mutex<Vec<String>>>,
}

impl Gpu {
    /// Opens the adapter wgpu's conventions choose: `WGPU_BACKEND` limits the backends,
    /// `WGPU_ADAPTER_NAME` picks by name, `WGPU_POWER_PREF` (default high) by power. A software
    /// adapter (lavapipe) is used when it is all there is.
    pub fn new() -> Result<Gpu, RuntimeError> {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let adapter =
            match pollster::block_on(wgpu::util::initialize_adapter_from_env(&instance, None)) {
                Ok(a) => a,
                Err(_) => pollster::block_on(
                    instance.request_adapter(&wgpu::RequestAdapterOptions {
                        power_preference: wgpu::PowerPreference::from_env()
                            .unwrap_or(wgpu::PowerPreference::HighPerformance),
                        force_fallback_adapter: false,
                        compatible_surface: None,
                        ..Default::default()
                    }),
                )
                .map_err(|e| RuntimeError::NoAdapter(e.to_string()))?,
            };
        let info = adapter.get_info();
        let limits = adapter.limits();
        let name = info.name.clone();
        // Timestamp queries let `--profile` time kernels on the device's clock; optional.
        let features = adapter.features() & wgpu::Features::TIMESTAMP_QUERY;
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("kiln"),
            required_features: features,
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| RuntimeError::RequestDevice {
            adapter: name,
            message: e.to_string(),
        })?;
        let uncaptured = Arc::new(Mutex::new(Vec::new()));
        let sink = uncaptured.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            if let Ok(mut v) = sink.lock() {
                v.push(e.to_string());
            }
        }));
        let lost = uncaptured.clone();
        device.set_device_lost_callback(move |reason, message| {
            if let Ok(mut v) = lost.lock() {
                v.push(format!("device lost ({reason:?}): {message}"));
            }
        });
        let target = target_for(&info, &limits);
        Ok(Gpu {
            device,
            queue,
            info,
            limits,
            target,
            uncaptured,
        })
    }

    /// `name (backend, device type)`.
    pub fn describe(&self) -> String {
        format!(
            "{} ({:?}, {:?})",
            self.info.name, self.info.backend, self.info.device_type
        )
    }

    /// Whether the adapter is a CPU emulating a GPU.
    pub fn is_software(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// Fails with the first error wgpu reported outside an error scope, if any.
    pub fn check(&self, what: &str) -> Result<(), RuntimeError> {
        let mut errors = self
            .uncaptured
            .lock()
            .map_err(|_| RuntimeError::Setup("error log poisoned".into()))?;
        if errors.is_empty() {
            return Ok(());
        }
        let message = errors.join("; ");
        errors.clear();
        Err(RuntimeError::Wgpu {
            what: what.to_string(),
            message,
        })
    }

    /// Runs `f` inside validation and out-of-memory error scopes; an error names `what`.
    pub fn scoped<T>(&self, what: &str, f: impl FnOnce() -> T) -> Result<T, RuntimeError> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let value = f();
        let v = pollster::block_on(validation.pop());
        let o = pollster::block_on(oom.pop());
        match v.or(o) {
            None => Ok(value),
            Some(e) => Err(RuntimeError::Wgpu {
                what: what.to_string(),
                message: e.to_string(),
            }),
        }
    }

    /// Blocks until all submitted work is done.
    pub fn wait(&self) -> Result<(), RuntimeError> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| RuntimeError::Wgpu {
                what: "waiting for the device".into(),
                message: e.to_string(),
            })?;
        Ok(())
    }

    pub fn limit_error(
        &self,
        what: String,
        limit: &'static str,
        needed: u64,
        available: u64,
    ) -> RuntimeError {
        RuntimeError::Limit {
            what,
            limit,
            needed,
            available,
            adapter: self.info.name.clone(),
        }
    }
}

/// The compile target for an adapter: its class and the limits codegen must respect.
pub fn target_for(info: &wgpu::AdapterInfo, limits: &wgpu::Limits) -> Target {
    let class = match info.device_type {
        wgpu::DeviceType::Cpu => DeviceClass::Cpu,
        wgpu::DeviceType::IntegratedGpu => DeviceClass::IntegratedGpu,
        wgpu::DeviceType::DiscreteGpu => DeviceClass::DiscreteGpu,
        _ => DeviceClass::Other,
    };
    Target {
        name: info.name.clone(),
        class,
        max_storage_buffers_per_stage: limits.max_storage_buffers_per_shader_stage,
        max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
        max_workgroup_size_x: limits
            .max_compute_workgroup_size_x
            .min(limits.max_compute_invocations_per_workgroup),
        max_workgroups_per_dimension: limits.max_compute_workgroups_per_dimension,
        min_storage_buffer_offset_alignment: limits.min_storage_buffer_offset_alignment,
        max_uniform_buffer_binding_size: limits.max_uniform_buffer_binding_size,
        max_uniform_buffers_per_stage: limits.max_uniform_buffers_per_shader_stage,
        min_uniform_buffer_offset_alignment: limits.min_uniform_buffer_offset_alignment,
        // wgpu reports 0 when the backend does not know.
        subgroup_size: (info.subgroup_max_size > 0).then_some(info.subgroup_max_size),
        block_outputs: true,
        // llvmpipe ends loops past 65,535 iterations per invocation; other software
        // rasterisers are assumed to be as strict.
        max_loop_iterations: (class == DeviceClass::Cpu)
            .then_some(kiln_compiler::LAVAPIPE_LOOP_ITERATIONS),
    }
}
