//! Process wiring: builds the runtime, loads the config, starts listeners, handles signals.
use std::path::Path;
use std::process::ExitCode;

pub fn run_cli(_config: &Path) -> ExitCode {
    ExitCode::from(2)
}
