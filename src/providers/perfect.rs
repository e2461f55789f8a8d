//! Perfect adapter. (Placeholder while the adapter is written: every job is refused with
//! a clear reason, so nothing is sent.)

use std::sync::Arc;

use crate::model::JobSpec;
use crate::providers::{Provider, ProviderConfig};

pub fn build(_config: &ProviderConfig) -> Result<Arc<dyn Provider>, String> {
    Err("perfect: this version of pixbatch does not implement the perfect provider yet".into())
}

pub fn validate(_spec: &JobSpec) -> Vec<String> {
    vec!["perfect: this version of pixbatch does not implement the perfect provider yet".into()]
}

pub fn requests_per_job(_spec: &JobSpec) -> u32 {
    0
}
