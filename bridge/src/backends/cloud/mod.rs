//! Cloud overflow: grants run on cloud instances (AWS EC2, GCP Compute)
//! when owned capacity runs out. One `CloudBackend` holds the rules every
//! cloud shares; `api::CloudApi` is what each cloud translates.

pub mod api;
pub mod bootstrap;
