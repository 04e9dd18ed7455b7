//! Fuzz target: an encrypted index or snapshot object as a store returns it (header, wrapped key, sealed body, decoded body).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = invsync::backup::fuzzing::sealed_object(data);
});
