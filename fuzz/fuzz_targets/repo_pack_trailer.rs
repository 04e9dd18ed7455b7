//! Fuzz target: a pack trailer's plaintext, sealed into an otherwise valid pack.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = invsync::backup::fuzzing::pack_trailer(data);
});
