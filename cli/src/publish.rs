//! `kiln run -p`: published ports, as `docker run -p` writes them
//! (`[IP:]HOSTPORT:GUESTPORT[/tcp]`), forwarded from a host TCP listener to
//! a TCP port on the guest's loopback over vsock (the VM has no network
//! device). The address defaults to 127.0.0.1, not docker's 0.0.0.0: a
//! guest's service is then reachable from other hosts only when the flag
//! says so.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

use kiln_protocol::forward::{Bound, ForwardError, Forwarder, Target};
use serde::Serialize;

/// The host address of a spec that names none.
pub const DEFAULT_IP: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// One `-p` flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortSpec {
    pub ip: IpAddr,
    pub host_port: u16,
    pub guest_port: u16,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("expected [IP:]HOSTPORT:GUESTPORT[/tcp]")]
    Shape,
    #[error("only TCP ports can be published, not {0:?}")]
    Protocol(String),
    #[error("{0:?} is not an IP address")]
    Ip(String),
    #[error("{0:?} is not a port (1-65535)")]
    Port(String),
    #[error("host port {0} is published twice")]
    Duplicate(SocketAddr),
}

impl FromStr for PortSpec {
    type Err = SpecError;

    fn from_str(spec: &str) -> Result<PortSpec, SpecError> {
        let (addr, protocol) = match spec.rsplit_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (spec, None),
        };
        match protocol {
            None | Some("tcp") => {}
            Some(p) => return Err(SpecError::Protocol(p.to_string())),
        }
        // An IPv6 address is bracketed, as docker writes it: [::1]:8080:80.
        let (ip, ports) = if let Some(rest) = addr.strip_prefix('[') {
            let (ip, ports) = rest.split_once(']').ok_or(SpecError::Shape)?;
            (Some(ip), ports.strip_prefix(':').ok_or(SpecError::Shape)?)
        } else {
            match addr.matches(':').count() {
                1 => (None, addr),
                2 => addr
                    .split_once(':')
                    .map(|(ip, ports)| (Some(ip), ports))
                    .ok_or(SpecError::Shape)?,
                _ => return Err(SpecError::Shape),
            }
        };
        let (host, guest) = ports.split_once(':').ok_or(SpecError::Shape)?;
        let ip = match ip {
            None => DEFAULT_IP,
            Some(ip) => ip.parse().map_err(|_| SpecError::Ip(ip.to_string()))?,
        };
        Ok(PortSpec {
            ip,
            host_port: port(host)?,
            guest_port: port(guest)?,
        })
    }
}

/// A port number 1-65535, digits only.
fn port(text: &str) -> Result<u16, SpecError> {
    let bad = || SpecError::Port(text.to_string());
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match text.parse::<u16>() {
        Ok(0) | Err(_) => Err(bad()),
        Ok(p) => Ok(p),
    }
}

impl PortSpec {
    /// The host address to listen on.
    pub fn host_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.host_port)
    }
}

/// Clap's parser for `-p`.
pub fn parse_spec(s: &str) -> Result<PortSpec, String> {
    s.parse().map_err(|e: SpecError| e.to_string())
}

/// Refuses two specs that would listen on the same host port (an
/// unspecified address, 0.0.0.0 or ::, covers every address).
pub fn check_unique(specs: &[PortSpec]) -> Result<(), SpecError> {
    for (i, a) in specs.iter().enumerate() {
        for b in &specs[..i] {
            let overlap = a.ip == b.ip || a.ip.is_unspecified() || b.ip.is_unspecified();
            if a.host_port == b.host_port && overlap {
                return Err(SpecError::Duplicate(a.host_addr()));
            }
        }
    }
    Ok(())
}

/// A published port as `kiln run --json` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Published {
    /// The host address listened on (`127.0.0.1:8080`, `[::1]:8080`).
    pub host: String,
    pub guest_port: u16,
    pub protocol: &'static str,
}

/// Host listeners bound before the VM starts, so a taken port fails the
/// run at once.
pub struct Listeners(Vec<(PortSpec, Bound)>);

impl Listeners {
    pub fn bind(specs: &[PortSpec]) -> Result<Listeners, ForwardError> {
        specs
            .iter()
            .map(|s| Ok((*s, Forwarder::bind(s.host_addr())?)))
            .collect::<Result<_, _>>()
            .map(Listeners)
    }

    /// The guest ports, each once, for the agent.
    pub fn guest_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self.0.iter().map(|(s, _)| s.guest_port).collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    pub fn published(&self) -> Vec<Published> {
        self.0
            .iter()
            .map(|(s, b)| Published {
                host: b.local_addr().to_string(),
                guest_port: s.guest_port,
                protocol: "tcp",
            })
            .collect()
    }

    /// Starts forwarding through the VM socket `uds`; the forwarders stop
    /// listening when dropped.
    pub fn serve(self, uds: &std::path::Path) -> Result<Vec<Forwarder>, ForwardError> {
        self.0
            .into_iter()
            .map(|(s, bound)| {
                bound.serve(uds, Target::Tcp(s.guest_port), |e| {
                    tracing::info!("published port: {e}")
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(ip: &str, host_port: u16, guest_port: u16) -> PortSpec {
        PortSpec {
            ip: ip.parse().unwrap(),
            host_port,
            guest_port,
        }
    }

    #[test]
    fn good_specs() {
        for (text, want) in [
            ("8080:80", spec("127.0.0.1", 8080, 80)),
            ("8080:80/tcp", spec("127.0.0.1", 8080, 80)),
            ("1:65535", spec("127.0.0.1", 1, 65535)),
            ("0.0.0.0:8080:80", spec("0.0.0.0", 8080, 80)),
            ("127.0.0.2:8080:8000/tcp", spec("127.0.0.2", 8080, 8000)),
            ("[::1]:8080:80", spec("::1", 8080, 80)),
            ("[::]:443:8443/tcp", spec("::", 443, 8443)),
        ] {
            assert_eq!(text.parse::<PortSpec>(), Ok(want), "{text}");
        }
        assert_eq!(spec("::1", 8080, 80).host_addr().to_string(), "[::1]:8080");
    }

    #[test]
    fn bad_specs() {
        for (text, want) in [
            (
                "8080:80/udp",
                "only TCP ports can be published, not \"udp\"",
            ),
            (
                "8080:80/sctp",
                "only TCP ports can be published, not \"sctp\"",
            ),
            ("8080:80/", "only TCP ports can be published, not \"\""),
            ("0:80", "\"0\" is not a port (1-65535)"),
            ("8080:0", "\"0\" is not a port (1-65535)"),
            ("65536:80", "\"65536\" is not a port (1-65535)"),
            (
                "8080:99999999999",
                "\"99999999999\" is not a port (1-65535)",
            ),
            ("+80:80", "\"+80\" is not a port (1-65535)"),
            ("8080:", "\"\" is not a port (1-65535)"),
            (":80", "\"\" is not a port (1-65535)"),
            ("80", "expected [IP:]HOSTPORT:GUESTPORT[/tcp]"),
            ("", "expected [IP:]HOSTPORT:GUESTPORT[/tcp]"),
            ("a:b:c:d", "expected [IP:]HOSTPORT:GUESTPORT[/tcp]"),
            ("8000-8010:80", "\"8000-8010\" is not a port (1-65535)"),
            ("300.0.0.1:8080:80", "\"300.0.0.1\" is not an IP address"),
            ("localhost:8080:80", "\"localhost\" is not an IP address"),
            (":8080:80", "\"\" is not an IP address"),
            ("::1:8080:80", "expected [IP:]HOSTPORT:GUESTPORT[/tcp]"),
            ("[::1:8080:80", "expected [IP:]HOSTPORT:GUESTPORT[/tcp]"),
            ("[::1]8080:80", "expected [IP:]HOSTPORT:GUESTPORT[/tcp]"),
            ("[nope]:8080:80", "\"nope\" is not an IP address"),
            ("8080:80\n", "\"80\\n\" is not a port (1-65535)"),
        ] {
            let got = text.parse::<PortSpec>().unwrap_err().to_string();
            assert_eq!(got, want, "{text:?}");
            assert!(!got.contains('\n'), "{got}");
        }
    }

    #[test]
    fn the_same_host_port_twice_is_refused() {
        let ok = [
            spec("127.0.0.1", 8080, 80),
            spec("127.0.0.1", 8081, 80),
            spec("127.0.0.2", 8080, 80),
        ];
        assert_eq!(check_unique(&ok), Ok(()));
        for twice in [
            [spec("127.0.0.1", 8080, 80), spec("127.0.0.1", 8080, 81)],
            [spec("127.0.0.1", 8080, 80), spec("0.0.0.0", 8080, 80)],
            [spec("::", 8080, 80), spec("127.0.0.1", 8080, 81)],
        ] {
            let e = check_unique(&twice).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("host port {} is published twice", twice[1].host_addr())
            );
        }
    }

    #[test]
    fn a_taken_port_fails_the_bind_naming_the_address() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let e = match Listeners::bind(&[spec("127.0.0.1", port, 80)]) {
            Err(e) => e,
            Ok(_) => panic!("bound a taken port"),
        };
        assert_eq!(e.to_string(), format!("cannot listen on 127.0.0.1:{port}"));
    }

    #[test]
    fn listeners_report_what_they_publish() {
        let [a, b, c] = free_ports();
        let l = Listeners::bind(&[
            spec("127.0.0.1", a, 8000),
            spec("127.0.0.1", b, 8000),
            spec("127.0.0.1", c, 22),
        ])
        .unwrap();
        assert_eq!(l.guest_ports(), [22, 8000]);
        let published = l.published();
        assert_eq!(published.len(), 3);
        assert_eq!(published[2].guest_port, 22);
        assert!(published[0].host.starts_with("127.0.0.1:"));
        assert_eq!(
            serde_json::to_value(&published[2]).unwrap()["protocol"],
            "tcp"
        );
    }

    /// N distinct free ports: held open together while they are picked
    /// (one after another, the kernel may hand out the same port again).
    fn free_ports<const N: usize>() -> [u16; N] {
        let held: Vec<_> = (0..N)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        std::array::from_fn(|i| held[i].local_addr().unwrap().port())
    }
}
