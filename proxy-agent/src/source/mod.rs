//! Where Kubernetes objects come from: manifest files (and, later, the API server).
pub mod kube;
pub mod manifests;
