//! Parameter checking of every task: any names and values are accepted or
//! refused with an error, and the accepted ones give a cost estimate.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use offload_fuzz::CATALOG;
use offload_worker::Catalog;

#[derive(Debug, arbitrary::Arbitrary)]
struct Input {
    task: u8,
    params: HashMap<String, String>,
    input_len: u32,
}

fuzz_target!(|input: Input| {
    let tasks: Vec<_> = CATALOG.iter().collect();
    let task = tasks[usize::from(input.task) % tasks.len()];
    if let Ok(job) = Catalog::prepare(task.as_ref(), &input.params) {
        let _ = job.estimate(input.input_len as usize);
    }
});
