//! `kiln-shim DIR`: looks after the VM of the grant whose directory is DIR
//! (see `kiln_bridge::backends::local::shim`). kilnd starts it; it outlives
//! kilnd and exits when the VM has ended and its final state is written.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only for a person: logs often go to files (shim.log, journals).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: kiln-shim GRANT_DIR");
        return ExitCode::from(2);
    };
    match kiln_bridge::backends::local::shim::run(&dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiln-shim: {e}");
            ExitCode::FAILURE
        }
    }
}
