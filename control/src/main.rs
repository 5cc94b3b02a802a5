//! `switchyard-control`: the command-line interface to a Switchyard dataplane, and the
//! node agent (`run`). The commands live in the library's `cli` module.

use clap::Parser;
use std::process::ExitCode;
use switchyard_control::cli::{commands, Cli};

fn main() -> ExitCode {
    commands::run(Cli::parse())
}
