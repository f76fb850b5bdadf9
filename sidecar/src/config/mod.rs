//! Configuration: the model of CONTRACT §3 as plain data, its validation with every problem
//! reported at its line (`FILE:LINE:COL: field.path: message`), environment overrides
//! (`OUTRIDER_SERVICE`, `OUTRIDER_LISTEN_INBOUND`, ...) and the file watch behind live reload.
//!
//! House rule: this module is plain data. It imports no runtime module of the sidecar; the
//! reload watcher only produces new validated configs for others to swap in.

mod decode;
mod load;
mod model;
pub mod reload;
mod yaml;

pub use decode::{Problem, parse_duration, parse_size};
pub use load::{
    ENV_KEYS, GRPC_CODES, LoadError, Loaded, env_name, load_file, load_str, split_host_port,
};
pub use model::*;
