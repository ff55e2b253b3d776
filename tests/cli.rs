//! The `lenet_fashion` example as a user runs it: flags, output, and errors.

use std::path::PathBuf;
use std::process::{Command, Output};

/// The example binary that `cargo test` builds next to the test binaries.
fn example() -> Command {
    let mut dir = std::env::current_exe().unwrap();
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let exe = dir
        .join("examples")
        .join(format!("lenet_fashion{}", std::env::consts::EXE_SUFFIX));
    assert!(
        exe.exists(),
        "{} is missing; `cargo test` builds it",
        exe.display()
    );
    let mut cmd = Command::new(exe);
    cmd.env_remove("FASHION_MNIST_DIR");
    cmd
}

fn run(args: &[&str]) -> Output {
    example().args(args).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

#[test]
fn summary_flag_prints_the_layer_table() {
    let o = run(&["--summary"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("2   AvgPool2d  [1, 6, 14, 14]           0\n"),
        "{out}"
    );
    assert!(out.ends_with("total params: 61,706\n"), "{out}");
}

#[test]
fn emit_ir_prints_text_that_parses_back() {
    let o = run(&["--emit", "ir", "--batch-size", "96"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let g = kiln::ir::parse(&stdout(&o)).unwrap();
    assert_eq!(g.ty(g.output("output").unwrap()).shape, [96, 10]);
    assert_eq!(g.param_count(), 61_706);
}

#[test]
fn bad_flags_get_clap_errors() {
    let o = run(&["--emit", "wgsl-typo"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("invalid value 'wgsl-typo' for '--emit <EMIT>'"),
        "{}",
        stderr(&o)
    );
    let o = run(&["--batch-size", "0"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--batch-size"), "{}", stderr(&o));
    let o = run(&["--limit", "0"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("--limit and --eval-limit must leave at least one example"),
        "{}",
        stderr(&o)
    );
    let o = run(&["--frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn missing_data_lists_where_it_looked() {
    let dir = tempfile_dir("missing");
    let o = run(&["--data", dir.join("nowhere").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("Fashion-MNIST not found. Looked in:"), "{err}");
    assert!(err.contains("nowhere (--data): no such directory"), "{err}");
    assert!(
        err.contains("apt-get install dataset-fashion-mnist"),
        "{err}"
    );
}

#[test]
fn corrupt_data_names_the_file() {
    let dir = tempfile_dir("corrupt");
    for name in [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ] {
        std::fs::write(dir.join(name), b"\0\0\x08\x03garbage").unwrap();
    }
    let o = run(&["--data", dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains(&format!(
            "{}: truncated in the header",
            dir.join("train-images-idx3-ubyte").display()
        )),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn emit_train_ir_prints_the_step_graph() {
    let o = run(&["--emit", "train-ir", "--batch-size", "8", "--lr", "0.5"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let g = kiln::ir::parse(&stdout(&o)).unwrap();
    assert_eq!(g.name, "lenet_step");
    assert_eq!(g.outputs().len(), 12);
    assert!(stdout(&o).contains("scale(%56) factor=0.5 : f32[6,1,5,5] @0:Conv2d"));
}

#[test]
fn emit_kernels_lists_the_fused_plan() {
    let o = run(&["--emit", "kernels"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.starts_with("plan \"lenet_step\": 17 kernels for 67 ops"),
        "{out}"
    );
    assert!(
        out.contains("k05_classifier_head: classifier head over the rows of f32[256,10]"),
        "{out}"
    );
    assert!(
        out.contains("writes: 0.weight f32[6,1,5,5] (608 B) in place"),
        "{out}"
    );
    assert!(out.trim_end().ends_with(
        "training step: 17 kernels per step of 256 examples (67 ops in the step graph); evaluation: 6 kernels per batch"
    ), "{out}");
}

#[test]
fn emit_for_device_shows_the_adapters_schedules() {
    // The flag only makes sense with --emit.
    let o = run(&["--for-device"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--emit <EMIT>"), "{}", stderr(&o));
    if no_gpu() {
        return;
    }
    let gpu = kiln::runtime::Gpu::new().unwrap();
    let o = run(&["--emit", "wgsl", "--for-device"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.matches("// kiln kernel ").count(), 23);
    assert!(
        out.contains(&format!("// target: {} (", gpu.target.name)),
        "{}",
        &out[..out.len().min(2000)]
    );
    if gpu.target.class == kiln::compiler::DeviceClass::Cpu {
        // A CPU-type adapter (lavapipe in CI): image chunks and the CPU-class convolutions.
        assert!(out.contains("// chunks: "), "{}", &out[..2000]);
        assert!(out.contains("(column quads: "), "{}", &out[..2000]);
    }
    // The back ends translate the device's schedules too.
    let o = run(&["--emit", "hlsl", "--for-device"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.matches("[numthreads(").count(), 23);
    assert!(
        out.contains(&format!("// target: {} (", gpu.target.name)),
        "{}",
        &out[..out.len().min(2000)]
    );
    let dir = tempfile_dir("spirv-device");
    let o = run(&[
        "--emit",
        "spirv",
        "--for-device",
        "--emit-dir",
        dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).starts_with("wrote 23 SPIR-V files to"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn emit_wgsl_prints_or_writes_one_module_per_kernel() {
    let o = run(&["--emit", "wgsl", "--batch-size", "96"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.matches("// kiln kernel ").count(), 23);
    assert!(out.contains("// dispatch: "), "{out}");
    let dir = tempfile_dir("wgsl");
    let o = run(&["--emit", "wgsl", "--emit-dir", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).starts_with("wrote 23 WGSL files to"),
        "{}",
        stdout(&o)
    );
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names.len(), 23, "{names:?}");
    assert!(
        names.contains(&"lenet_step_k01_avg_pool2d_l2.wgsl".to_string()),
        "{names:?}"
    );
    let text = std::fs::read_to_string(dir.join("lenet_step_k01_avg_pool2d_l2.wgsl")).unwrap();
    kiln::compiler::validate_wgsl("k01", &text).unwrap();
    let o = run(&["--emit-dir", dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "--emit-dir needs --emit");
}

/// The files `--emit STAGE --emit-dir` wrote, sorted, after checking there is one per kernel.
fn emitted_files(stage: &str, extension: &str, language: &str) -> (PathBuf, Vec<String>) {
    let dir = tempfile_dir(stage);
    let o = run(&["--emit", stage, "--emit-dir", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        format!("wrote 23 {language} files to {}\n", dir.display())
    );
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names.len(), 23, "{names:?}");
    assert!(
        names.iter().all(|n| n.ends_with(&format!(".{extension}"))),
        "{names:?}"
    );
    assert!(
        names.contains(&format!("lenet_step_k01_avg_pool2d_l2.{extension}")),
        "{names:?}"
    );
    (dir, names)
}

#[test]
fn emit_spirv_writes_one_binary_module_per_kernel() {
    let (dir, names) = emitted_files("spirv", "spv", "SPIR-V");
    for name in &names {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        assert_eq!(bytes.len() % 4, 0, "{name}");
        assert_eq!(
            u32::from_le_bytes(bytes[..4].try_into().unwrap()),
            0x0723_0203,
            "{name}: no SPIR-V magic number"
        );
    }
    // Binary is not printed.
    let o = run(&["--emit", "spirv"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).is_empty());
    assert!(
        stderr(&o).contains(
            "--emit spirv writes binary SPIR-V, one .spv file per kernel: add --emit-dir DIR"
        ),
        "{}",
        stderr(&o)
    );
}

#[test]
fn emit_msl_and_hlsl_print_or_write_one_module_per_kernel() {
    for (stage, extension, language, entry) in [
        ("msl", "metal", "MSL", "kernel void "),
        ("hlsl", "hlsl", "HLSL", "[numthreads("),
    ] {
        let (dir, names) = emitted_files(stage, extension, language);
        for name in &names {
            let text = std::fs::read_to_string(dir.join(name)).unwrap();
            assert!(text.starts_with("// kiln kernel "), "{name}: {text}");
            assert!(text.contains(entry), "{name}: {text}");
        }
        let o = run(&["--emit", stage, "--batch-size", "96"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let out = stdout(&o);
        assert_eq!(out.matches("// kiln kernel ").count(), 23, "{stage}");
        assert_eq!(out.matches(entry).count(), 23, "{stage}");
        assert!(out.contains("// dispatch: "), "{stage}");
    }
}

/// Checks d2l's per-epoch lines: `epoch 1: loss 2.314, train acc 0.100, test acc 0.120, 150 examples/sec`.
fn assert_d2l_report(out: &str, epochs: usize) {
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("epoch ")).collect();
    assert_eq!(lines.len(), epochs, "{out}");
    for (i, line) in lines.iter().enumerate() {
        // ", " separates the fields; a rate of 1,000 or more has a comma of its own.
        let fields: Vec<&str> = line
            .splitn(2, ": ")
            .flat_map(|f| f.split(", "))
            .map(str::trim)
            .collect();
        assert_eq!(fields[0], format!("epoch {}", i + 1));
        let number = |f: &str, prefix: &str| -> f64 {
            f.strip_prefix(prefix)
                .unwrap_or_else(|| panic!("{line}"))
                .trim()
                .parse()
                .unwrap()
        };
        let loss = number(fields[1], "loss");
        assert!(loss.is_finite() && loss > 0.0 && loss < 5.0, "{line}");
        for (f, p) in [(fields[2], "train acc"), (fields[3], "test acc")] {
            assert!((0.0..=1.0).contains(&number(f, p)), "{line}");
        }
        assert!(fields[4].ends_with("examples/sec"), "{line}");
    }
    assert!(
        out.lines()
            .any(|l| l.starts_with("loss ") && l.contains("test acc")),
        "{out}"
    );
}

fn data_dir() -> Option<String> {
    match kiln::data::locate(None) {
        Ok(d) => Some(d.display().to_string()),
        Err(_) => {
            assert!(
                std::env::var_os("KILN_REQUIRE_DATA").is_none(),
                "data required but missing"
            );
            eprintln!("SKIPPED: no Fashion-MNIST installed");
            None
        }
    }
}

#[test]
fn trains_on_the_gpu_and_reports_like_d2l() {
    let Some(data) = data_dir() else { return };
    if no_gpu() {
        return;
    }
    let args = [
        "--data",
        &data,
        "--limit",
        "80",
        "--eval-limit",
        "50",
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--lr",
        "0.1",
    ];
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("LeNet-5 (61,706 parameters)"), "{out}");
    assert!(out.contains("80 training, 50 test images"), "{out}");
    assert!(out.contains("device: "), "{out}");
    assert!(
        out.contains("compiled the training step into 17 kernels and the evaluation into 6"),
        "{out}"
    );
    assert_d2l_report(&out, 2);
    assert!(
        out.trim_end()
            .lines()
            .last()
            .unwrap()
            .contains("examples/sec on "),
        "{out}"
    );
}

#[test]
fn trains_on_the_cpu_reference_when_asked() {
    let Some(data) = data_dir() else { return };
    let args = [
        "--reference",
        "--data",
        &data,
        "--limit",
        "80",
        "--eval-limit",
        "50",
        "--epochs",
        "2",
        "--batch-size",
        "32",
    ];
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("device: kiln's CPU reference executor"),
        "{out}"
    );
    assert_d2l_report(&out, 2);
}

#[test]
fn no_adapter_is_a_clear_error() {
    let Some(data) = data_dir() else { return };
    // A backend this platform does not have: wgpu finds no adapter at all.
    let backend = if cfg!(target_os = "macos") {
        "dx12"
    } else {
        "metal"
    };
    let o = example()
        .env("WGPU_BACKEND", backend)
        .args(["--data", &data, "--limit", "10", "--epochs", "1"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("error: no GPU adapter found"), "{err}");
    assert!(err.contains("mesa-vulkan-drivers"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_gpu_run_outside_a_desktop_session_prints_no_errors() {
    if no_gpu() {
        return;
    }
    // As in CI, ssh or a container: no session, so no XDG_RUNTIME_DIR. Opening the Vulkan
    // device used to make Mesa's device-selection layer ask libwayland for the compositor,
    // which printed `error: XDG_RUNTIME_DIR is invalid or not set in the environment.` twice.
    let o = example()
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("RUST_LOG")
        .args(["--emit", "kernels", "--for-device"])
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(stdout(&o).contains("kernels"), "{}", stdout(&o));
    assert!(
        !err.lines().any(|l| l.to_lowercase().contains("error")),
        "{err}"
    );
    assert!(!err.contains("XDG_RUNTIME_DIR"), "{err}");
}

/// True (loudly) when there is no adapter and `KILN_REQUIRE_GPU` is unset: the test skips.
fn no_gpu() -> bool {
    let skip = kiln::runtime::Gpu::new().is_err() && std::env::var_os("KILN_REQUIRE_GPU").is_none();
    if skip {
        eprintln!("SKIPPED: no GPU adapter");
    }
    skip
}

fn tempfile_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-cli-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn save_writes_a_checkpoint_that_init_accepts_and_checks() {
    let Some(data) = data_dir() else { return };
    let dir = tempfile_dir("ckpt");
    let path = dir.join("lenet.safetensors");
    let p = path.to_str().unwrap();
    let base = [
        "--reference",
        "--data",
        &data,
        "--limit",
        "16",
        "--eval-limit",
        "8",
        "--epochs",
        "1",
        "--batch-size",
        "16",
    ];
    let o = run(&[&base[..], &["--save", p, "--no-shuffle"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains(&format!("saved {p} (epoch 1)")),
        "{}",
        stdout(&o)
    );
    let ckpt = kiln::checkpoint::load(&path).unwrap();
    assert_eq!(ckpt.params.len(), 10);
    assert_eq!(ckpt.params["0.weight"].shape(), [6, 1, 5, 5]);
    assert_eq!(ckpt.metadata["epoch"], "1");
    assert!(ckpt.metadata["ir"].starts_with("graph \"lenet\""));
    assert!(!dir.join("lenet.safetensors.tmp").exists());
    let o = run(&[&base[..], &["--init", p]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains(&format!("starting from checkpoint {p}")),
        "{}",
        stdout(&o)
    );
    // A checkpoint of another shape is refused, naming the tensor.
    let mut params = ckpt.params.clone();
    params.insert(
        "9.weight".into(),
        kiln::reference::Tensor::from_f32([84, 121], vec![0.0; 84 * 121]).unwrap(),
    );
    let bad = dir.join("bad.safetensors");
    kiln::checkpoint::save(&bad, &params, &Default::default()).unwrap();
    let o = run(&[&base[..], &["--init", bad.to_str().unwrap()]].concat());
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("tensor `9.weight` is f32[84,121] but the model needs f32[84,120]"),
        "{}",
        stderr(&o)
    );
}

fn gpu_available() -> bool {
    if kiln::runtime::Gpu::new().is_ok() {
        return true;
    }
    assert!(
        std::env::var_os("KILN_REQUIRE_GPU").is_none(),
        "GPU required but missing"
    );
    eprintln!("SKIPPED: no GPU adapter");
    false
}

#[test]
fn divergence_stops_and_keeps_the_last_good_checkpoint() {
    let Some(data) = data_dir() else { return };
    if !gpu_available() {
        return;
    }
    let dir = tempfile_dir("diverge");
    let path = dir.join("good.safetensors");
    std::fs::write(&path, b"the last good checkpoint").unwrap();
    let p = path.to_str().unwrap();
    let args = [
        "--variant",
        "relu",
        "--lr",
        "10000",
        "--data",
        &data,
        "--limit",
        "256",
        "--eval-limit",
        "16",
        "--epochs",
        "3",
        "--batch-size",
        "16",
        "--save",
        p,
        "--save-every",
        "1",
    ];
    let o = run(&args);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let err = stderr(&o);
    assert!(
        err.contains("error: training diverged: the loss became"),
        "{err}"
    );
    assert!(err.contains("in epoch 1, step "), "{err}");
    assert!(err.contains("Try a lower learning rate (--lr)"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"the last good checkpoint");
}

#[test]
fn zero_epochs_compiles_and_stops() {
    let Some(data) = data_dir() else { return };
    if !gpu_available() {
        return;
    }
    let o = run(&[
        "--data",
        &data,
        "--limit",
        "32",
        "--eval-limit",
        "8",
        "--epochs",
        "0",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("compiled the training step"),
        "{}",
        stdout(&o)
    );
    assert!(!stdout(&o).contains("epoch 1:"), "{}", stdout(&o));
    // Fewer examples than one batch (256 by default): one partial step per epoch.
    let o = run(&[
        "--data",
        &data,
        "--limit",
        "10",
        "--eval-limit",
        "8",
        "--epochs",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("epoch 1: loss "), "{}", stdout(&o));
}

/// Starts a long training run and sends it SIGINT once it is training.
#[cfg(unix)]
fn interrupt_run(dir: &std::path::Path, signals: usize) -> (Output, PathBuf) {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let data = kiln::data::locate(None).unwrap().display().to_string();
    let path = dir.join("interrupted.safetensors");
    let mut child = example()
        .args([
            "--data",
            &data,
            "--limit",
            "60000",
            "--eval-limit",
            "16",
            "--epochs",
            "1",
            "--batch-size",
            "64",
        ])
        .args(["--save", path.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.starts_with("compiled the training step") {
            break;
        }
    }
    // stderr is read as it comes, so that a further signal waits for the handler to have
    // taken the one before: two signals sent a fixed time apart either merge into one
    // delivery or arrive after a quick run has already finished its steps and exited.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in stderr.lines().map_while(Result::ok) {
            all.push_str(&line);
            all.push('\n');
            let _ = tx.send(line);
        }
        all
    });
    std::thread::sleep(std::time::Duration::from_millis(1500));
    for k in 0..signals {
        let status = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        if k + 1 < signals {
            let taken = rx
                .iter()
                .any(|line| line.starts_with("interrupt: finishing the steps in flight"));
            assert!(taken, "the run ended without taking the first interrupt");
        }
    }
    for line in lines {
        seen.push_str(&line.unwrap());
        seen.push('\n');
    }
    let mut out = child.wait_with_output().unwrap();
    out.stdout = seen.into_bytes();
    out.stderr = reader.join().unwrap().into_bytes();
    (out, path)
}

#[cfg(unix)]
#[test]
fn ctrl_c_finishes_the_steps_in_flight_and_saves() {
    if data_dir().is_none() || !gpu_available() {
        return;
    }
    let dir = tempfile_dir("sigint");
    let (o, path) = interrupt_run(&dir, 1);
    assert_eq!(o.status.code(), Some(130), "{}\n{}", stdout(&o), stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("interrupt: finishing the steps in flight"),
        "{err}"
    );
    assert!(err.contains("interrupted in epoch 1, after step "), "{err}");
    assert!(err.contains(&format!("saved {}", path.display())), "{err}");
    let ckpt = kiln::checkpoint::load(&path).unwrap();
    assert_eq!(ckpt.params.len(), 10);
    assert!(ckpt.metadata["interrupted"].starts_with("epoch 1, after step "));
    assert!(!dir.join("interrupted.safetensors.tmp").exists());
}

#[cfg(unix)]
#[test]
fn a_second_ctrl_c_exits_at_once() {
    if data_dir().is_none() || !gpu_available() {
        return;
    }
    let dir = tempfile_dir("sigint2");
    let (o, _) = interrupt_run(&dir, 2);
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("second interrupt: exiting now"),
        "{}",
        stderr(&o)
    );
}

/// A checkpoint of freshly initialised LeNet weights (seed 3) and those weights.
fn init_checkpoint(
    dir: &std::path::Path,
) -> (
    PathBuf,
    std::collections::HashMap<String, kiln::reference::Tensor>,
) {
    let probe = kiln::ir::lenet()
        .build("lenet", kiln::ir::TensorType::f32([1, 1, 28, 28]))
        .unwrap();
    let params = kiln::train::init_params(&probe, 3).unwrap();
    let path = dir.join("init.safetensors");
    kiln::checkpoint::save(&path, &params, &Default::default()).unwrap();
    (path, params)
}

fn write_png(path: &std::path::Path, w: u32, h: u32, pixels: &[u8]) {
    let file = std::fs::File::create(path).unwrap();
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    enc.set_color(png::ColorType::Grayscale);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header()
        .unwrap()
        .write_image_data(pixels)
        .unwrap();
}

#[test]
fn predict_matches_the_reference_probabilities() {
    let Some(data) = data_dir() else { return };
    if !gpu_available() {
        return;
    }
    let dir = tempfile_dir("predict");
    let (ckpt, params) = init_checkpoint(&dir);
    let fashion = kiln::data::load(std::path::Path::new(&data)).unwrap();
    let png_path = dir.join("seven.png");
    write_png(&png_path, 28, 28, fashion.test.image(7));
    let o = run(&[
        "--data",
        &data,
        "--init",
        ckpt.to_str().unwrap(),
        "--predict",
        "0",
        "3",
        png_path.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| l.contains(": ") && (l.starts_with("test image") || l.contains("seven.png")))
        .collect();
    assert_eq!(lines.len(), 3, "{out}");
    // The reference: softmax of the CPU executor's logits for the same images and weights.
    let graph = kiln::ir::lenet()
        .build(
            "lenet",
            kiln::ir::TensorType::new(kiln::ir::DType::U8, [3, 1, 28, 28]),
        )
        .unwrap();
    let pixels: Vec<u8> = [0usize, 3, 7]
        .iter()
        .flat_map(|&i| fashion.test.image(i).to_vec())
        .collect();
    let x = kiln::reference::Tensor::from_u8([3, 1, 28, 28], pixels).unwrap();
    let values = kiln::reference::execute(
        &graph,
        &std::collections::HashMap::from([("x".to_string(), x)]),
        &params,
    )
    .unwrap();
    let logits = values.output("output").unwrap().as_f32().unwrap().to_vec();
    for (k, line) in lines.iter().enumerate() {
        let row = &logits[k * 10..(k + 1) * 10];
        let m = row.iter().fold(f32::MIN, |a, &b| a.max(b));
        let e: Vec<f32> = row.iter().map(|v| (v - m).exp()).collect();
        let s: f32 = e.iter().sum();
        let mut ranked: Vec<(usize, f32)> = e.iter().map(|v| v / s).enumerate().collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        let want: Vec<String> = ranked[..3]
            .iter()
            .map(|(c, p)| format!("{} {p:.3}", kiln::data::CLASS_NAMES[*c]))
            .collect();
        assert!(line.ends_with(&want.join(", ")), "{line} vs {want:?}");
    }
    assert!(
        lines[0].starts_with("test image 0 (label ankle boot): "),
        "{}",
        lines[0]
    );
    // A PNG of the wrong size names the file.
    let bad = dir.join("big.png");
    write_png(&bad, 30, 28, &[0; 30 * 28]);
    let o = run(&[
        "--data",
        &data,
        "--init",
        ckpt.to_str().unwrap(),
        "--predict",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains(&format!(
            "{}: needs a 28x28 8-bit grayscale image",
            bad.display()
        )),
        "{}",
        stderr(&o)
    );
    let o = run(&[
        "--data",
        &data,
        "--init",
        ckpt.to_str().unwrap(),
        "--predict",
        "10000",
    ]);
    assert!(
        stderr(&o).contains("test image 10000 does not exist (the test set has 10000)"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn activations_are_written_as_png_grids() {
    let Some(data) = data_dir() else { return };
    if !gpu_available() {
        return;
    }
    let dir = tempfile_dir("activations");
    let (ckpt, _) = init_checkpoint(&dir);
    let out_dir = dir.join("pictures");
    let o = run(&[
        "--data",
        &data,
        "--init",
        ckpt.to_str().unwrap(),
        "--activations",
        out_dir.to_str().unwrap(),
        "--activation-images",
        "0,5",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    for (name, w, h) in [
        ("image0_layer1.png", 86, 57),
        ("image0_layer4.png", 43, 43),
        ("image5_layer1.png", 86, 57),
        ("image5_layer4.png", 43, 43),
    ] {
        let decoder = png::Decoder::new(std::io::BufReader::new(
            std::fs::File::open(out_dir.join(name)).unwrap(),
        ));
        let reader = decoder.read_info().unwrap();
        assert_eq!(
            (reader.info().width, reader.info().height),
            (w, h),
            "{name}"
        );
    }
}

#[test]
fn trains_a_model_given_as_ir_text() {
    let Some(data) = data_dir() else { return };
    if !gpu_available() {
        return;
    }
    let dir = tempfile_dir("model");
    let o = run(&[
        "--emit",
        "ir",
        "--batch-size",
        "1",
        "--variant",
        "relu-maxpool",
    ]);
    assert!(o.status.success());
    let file = dir.join("relu.kir");
    std::fs::write(&file, stdout(&o)).unwrap();
    let o = run(&[
        "--model",
        file.to_str().unwrap(),
        "--data",
        &data,
        "--limit",
        "40",
        "--eval-limit",
        "8",
        "--epochs",
        "1",
        "--batch-size",
        "16",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains(&format!("model {} (61,706 parameters)", file.display())),
        "{}",
        stdout(&o)
    );
    assert_d2l_report(&stdout(&o), 1);
    // A shape error in the file names the file, line and column.
    let bad = dir.join("bad.kir");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&file)
            .unwrap()
            .replace("f32[120,400]", "f32[120,401]"),
    )
    .unwrap();
    let o = run(&[
        "--model",
        bad.to_str().unwrap(),
        "--data",
        &data,
        "--limit",
        "8",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains(&format!(
            "{}:18:9: matmul: inner dimensions differ",
            bad.display()
        )),
        "{}",
        stderr(&o)
    );
    // A model that does not end in the ten class scores is refused before it trains (it used
    // to "train" and report an accuracy of 0.000).
    let flat = dir.join("flat.kir");
    std::fs::write(
        &flat,
        "graph \"flat\" {\n  %0 = input \"x\" : f32[1,1,28,28]\n  %1 = reshape(%0) shape=[1,784] : f32[1,784]\n  output \"output\" = %1\n}\n",
    )
    .unwrap();
    let o = run(&[
        "--model",
        flat.to_str().unwrap(),
        "--data",
        &data,
        "--limit",
        "8",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains(&format!(
            "{}: the output must be the class scores, f32[N,10] for the data set's 10 classes, \
             but the model's output is f32[N,784]",
            flat.display()
        )),
        "{}",
        stderr(&o)
    );
    assert!(!stdout(&o).contains("acc"), "{}", stdout(&o));
}

#[test]
fn profile_prints_each_kernels_time_work_and_rate() {
    let Some(data) = data_dir() else { return };
    if no_gpu() {
        return;
    }
    let o = run(&[
        "--data",
        &data,
        "--limit",
        "16",
        "--eval-limit",
        "16",
        "--batch-size",
        "8",
        "--profile",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("\ntiming: "), "{out}");
    let header = out.lines().find(|l| l.starts_with("kernel ")).expect(&out);
    for column in [
        "ms/step",
        "share",
        "MFLOP",
        "MB",
        "GFLOP/s",
        "GB/s",
        "M ld st+wg",
        "M ld unif",
        "G ld/s",
    ] {
        assert!(header.contains(column), "{header}");
    }
    // One row per kernel of the step, in order; conv1's row counts its multiply-adds:
    // 8*6*28*28 outputs of 25 (2 flops each) plus bias, sigmoid and the pooling.
    let rows: Vec<&str> = out.lines().filter(|l| l.starts_with('k')).skip(1).collect();
    assert_eq!(rows.len(), 17, "{out}");
    assert!(rows[0].starts_with("k00_scale_u8"), "{out}");
    let conv1: Vec<&str> = rows[1].split_whitespace().collect();
    let mflop: f64 = conv1[3].parse().unwrap();
    let expected =
        (2.0 * 8.0 * 6.0 * 784.0 * 25.0 + 2.0 * 8.0 * 6.0 * 784.0 + 4.0 * 8.0 * 6.0 * 196.0) / 1e6;
    assert!((mflop - expected).abs() < 0.05, "{} vs {expected}", rows[1]);
    assert!(out.lines().any(|l| l.starts_with("total ")), "{out}");
}

#[test]
fn plot_draws_the_three_curves_after_every_epoch_as_svg_or_png() {
    let o = run(&["--plot", "curves.jpg"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--plot curves.jpg: the chart is written as SVG or PNG"),
        "{}",
        stderr(&o)
    );
    let Some(data) = data_dir() else { return };
    if no_gpu() {
        return;
    }
    let dir = tempfile_dir("plot");
    for name in ["curves.svg", "curves.png"] {
        let path = dir.join(name);
        let o = run(&[
            "--data",
            &data,
            "--limit",
            "32",
            "--eval-limit",
            "16",
            "--batch-size",
            "16",
            "--epochs",
            "2",
            "--plot",
            path.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let bytes = std::fs::read(&path).unwrap();
        if name.ends_with(".svg") {
            let svg = String::from_utf8(bytes).unwrap();
            for label in ["train loss", "train acc", "test acc", "epoch"] {
                assert!(svg.contains(label), "{label} missing");
            }
            // Two epochs: a marker per epoch on each of the three curves.
            assert_eq!(svg.matches("<circle").count(), 6, "{svg}");
        } else {
            let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
            let info = decoder.read_info().unwrap().info().clone();
            assert_eq!((info.width, info.height), (640, 420));
        }
    }
    // Written by rename: no temporary file is left beside the charts.
    let mut left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["curves.png", "curves.svg"]);
}

#[test]
fn init_resumes_an_adam_run_exactly() {
    let Some(data) = data_dir() else { return };
    if !gpu_available() {
        return;
    }
    let dir = tempfile_dir("resume");
    let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let (two, one, resumed) = (path("two.st"), path("one.st"), path("resumed.st"));
    let base = [
        "--data",
        &data,
        "--limit",
        "300",
        "--eval-limit",
        "50",
        "--batch-size",
        "128",
        "--optimizer",
        "adam",
        "--variant",
        "relu",
    ];
    let o = run(&[&base[..], &["--epochs", "2", "--save", &two]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&[&base[..], &["--epochs", "1", "--save", &one]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&[
        &base[..],
        &["--epochs", "1", "--init", &one, "--save", &resumed],
    ]
    .concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("(after epoch 1)"), "{out}");
    assert!(out.contains("epoch 2: loss"), "{out}");
    let (a, b) = (
        kiln::checkpoint::load(std::path::Path::new(&two)).unwrap(),
        kiln::checkpoint::load(std::path::Path::new(&resumed)).unwrap(),
    );
    assert_eq!(b.metadata["epoch"], "2");
    assert_eq!(b.metadata["optimizer"], "Adam");
    assert!(a.params.contains_key("optimizer.state.0.weight.exp_avg_sq"));
    assert_eq!(
        a.params["optimizer.state.0.weight.step"].as_f32().unwrap(),
        [6.0]
    );
    assert_eq!(
        a.params, b.params,
        "parameters and optimizer state, bit for bit"
    );
    // Resuming with another optimizer is refused, naming the file.
    let o = run(&[
        "--data",
        &data,
        "--limit",
        "300",
        "--eval-limit",
        "50",
        "--batch-size",
        "128",
        "--variant",
        "relu",
        "--momentum",
        "0.9",
        "--init",
        &one,
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("one.st") && stderr(&o).contains("Adam"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn optimizer_flags_are_checked() {
    let o = run(&[
        "--optimizer",
        "adam",
        "--momentum",
        "0.9",
        "--emit",
        "train-ir",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("--momentum and --nesterov"),
        "{}",
        stderr(&o)
    );
    let o = run(&[
        "--optimizer",
        "adam",
        "--betas",
        "0.9",
        "1.5",
        "--emit",
        "train-ir",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("Invalid beta parameter at index 1"),
        "{}",
        stderr(&o)
    );
    let o = run(&["--optimizer", "adamw", "--emit", "train-ir"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ir = stdout(&o);
    assert!(ir.contains("param \"optim.step\""), "{ir}");
    assert!(ir.contains("\"optim.0.weight.exp_avg_sq\""), "{ir}");
}
