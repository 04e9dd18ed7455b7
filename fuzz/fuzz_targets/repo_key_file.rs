//! Fuzz target: a keys/ object (JSON with the armored, age-wrapped master key).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = invsync::backup::fuzzing::key_file(data);
});
