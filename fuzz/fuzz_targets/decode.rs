//! The frame codec on arbitrary bytes: decoding never panics, and whatever
//! decodes re-encodes to a frame that decodes to itself.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    volna_proto::fuzzing::decode_round_trips(data);
});
