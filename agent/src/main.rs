//! `kiln-agent`, PID 1 of every kiln micro-VM.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_agent::image_config::{self, ImageConfig};
use kiln_agent::system::{self, console};
use kiln_agent::{identity, publish, reaper, rootfs, ssh, usage, user, vsock, workload};
use kiln_protocol::console::{agent_fatal_line, READY_MARKER};
use kiln_protocol::{
    read_frame, ExitStatus, Frame, Identity, Message, Workload, CONTROL_PORT,
    EXIT_NOT_EXECUTABLE as NOT_EXECUTABLE, EXIT_NOT_FOUND as NOT_FOUND,
};

/// Kernel parameter that makes the agent fail fatally once ready.
const FAULT_PANIC: &str = "kiln.fault=panic";
/// How long to keep trying the host's control socket at boot.
const CONNECT_ATTEMPTS: u32 = 20;

type Conn = Arc<Mutex<Option<File>>>;

fn send(conn: &Conn, frame: &Frame) {
    let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(f) = guard.as_mut() {
        if f.write_all(&frame.encode()).is_err() {
            // The host went away: keep running, fall back to the console.
            *guard = None;
        }
    }
}

/// glibc features the agent must not use (see `without_avx`).
const NO_AVX: &str =
    "glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX_Fast_Unaligned_Load";

/// On PVM hosts CPUID passes AVX through to guest user code while the guest
/// kernel runs with `noxsave` and so does not preserve the upper halves of
/// the YMM registers across context switches. glibc's AVX memcpy then
/// corrupts data in a busy multi-threaded process (seen as SFTP stream
/// corruption over SSH). kiln-vmm puts `GLIBC_TUNABLES` on such a guest's
/// command line, which the kernel hands to init's environment; without it,
/// PID 1 re-execs once with glibc's AVX variants turned off (if that fails,
/// it carries on as it is).
fn without_avx(started_ms: u64) {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("GLIBC_TUNABLES").is_some() {
        return;
    }
    let mut args = std::env::args_os();
    let Some(me) = args.next() else { return };
    let e = std::process::Command::new(me)
        .args(args)
        .env("GLIBC_TUNABLES", NO_AVX)
        .env(STARTED_ENV, started_ms.to_string())
        .exec();
    console(&format!("re-exec without AVX failed: {e}"));
}

/// Carries the boot-clock time of the agent's first instructions across the
/// re-exec, so `init_to_ready_ms` counts from the kernel's exec of `/init`.
const STARTED_ENV: &str = "KILN_AGENT_STARTED_MS";

/// When this agent started, in ms of the boot clock: now, or what the
/// process that re-exec'd it passed on (then the variable is dropped, so
/// workloads never see it).
fn started_ms() -> u64 {
    let now = system::boot_clock_ms();
    match std::env::var(STARTED_ENV) {
        Ok(v) => {
            std::env::remove_var(STARTED_ENV);
            v.parse().unwrap_or(now)
        }
        Err(_) => now,
    }
}

/// A second handle on the control connection for a reading thread, if
/// there is a connection.
fn reader_of(conn: &Conn) -> Option<File> {
    conn.lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .and_then(|f| f.try_clone().ok())
}

fn main() {
    let started = started_ms();
    let is_init = std::process::id() == 1;
    if is_init {
        without_avx(started);
    }
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        if let Some(name) = thread
            .name()
            .filter(|n| n.starts_with("ssh") || n.starts_with("publish"))
        {
            // An SSH or forwarded connection's failure must not end the VM:
            // that task or thread unwinds (tokio contains task panics) and
            // only its session or connection is lost.
            console(&format!("internal error on thread {name}: {info}"));
            return;
        }
        console(&agent_fatal_line(&info.to_string()));
        if is_init {
            system::power_off();
        }
    }));
    let boot = Instant::now();
    if is_init {
        system::mount_pseudo_filesystems();
        let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
        if let Some(req) = rootfs::requested(&cmdline) {
            if let Err(e) = rootfs::switch(&req) {
                // Before `ready`: the host reports this line as the failure.
                console(&format!(
                    "KILN_AGENT_FATAL block root: {}",
                    rootfs::describe(&e)
                ));
                system::power_off();
            }
        }
        system::set_hostname("kiln");
        system::loopback_up();
        if !system::seed_entropy() {
            console("no /dev/hwrng: entropy not seeded");
        }
    }

    let conn: Conn = Arc::new(Mutex::new(connect_host()));
    // A clone says what its template's boot took, not the time since.
    let init_to_ready_ms = system::boot_clock_ms().saturating_sub(started);
    let ready = |resumed: bool| {
        let uptime_ms = std::fs::read_to_string("/proc/uptime")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(boot.elapsed().as_millis() as u64, |s| (s * 1000.0) as u64);
        Frame::Control(Message::Ready {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_ms,
            init_to_ready_ms,
            resumed,
        })
    };
    send(&conn, &ready(false));
    console(READY_MARKER);
    if is_init && system::kernel_cmdline_has(FAULT_PANIC) {
        // Lets tests prove how a fatal agent error ends the VM.
        panic!("fault injected by {FAULT_PANIC}");
    }

    let start = wait_for_start(&conn, &|| ready(true));
    if let Some(id) = &start.identity {
        if let Err(e) = identity::apply(id) {
            console(&format!("identity: {e}"));
        }
    }
    // SSH is a convenience next to the workload: without it the VM still runs.
    if !start.authorized_keys.is_empty() {
        match ssh::start(&start.authorized_keys, start.ssh_host_key.as_deref()) {
            Ok(()) => console("ssh: listening on vsock port 22"),
            Err(e) => console(&format!("ssh: not serving: {e}")),
        }
    }
    // Like SSH, after `Start`: a VM restored from a snapshot listens on its
    // own vsock device, and the ports are the ones this run published.
    if !start.published_ports.is_empty() {
        match publish::start(&start.published_ports) {
            Ok(()) => console(&format!(
                "publish: serving guest TCP ports {:?}",
                start.published_ports
            )),
            Err(e) => console(&format!("publish: not serving: {e}")),
        }
    }
    let one_shot = start.one_shot;
    let host = Arc::new(HostRequests::default());
    let status = run_workload(&conn, start, host.clone());
    console(&format!("workload ended: {status:?}"));
    if !one_shot {
        // The VM stays up (e.g. for SSH) until the host asks it to stop.
        console("not one-shot: waiting for the host's shutdown request");
        if !host.listening.load(Ordering::Acquire) {
            listen_to_host(&conn, None, None, host.clone());
        }
        while !host.shutdown.load(Ordering::Acquire) {
            workload::reap(0);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    if is_init {
        system::power_off();
    }
    std::process::exit(status.shell_code());
}

fn connect_host() -> Option<File> {
    for attempt in 0..CONNECT_ATTEMPTS {
        match vsock::connect(vsock::HOST_CID, CONTROL_PORT) {
            Ok(f) => return Some(f),
            // No vsock device at all (drivers probe before init runs):
            // waiting cannot help.
            Err(e) if attempt + 1 == CONNECT_ATTEMPTS || e.raw_os_error() == Some(libc::ENODEV) => {
                console(&format!(
                    "no host control channel ({e}); output goes to the console"
                ));
                return None;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    None
}

/// What the control-channel reader tells the main thread.
#[derive(Default)]
struct HostRequests {
    /// The host asked for a shutdown.
    shutdown: AtomicBool,
    /// A reader thread owns the control channel.
    listening: AtomicBool,
}

struct StartRequest {
    workload: Workload,
    usage_interval: Duration,
    authorized_keys: Vec<String>,
    ssh_host_key: Option<String>,
    one_shot: bool,
    identity: Option<Box<Identity>>,
    published_ports: Vec<u16>,
}

/// Reads frames until the host says what to run (or runs the image's
/// default when there is no host). A channel reset while waiting is what
/// a restored snapshot sees (its VMM drops every vsock connection): the
/// agent connects again, says `ready` (`resumed`) and goes on waiting.
fn wait_for_start(conn: &Conn, resumed_ready: &dyn Fn() -> Frame) -> StartRequest {
    let default = StartRequest {
        workload: Workload::default(),
        usage_interval: Duration::from_secs(1),
        authorized_keys: Vec::new(),
        ssh_host_key: None,
        one_shot: true,
        identity: None,
        published_ports: Vec::new(),
    };
    let Some(mut reader) = reader_of(conn) else {
        return default;
    };
    loop {
        match read_frame(&mut reader) {
            Ok(Some(Ok(Frame::Control(Message::Start {
                workload,
                usage_interval_ms,
                authorized_keys,
                ssh_host_key,
                one_shot,
                identity,
                published_ports,
            })))) => {
                return StartRequest {
                    workload,
                    usage_interval: Duration::from_millis(usage_interval_ms.max(100)),
                    authorized_keys,
                    ssh_host_key,
                    one_shot,
                    identity,
                    published_ports,
                }
            }
            Ok(Some(Ok(_))) => send(conn, &error("expected a start message")),
            Ok(Some(Err(e))) => send(conn, &error(&e.to_string())),
            Ok(None) | Err(_) => {
                let Some(again) = connect_host() else {
                    return default;
                };
                console("control channel reset: connected again");
                let Ok(next) = again.try_clone() else {
                    return default;
                };
                *conn.lock().unwrap_or_else(|p| p.into_inner()) = Some(again);
                reader = next;
                // A clone's usage is its own: the template's boot is not.
                usage::count_from_now();
                send(conn, &resumed_ready());
            }
        }
    }
}

fn error(message: &str) -> Frame {
    Frame::Control(Message::Error {
        message: message.to_string(),
    })
}

fn run_workload(conn: &Conn, start: StartRequest, host: Arc<HostRequests>) -> ExitStatus {
    let image = match ImageConfig::load(Path::new(image_config::CONFIG_PATH)) {
        Ok(c) => c,
        Err(e) => return not_runnable(conn, &e.to_string(), NOT_EXECUTABLE),
    };
    let resolved = match image_config::resolve(&image, &start.workload) {
        Ok(r) => r,
        Err(e) => return not_runnable(conn, &e.to_string(), NOT_EXECUTABLE),
    };
    let identity = match user::resolve(resolved.user.as_deref(), Path::new("/")) {
        Ok(id) => id,
        Err(e) => return not_runnable(conn, &e.to_string(), NOT_EXECUTABLE),
    };
    let started = match workload::spawn(&resolved, &identity, start.workload.interactive) {
        Ok(s) => s,
        Err(e) => {
            let msg = format!("cannot run {}: {e}", resolved.argv[0]);
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                NOT_FOUND
            } else {
                NOT_EXECUTABLE
            };
            return not_runnable(conn, &msg, code);
        }
    };
    let pid = started.pid;
    send(conn, &Frame::Control(Message::Started { pid: pid as u32 }));

    let pumps = [
        pump(started.stdout, conn.clone(), Frame::Stdout),
        pump(started.stderr, conn.clone(), Frame::Stderr),
    ];
    listen_to_host(conn, Some(pid), started.stdin, host);
    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(Mutex::new(0u64));
    report_usage(
        conn.clone(),
        done.clone(),
        peak.clone(),
        start.usage_interval,
    );

    // Blocks (no polling: wake-ups are costly where the guest kernel is
    // emulated), reaping every other child that exits meanwhile.
    let status = reaper::reap_until(pid);
    done.store(true, Ordering::Release);
    // Output written just before exit must arrive before the exit status;
    // a daemonised grandchild holding the pipes must not block us forever.
    let deadline = Instant::now() + Duration::from_secs(2);
    for p in pumps {
        while !p.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let final_usage = {
        let mut peak = peak.lock().unwrap_or_else(|p| p.into_inner());
        usage::sample(&mut peak, "exited")
    };
    send(conn, &Frame::Control(Message::Usage(final_usage.clone())));
    send(
        conn,
        &Frame::Control(Message::Exited {
            status,
            usage: final_usage,
        }),
    );
    status
}

/// Reports a workload that could not start the way a shell would.
fn not_runnable(conn: &Conn, message: &str, code: i32) -> ExitStatus {
    console(message);
    send(
        conn,
        &Frame::Control(Message::NotStarted {
            message: message.to_string(),
        }),
    );
    let mut peak = 0;
    let status = ExitStatus::Code(code);
    send(
        conn,
        &Frame::Control(Message::Exited {
            status,
            usage: usage::sample(&mut peak, "exited"),
        }),
    );
    status
}

/// Copies a pipe into frames (or to the console without a host).
fn pump(
    mut from: impl std::io::Read + Send + 'static,
    conn: Conn,
    wrap: fn(Vec<u8>) -> Frame,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let has_host = conn.lock().map(|g| g.is_some()).unwrap_or(false);
                    if has_host {
                        send(&conn, &wrap(buf[..n].to_vec()));
                    } else {
                        let _ = std::io::stderr().write_all(&buf[..n]);
                    }
                }
            }
        }
    })
}

/// Applies the host's stdin, signal and shutdown requests.
/// `host.shutdown` is raised on the host's shutdown request (it also ends a
/// VM kept up after its workload). `pid` is the workload, if one started.
fn listen_to_host(
    conn: &Conn,
    pid: Option<i32>,
    mut stdin: Option<std::process::ChildStdin>,
    host: Arc<HostRequests>,
) {
    let reader = reader_of(conn);
    let Some(mut reader) = reader else {
        return;
    };
    host.listening.store(true, Ordering::Release);
    let conn = conn.clone();
    let signal = move |sig| {
        if let Some(pid) = pid {
            workload::signal_group(pid, sig);
        }
    };
    std::thread::spawn(move || loop {
        match read_frame(&mut reader) {
            Ok(Some(Ok(frame))) => match frame {
                Frame::Stdin(data) => {
                    if let Some(s) = stdin.as_mut() {
                        if s.write_all(&data).is_err() {
                            stdin = None;
                        }
                    }
                }
                Frame::StdinEof => stdin = None,
                Frame::Control(Message::Signal { signal: sig }) => signal(sig),
                Frame::Control(Message::Shutdown { grace_ms }) => {
                    host.shutdown.store(true, Ordering::Release);
                    signal(libc::SIGTERM);
                    std::thread::spawn(move || {
                        std::thread::sleep(Duration::from_millis(grace_ms));
                        signal(libc::SIGKILL);
                    });
                }
                _ => send(&conn, &error("unexpected message while the workload runs")),
            },
            Ok(Some(Err(e))) => send(&conn, &error(&e.to_string())),
            Ok(None) | Err(_) => return,
        }
    });
}

fn report_usage(conn: Conn, done: Arc<AtomicBool>, peak: Arc<Mutex<u64>>, every: Duration) {
    std::thread::spawn(move || {
        while !done.load(Ordering::Acquire) {
            let sample = {
                let mut peak = peak.lock().unwrap_or_else(|p| p.into_inner());
                usage::sample(&mut peak, "running")
            };
            if done.load(Ordering::Acquire) {
                return;
            }
            send(&conn, &Frame::Control(Message::Usage(sample)));
            std::thread::sleep(every);
        }
    });
}
