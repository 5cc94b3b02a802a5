//! The `switchyard-cni` binary: reads the environment and stdin, prints the outcome.

use std::io::{Read, Write};

fn main() {
    let vars = std::env::vars().collect();
    let mut stdin = Vec::new();
    // VERSION and STATUS may come without input; a read error is treated as empty input.
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let outcome = switchyard_cni::run(&vars, &stdin);
    let mut out = std::io::stdout();
    let _ = out.write_all(outcome.stdout.as_bytes());
    let _ = out.flush();
    std::process::exit(outcome.status);
}
