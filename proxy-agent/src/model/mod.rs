//! Pure model: Kubernetes objects in, desired datapath state out. No I/O here.
pub mod desired;
pub mod maglev;
pub mod translate;

pub use desired::{
    DesiredService, DesiredState, Endpoint, EndpointState, Frontend, LbAlgorithm, Protocol, Scope,
};
pub use translate::{HealthCheck, Inputs, Options, TranslateError, Translation, translate};
