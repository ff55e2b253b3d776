//! The IR text parser on arbitrary text: a parsed graph verifies and prints back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(g) = kiln_ir::parse(text) {
            kiln_ir::verify(&g).expect("parsed graphs verify");
            let printed = kiln_ir::print(&g);
            assert_eq!(kiln_ir::parse(&printed).expect("printed text parses"), g);
        }
    }
});
