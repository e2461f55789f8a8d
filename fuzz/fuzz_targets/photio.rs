//! `pixbatch::fuzzing::photio`: see src/fuzzing.rs for what is checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    pixbatch::fuzzing::photio(data);
});
