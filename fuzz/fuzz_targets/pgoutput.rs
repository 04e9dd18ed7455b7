//! Fuzzes the pgoutput decoder: any bytes must decode or fail with an error, never panic,
//! hang, or allocate beyond what the input describes.
//!
//! Run: `scripts/fuzz.sh pgoutput` (from the repository root).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let bytes = bytes::Bytes::copy_from_slice(data);
    let _ = invsync::cdc::decoder::decode(&bytes);
});
