//! Bearer-token auth against a real registry: a small gatekeeper on
//! 127.0.0.1 demands a token (issued for the right basic credentials,
//! service and scope) before passing requests to docker-registry.

mod common;

use base64::Engine as _;
use common::tools::{umoci_image, Registry};
use common::AGENT;
use kiln_image::build::{build, BuildError, Input, Options};
use kiln_image::cache::Cache;
use kiln_image::compress::Compression;
use kiln_image::registry::client::RegistryError;
use kiln_image::source::SourceError;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

const TOKEN: &str = "kiln-test-token";

struct Gate {
    addr: String,
    tokens_issued: Arc<AtomicUsize>,
}

fn respond(s: &mut TcpStream, status: &str, headers: &str, body: &str) {
    let _ = write!(
        s,
        "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn serve(mut s: TcpStream, me: &str, upstream: &str, basic: &str, issued: &AtomicUsize) {
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    if r.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
            break;
        }
        headers.push(h.trim_end().to_string());
    }
    let header = |name: &str| {
        headers.iter().find_map(|h| {
            let (k, v) = h.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    };
    if let Some(query) = path.strip_prefix("/token?") {
        let good = header("authorization").as_deref() == Some(basic)
            && query.contains("service=kiln-test")
            && query.contains("scope=repository%3Atest%2Fimg%3Apull");
        if good {
            issued.fetch_add(1, Ordering::SeqCst);
            respond(
                &mut s,
                "200 OK",
                "Content-Type: application/json\r\n",
                &format!("{{\"token\":\"{TOKEN}\"}}"),
            );
        } else {
            respond(&mut s, "401 Unauthorized", "", "");
        }
        return;
    }
    if header("authorization").as_deref() != Some(&format!("Bearer {TOKEN}")) {
        let challenge = format!(
            "WWW-Authenticate: Bearer realm=\"http://{me}/token\",service=\"kiln-test\",scope=\"repository:test/img:pull\"\r\n"
        );
        respond(&mut s, "401 Unauthorized", &challenge, "");
        return;
    }
    let mut up = TcpStream::connect(upstream).unwrap();
    let accept = header("accept")
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(
        up,
        "GET {path} HTTP/1.0\r\nHost: {upstream}\r\n{accept}\r\n"
    )
    .unwrap();
    let mut resp = Vec::new();
    up.read_to_end(&mut resp).unwrap();
    let _ = s.write_all(&resp);
}

impl Gate {
    fn start(upstream: String, user: &str, pass: &str) -> Gate {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        );
        let issued = Arc::new(AtomicUsize::new(0));
        let (me, count) = (addr.clone(), issued.clone());
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let (me, up, basic, count) =
                    (me.clone(), upstream.clone(), basic.clone(), count.clone());
                std::thread::spawn(move || serve(s, &me, &up, &basic, &count));
            }
        });
        Gate {
            addr,
            tokens_issued: issued,
        }
    }
}

fn docker_config(
    dir: &std::path::Path,
    registry: &str,
    user: &str,
    pass: &str,
) -> std::path::PathBuf {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    let p = dir.join(format!("config-{user}.json"));
    std::fs::write(
        &p,
        format!(r#"{{"auths":{{"{registry}":{{"auth":"{auth}"}}}}}}"#),
    )
    .unwrap();
    p
}

#[test]
fn bearer_token_auth_with_docker_config_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let layout = umoci_image(dir.path());
    let registry = Registry::start();
    registry.push(&layout, "t", "test/img", "");
    let gate = Gate::start(registry.addr.clone(), "alice", "s3cret:x");
    let agent = dir.path().join("agent");
    std::fs::write(&agent, AGENT).unwrap();
    let opts = |user: &str, pass: &str| Options {
        input: Input::Registry(format!("{}/test/img:t", gate.addr)),
        agent: agent.clone(),
        compression: Compression::None,
        max_expanded: 1 << 30,
        insecure: Vec::new(),
        docker_config: Some(docker_config(dir.path(), &gate.addr, user, pass)),
        refresh: false,
        output: None,
        root: Some(kiln_image::root::RootKind::Initramfs),
    };
    let cache = Cache::open(&dir.path().join("home")).unwrap();
    let built = build(&cache, &opts("alice", "s3cret:x"), &mut |_| {}).unwrap();
    assert!(!built.cached);
    assert!(gate.tokens_issued.load(Ordering::SeqCst) >= 1);

    let other = Cache::open(&dir.path().join("other")).unwrap();
    let err = build(&other, &opts("alice", "wrong"), &mut |_| {}).unwrap_err();
    assert!(
        matches!(
            err,
            BuildError::Source(SourceError::Registry(RegistryError::Unauthorized {
                status: 401,
                ..
            }))
        ),
        "{err:?}"
    );
}
