//! Fuzz target: the plaintext repository config object.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = invsync::backup::fuzzing::repo_config(data);
});
