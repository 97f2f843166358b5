//! A whole broker session whose control stream is arbitrary bytes: Hello or
//! not, valid frames or garbage, publishes, subscribes, refreshes. The
//! broker must never panic, whatever the client sends.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    volna_broker::fuzzing::run_session(data).expect("the harness starts");
});
