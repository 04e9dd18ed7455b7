//! Fuzz target: a pack object (header, blobs, sealed trailer, trailer length), then every blob it lists.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = invsync::backup::fuzzing::pack(data);
});
