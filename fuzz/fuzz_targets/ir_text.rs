//! The IR text parser on arbitrary text: a parsed graph verifies, every type in it is
//! representable, and it prints back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(g) = kiln_ir::parse(text) else {
        return;
    };
    kiln_ir::verify(&g).expect("parsed graphs verify");
    for n in g.nodes() {
        assert!(n.ty.checked_numel().is_some(), "{} overflows", n.ty);
    }
    let printed = kiln_ir::print(&g);
    assert_eq!(kiln_ir::parse(&printed).expect("printed text parses"), g);
});
