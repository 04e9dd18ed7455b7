//! Fuzz target: a decrypted index object body, or its JSON alone, then loaded as restore loads it.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = invsync::backup::fuzzing::index_body(data);
});
