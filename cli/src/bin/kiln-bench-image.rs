//! Image build benchmark: kiln's cold and warm `kiln image build` from a
//! registry on 127.0.0.1, side by side with the standard pipeline in the
//! same run (`skopeo copy` + `umoci unpack` + `find | cpio -o -H newc`).
//! Prints wall time and peak RSS of each; figures, not assertions.
//!
//! Usage: kiln-bench-image [--big DIR]... (default --big /usr/bin)
//! Needs docker-registry, skopeo, umoci, cpio (scripts/setup.sh).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Wall time, CPU time (user + system) and peak RSS (KiB) of one child
/// process. CPU time is the steadier figure on a busy host.
#[derive(Clone, Copy, Default)]
struct Run {
    wall: Duration,
    cpu: Duration,
    maxrss_kib: i64,
}

impl Run {
    fn then(self, o: Run) -> Run {
        Run {
            wall: self.wall + o.wall,
            cpu: self.cpu + o.cpu,
            maxrss_kib: self.maxrss_kib.max(o.maxrss_kib),
        }
    }
}

/// Runs `cmd` and reaps it with wait4 to get its own rusage.
fn measure(cmd: &mut Command) -> Result<Run> {
    let start = Instant::now();
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall = start.elapsed();
    if rc != pid || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        let mut err = String::new();
        if let Some(mut e) = child.stderr {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        bail!("{cmd:?} failed: {err}");
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Ok(Run {
        wall,
        cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
        maxrss_kib: usage.ru_maxrss,
    })
}

fn sh(script: &str) -> Result<Run> {
    measure(Command::new("bash").args(["-euo", "pipefail", "-c", script]))
}

fn make_image(dir: &Path, name: &str, extra: &[PathBuf]) -> Result<PathBuf> {
    let layout = dir.join(format!("{name}-oci"));
    let bundle = dir.join(format!("{name}-bundle"));
    let mut copy = String::new();
    for e in extra {
        copy += &format!("mkdir -p $r{p}; cp -a {p}/. $r{p}/; ", p = e.display());
    }
    sh(&format!(
        "umoci init --layout {l}; umoci new --image {l}:t; umoci unpack --image {l}:t {b} >/dev/null; \
         r={b}/rootfs; mkdir -p $r/bin $r/etc; cp /bin/busybox $r/bin/; \
         for a in sh ls cat echo mount; do ln -s busybox $r/bin/$a; done; echo bench > $r/etc/hostname; \
         {copy} umoci repack --image {l}:t {b}; umoci config --image {l}:t --config.cmd /bin/sh; rm -rf {b}",
        l = layout.display(),
        b = bundle.display()
    ))?;
    Ok(layout)
}

fn main() -> Result<()> {
    let mut big: Vec<PathBuf> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--big" => big.push(args.next().context("--big needs a directory")?.into()),
            other => bail!("unknown argument {other:?}"),
        }
    }
    if big.is_empty() {
        big.push("/usr/bin".into());
    }
    let kiln = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .join("kiln");
    let work = tempfile::tempdir()?;
    let w = work.path();
    let agent = w.join("agent");
    std::fs::copy("/bin/busybox", &agent)?;

    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let config = w.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            w.join("registry").display()
        ),
    )?;
    let mut registry = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("docker-registry")?;
    let result = run(&kiln, w, &agent, &addr, &big);
    let _ = registry.kill();
    let _ = registry.wait();
    result
}

fn run(kiln: &Path, w: &Path, agent: &Path, addr: &str, big: &[PathBuf]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            bail!("registry did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "{:<8} {:<29} {:>9} {:>9} {:>13} {:>11}",
        "image", "method", "wall ms", "CPU ms", "peak RSS MiB", "output MiB"
    );
    for (name, extra) in [("busybox", Vec::new()), ("big", big.to_vec())] {
        let layout = make_image(w, name, &extra)?;
        sh(&format!(
            "skopeo copy -q --dest-tls-verify=false oci:{}:t docker://{addr}/bench/{name}:t",
            layout.display()
        ))?;
        let reference = format!("{addr}/bench/{name}:t");

        // The standard pipeline, into its own scratch space.
        let p = w.join(format!("{name}-pipeline"));
        std::fs::create_dir_all(&p)?;
        let pd = p.display();
        let pipeline = sh(&format!(
            "skopeo copy -q --src-tls-verify=false docker://{reference} oci:{pd}/oci:t"
        ))?
        .then(sh(&format!(
            "umoci unpack --image {pd}/oci:t {pd}/bundle >/dev/null"
        ))?)
        .then(sh(&format!(
            "cd {pd}/bundle/rootfs && find . | cpio --quiet -o -H newc > {pd}/out.cpio"
        ))?);
        let pipeline_size = std::fs::metadata(p.join("out.cpio"))?.len();

        let home = w.join(format!("{name}-home"));
        let build = || {
            measure(
                Command::new(kiln)
                    .args(["image", "build", &reference, "--agent"])
                    .arg(agent)
                    .env("KILN_HOME", &home),
            )
        };
        let cold = build()?;
        let warm = build()?;
        let out_size: u64 = std::fs::read_dir(home.join("images/builds"))?
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "cpio"))
            .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
            .sum();
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        for (method, r, size) in [
            ("pipeline (skopeo+umoci+cpio)", pipeline, pipeline_size),
            ("kiln cold", cold, out_size),
            ("kiln warm", warm, out_size),
        ] {
            println!(
                "{name:<8} {method:<29} {:>9.1} {:>9.1} {:>13.1} {:>11.1}",
                r.wall.as_secs_f64() * 1000.0,
                r.cpu.as_secs_f64() * 1000.0,
                r.maxrss_kib as f64 / 1024.0,
                mib(size)
            );
        }
        println!(
            "{name:<8} cold/pipeline: wall {:.2}, CPU {:.2}",
            cold.wall.as_secs_f64() / pipeline.wall.as_secs_f64(),
            cold.cpu.as_secs_f64() / pipeline.cpu.as_secs_f64()
        );
        std::fs::remove_dir_all(&p)?;
    }
    Ok(())
}
