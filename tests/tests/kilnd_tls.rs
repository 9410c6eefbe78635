//! kilnd's API over TLS: the real kilnd binary with a certificate from a
//! CA made for the test (openssl CLI), and the `kiln` command line trusting
//! that CA; named tokens, whose names the grant's events record. No VM
//! boots: the grant's image is in no registry, so provisioning fails.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use kiln_bridge::store::{Store, BY_TOKEN_EVENT};
use kiln_tests::{bin, wait_for};

const CI_TOKEN: &str = "ci-token-0123456789";
const OPERATOR_TOKEN: &str = "operator-token-0123456789";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {out:?}");
}

/// `ca.pem`, and `server.pem` + `server.key` for 127.0.0.1 signed by it.
fn make_certificates(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=kiln test CA",
    ]);
    openssl(dir, &ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ],
    );
}

fn kiln(url: &str, token: &str, ca: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin("kiln"));
    cmd.args(args)
        .env("KILN_BRIDGE_URL", url)
        .env("KILN_BRIDGE_TOKEN", token)
        .env_remove("KILN_BRIDGE_CA")
        .stdin(Stdio::null());
    if let Some(ca) = ca {
        cmd.env("KILN_BRIDGE_CA", ca);
    }
    cmd.output().expect("run kiln")
}

#[test]
fn kiln_talks_https_to_kilnd_with_the_configured_ca_and_events_name_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_certificates(d);
    std::fs::write(d.join("operator.token"), format!("{OPERATOR_TOKEN}\n")).unwrap();
    std::fs::write(d.join("ci.token"), CI_TOKEN).unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = d.join("kilnd.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\nstate_dir = \"{d}/state\"\n\
             auth_token_file = \"{d}/operator.token\"\nregion = \"home\"\n\
             [[token]]\nname = \"ci\"\ntoken_file = \"{d}/ci.token\"\n\
             [tls]\ncert = \"{d}/server.pem\"\nkey = \"{d}/server.key\"\n\
             [[backend]]\nkind = \"local\"\nvcpus = 1\nram_mib = 512\nkiln_home = \"{d}/home\"\n",
            d = d.display()
        ),
    )
    .unwrap();
    // The image build looks for the agent before it fetches anything.
    std::fs::create_dir_all(d.join("home/bin")).unwrap();
    std::fs::write(d.join("home/bin/kiln-agent"), "").unwrap();
    let log = std::fs::File::create(d.join("kilnd.log")).unwrap();
    let mut kilnd = Command::new(bin("kilnd"))
        .arg("--config")
        .arg(&config)
        .env("KILN_SHIM", bin("kiln-shim"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn kilnd");
    let https = format!("https://127.0.0.1:{port}");
    let ca = d.join("ca.pem");
    let result = std::panic::catch_unwind(|| {
        let listed = wait_for(Duration::from_secs(30), || {
            let out = kiln(
                &https,
                CI_TOKEN,
                None,
                &["grant", "list", "--ca", ca.to_str()?],
            );
            out.status.success().then_some(out)
        })
        .unwrap_or_else(|| {
            panic!(
                "kiln grant list over https never worked; kilnd log:\n{}",
                std::fs::read_to_string(d.join("kilnd.log")).unwrap_or_default()
            )
        });
        assert!(listed.stderr.is_empty(), "{listed:?}");

        // The CA from the environment works as well as --ca.
        let out = kiln(&https, CI_TOKEN, Some(&ca), &["grant", "list", "--json"]);
        assert!(out.status.success(), "{out:?}");
        // Without the CA, kilnd's certificate is not trusted: refused, in one line.
        let out = kiln(&https, CI_TOKEN, None, &["grant", "list"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{out:?}");
        assert_eq!(err.lines().count(), 1, "{err}");
        // Plain HTTP to the TLS port gets no answer a client could use.
        let out = kiln(
            &format!("http://127.0.0.1:{port}"),
            CI_TOKEN,
            None,
            &["grant", "list"],
        );
        assert!(!out.status.success(), "{out:?}");
        // A wrong token is refused over TLS as over HTTP.
        let out = kiln(&https, "wrong", Some(&ca), &["grant", "list"]);
        assert!(!out.status.success(), "{out:?}");

        // The ci token submits, the operator's terminates: events say so.
        let key = d.join("id.pub");
        std::fs::write(
            &key,
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICYZWTaQeBZlanOWStbbTRqPk9TgC0LC/UyC2dMm+FFc t@kiln\n",
        )
        .unwrap();
        // A "registry" that accepts connections and never answers keeps
        // the grant provisioning until it is terminated.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let image = format!(
            "{}/nowhere@sha256:{}",
            silent.local_addr().unwrap(),
            "a".repeat(64)
        );
        let out = kiln(
            &https,
            CI_TOKEN,
            Some(&ca),
            &[
                "grant",
                "submit",
                &image,
                "--region",
                "home",
                "--vcpus",
                "1",
                "--ram-mib",
                "256",
                "--ssh-key",
                key.to_str().unwrap(),
                "--valid-for",
                "1h",
                "--id",
                "by-ci",
            ],
        );
        assert!(out.status.success(), "{out:?}");
        let out = kiln(
            &https,
            OPERATOR_TOKEN,
            Some(&ca),
            &["grant", "terminate", "by-ci"],
        );
        assert!(out.status.success(), "{out:?}");
        drop(silent);
    });
    let _ = kilnd.kill();
    let _ = kilnd.wait();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    let store = Store::open(&d.join("state")).unwrap();
    let by: Vec<String> = store
        .events("by-ci")
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == BY_TOKEN_EVENT)
        .filter_map(|e| e.detail)
        .collect();
    assert_eq!(by, ["ci", "default"]);
}
