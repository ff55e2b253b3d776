//! The IDX reader on arbitrary bytes (raw or gzip): errors, never panics or huge allocations.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.idx");
    for ndims in [1, 3] {
        if let Ok(a) = kiln_data::read_idx_bytes(path, data, ndims) {
            assert_eq!(a.data.len(), a.dims.iter().product::<usize>());
        }
    }
});
