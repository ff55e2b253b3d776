//! The checkpoint loader on arbitrary bytes: well-formed tensors or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.safetensors");
    if let Ok(c) = kiln_checkpoint::load_bytes(path, data) {
        for t in c.params.values() {
            assert_eq!(
                t.as_f32().map(<[f32]>::len),
                Some(t.shape().iter().product::<usize>())
            );
        }
    }
});
