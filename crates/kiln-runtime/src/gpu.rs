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

/// The backends kiln runs on when `WGPU_BACKEND` does not say otherwise. wgpu's default adds
/// OpenGL ES, which kiln is not tested on and which would add an EGL initialisation to every
/// start; `WGPU_BACKEND=gl` still selects it.
const COMPUTE_BACKENDS: wgpu::Backends = wgpu::Backends::VULKAN
    .union(wgpu::Backends::METAL)
    .union(wgpu::Backends::DX12);

/// A wgpu instance for compute only: the backends of `WGPU_BACKEND` (default
/// [`COMPUTE_BACKENDS`]), the flags and options of wgpu's other environment variables, and no
/// window-system support.
///
/// Where Vulkan is the only backend (Linux and the BSDs by default), the Vulkan instance is made
/// without the X11 and Wayland surface extensions wgpu enables for presenting to windows. With
/// them enabled, Mesa's implicit device-selection layer (`VK_LAYER_MESA_device_select`, which
/// `mesa-vulkan-drivers` installs) looks for the compositor's GPU in every
/// `vkEnumeratePhysicalDevices` by calling `wl_display_connect`, and libwayland prints
/// `error: XDG_RUNTIME_DIR is invalid or not set in the environment.` twice where there is no
/// session (CI, ssh, containers). kiln never creates a surface, so nothing is lost; a surface
/// asked of this instance fails with wgpu's "driver does not support VK_KHR_*_surface".
fn compute_instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    desc.backends = wgpu::Backends::from_env().unwrap_or(COMPUTE_BACKENDS);
    let compiled = wgpu::Instance::enabled_backend_features();
    if desc.backends & compiled == wgpu::Backends::VULKAN {
        if let Some(instance) = vulkan_without_window_system(&desc) {
            return instance;
        }
    }
    wgpu::Instance::new(desc)
}

/// The Vulkan backend alone, its instance created without window-system extensions; `None`
/// where Vulkan cannot be loaded (then the ordinary instance reports that there is no adapter).
fn vulkan_without_window_system(desc: &wgpu::InstanceDescriptor) -> Option<wgpu::Instance> {
    use wgpu::hal::vulkan;

    let hal_desc = wgpu::hal::InstanceDescriptor {
        name: "kiln",
        flags: desc.flags,
        memory_budget_thresholds: desc.memory_budget_thresholds,
        backend_options: desc.backend_options.clone(),
        telemetry: None,
        display: None,
    };
    // Only the platform surface extensions are removed. wgpu-hal records the list it was given
    // and checks it before every use of one of them (`create_surface_from_*`), so an instance
    // without them is one on which those calls fail cleanly; nothing else reads them.
    let window_system = [
        c"VK_KHR_xlib_surface",
        c"VK_KHR_xcb_surface",
        c"VK_KHR_wayland_surface",
    ];
    let callback: Box<vulkan::CreateInstanceCallback> = Box::new(move |args| {
        args.extensions.retain(|e| !window_system.contains(e));
    });
    // SAFETY: `init_with_callback` is wgpu-hal's own instance creation; the callback changes
    // nothing but the extension list, dropping extensions that the instance then consistently
    // does not have (see above). The instance is handed whole to wgpu, which owns and destroys
    // it; its Vulkan objects are used only through wgpu from here on.
    let hal = unsafe { vulkan::Instance::init_with_callback(&hal_desc, Some(callback)) }.ok()?;
    // SAFETY: `hal` is a valid, freshly created Vulkan instance not used anywhere else. (wgpu-core
    // keeps its own copy of the instance flags, which `from_hal` sets to wgpu's defaults rather
    // than `desc.flags`; that copy decides label handling, indirect-call validation and
    // timestamp normalisation, none of which kiln configures.)
    Some(unsafe { wgpu::Instance::from_hal::<wgpu::hal::api::Vulkan>(hal) })
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
    /// Opens the adapter wgpu's conventions choose: `WGPU_BACKEND` chooses the backends (by
    /// default Vulkan, Metal and DX12, the ones kiln computes on), `WGPU_ADAPTER_NAME` picks by
    /// name, `WGPU_POWER_PREF` (default high) by power. A software adapter (lavapipe) is used
    /// when it is all there is. No window system is asked for (see `compute_instance`).
    pub fn new() -> Result<Gpu, RuntimeError> {
        let instance = compute_instance();
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
