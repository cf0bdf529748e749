#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| split_token_fuzz::etcd(data));
