//! The kernel side as the agent sees it: loading and attaching programs, and the maps' contents.
pub mod addr;
pub mod attach;
pub mod external;
pub mod gc;
pub mod loader;
pub mod maglev;
pub mod maps;
pub mod migrate;
pub mod probe;
pub mod sockets;
pub mod writer;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum DatapathError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("attaching to interface {iface}: {message}")]
    Attach { iface: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}
