//! `kiln-shim DIR`: looks after the VM of the grant whose directory is DIR
//! (see `kiln_bridge::backends::local::shim`). kilnd starts it; it outlives
//! kilnd and exits when the VM has ended and its final state is written.
//! kilnd also runs it as `kiln-shim --build-image HOME IMAGE ROOTFS
//! [INSECURE_REGISTRY...]` to build a grant's image in a process of its own
//! (see `backends::local::build`).

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;

use kiln_bridge::backends::local::{build, shim};

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
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    match args.as_slice() {
        [flag, home, image, rootfs, insecure @ ..] if flag == build::BUILD_FLAG => {
            let insecure: Option<Vec<String>> = insecure
                .iter()
                .map(|r| r.to_str().map(str::to_string))
                .collect();
            match (
                image.to_str(),
                rootfs.to_str().and_then(build::Rootfs::parse),
                insecure,
            ) {
                (Some(image), Some(rootfs), Some(insecure)) => {
                    build::serve(Path::new(home), image, rootfs, insecure)
                }
                _ => usage(),
            }
        }
        [dir] => match shim::run(Path::new(dir)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("kiln-shim: {}", kiln_bridge::error_chain(&e));
                ExitCode::FAILURE
            }
        },
        _ => usage(),
    }
}

fn usage() -> ExitCode {
    // The build mode is kilnd's own business; it is not advertised.
    eprintln!("usage: kiln-shim GRANT_DIR");
    ExitCode::from(2)
}
