//! Fuzz target: a decrypted snapshot manifest, or its JSON alone, then its paths checked as restore checks them.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = invsync::backup::fuzzing::snapshot_body(data);
});
