//! proxy-agent: turns Kubernetes Services into eBPF map entries and keeps them in step.
pub mod check;
pub mod cleanup;
pub mod datapath;
pub mod events;
pub mod explain;
pub mod flows;
pub mod kpconfig;
pub mod model;
pub mod report;
pub mod run;
pub mod serve;
pub mod source;
pub mod status;
