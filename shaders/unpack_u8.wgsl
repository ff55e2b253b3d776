// Byte `i` of a u8 tensor packed little-endian, four bytes to a word.
fn {{FN}}(i: u32) -> u32 {
    return ({{BUF}}[i >> 2u] >> ((i & 3u) * 8u)) & 0xffu;
}
