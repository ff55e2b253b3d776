//! Log output for kiln's programs: quiet by default, `RUST_LOG` for more.
//!
//! wgpu, wgpu-hal and naga report through the `log` crate (and, with `WGPU_DEBUG`, the Vulkan
//! driver's debug messages arrive there too). Without a logger all of that is dropped, including
//! the errors; with one that shows everything it drowns a run's output. `init_logging` installs
//! `env_logger` with a default filter that shows kiln's warnings and other crates' errors only.
//! `RUST_LOG` replaces the default entirely, with env_logger's syntax: `RUST_LOG=wgpu_hal=info`,
//! `RUST_LOG=wgpu_core=debug,naga=warn`, `RUST_LOG=trace`.
//!
//! Mesa's own output is not `log`'s: lavapipe (Mesa 22.3) prints nothing on a normal run;
//! `MESA_DEBUG` controls Mesa's warnings, `VK_LOADER_DEBUG=all` the Vulkan loader's.

/// What is shown when `RUST_LOG` is not set: errors from every crate, warnings from kiln's
/// (`kiln` prefixes every `kiln_*` crate, as env_logger matches targets by prefix).
const DEFAULT_LOG_FILTER: &str = "error,kiln=warn";

/// Installs the logger (to stderr). Call it first thing in `main`: wgpu-hal decides at instance
/// creation which Vulkan debug messages to forward by the log level in force then. Calling it
/// again, or after another logger was installed, does nothing.
pub fn init_logging() {
    let env = env_logger::Env::default().default_filter_or(DEFAULT_LOG_FILTER);
    let _ = env_logger::Builder::from_env(env).try_init();
}
