//! The eBPF datapath on real veths (root): two instance namespaces wired
//! to a node namespace exactly as the agent wires them, the classifiers
//! attached to the node side, real TCP and UDP between them. Skipped
//! without root unless `SKIFF_E2E=require`, where it fails instead.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::time::Duration;

use skiff_netpol::datapath::Datapath;
use skiff_netpol::maps::*;

fn can_run() -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    if root {
        return true;
    }
    assert!(
        std::env::var("SKIFF_E2E").as_deref() != Ok("require"),
        "SKIFF_E2E=require but not root: the datapath test needs root"
    );
    eprintln!("SKIPPED: the datapath test needs root");
    false
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ip: {e}"));
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `f` on a thread inside network namespace `ns`.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns: {e}"));
        f()
    })
    .join()
    .unwrap_or_else(|_| panic!("thread in {ns} panicked"))
}

fn ifindex(ns: &str, name: &str) -> u32 {
    // sysfs shows the host's namespace; ask ip: "7: va@if2: <...".
    let out = Command::new("ip")
        .args(["-n", ns, "-o", "link", "show", name])
        .output()
        .unwrap_or_else(|e| panic!("ip: {e}"));
    String::from_utf8_lossy(&out.stdout)
        .split(':')
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no interface {name} in {ns}"))
}

/// A node namespace with two instances, A and B, as the agent wires them.
struct Lab {
    node: String,
    a: String,
    b: String,
    pin: std::path::PathBuf,
    a_if: u32,
    b_if: u32,
}

const A: Ipv4Addr = Ipv4Addr::new(198, 18, 250, 2);
const B: Ipv4Addr = Ipv4Addr::new(198, 18, 250, 3);
const GW: Ipv4Addr = Ipv4Addr::new(198, 18, 250, 1);
const ID_A: u32 = 300;
const ID_B: u32 = 301;

impl Lab {
    fn new() -> Lab {
        let sfx = format!(
            "{:x}",
            std::process::id()
                ^ std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos())
                    .unwrap_or(0)
        );
        let sfx = &sfx[sfx.len().saturating_sub(6)..];
        let (node, a, b) = (
            format!("dpn-{sfx}"),
            format!("dpa-{sfx}"),
            format!("dpb-{sfx}"),
        );
        let mut lab = Lab {
            node: node.clone(),
            a: a.clone(),
            b: b.clone(),
            pin: format!("/sys/fs/bpf/skiff-test-{sfx}").into(),
            a_if: 0,
            b_if: 0,
        };
        ip(&["netns", "add", &node]);
        in_netns(&node, || {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap_or_else(|e| panic!("{e}"))
        });
        for (pod, host, addr) in [(&a, "va", A), (&b, "vb", B)] {
            ip(&["netns", "add", pod]);
            ip(&[
                "-n", &node, "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns",
                pod,
            ]);
            ip(&["-n", &node, "addr", "add", &format!("{GW}/32"), "dev", host]);
            ip(&["-n", &node, "link", "set", host, "up"]);
            ip(&[
                "-n",
                &node,
                "route",
                "add",
                &format!("{addr}/32"),
                "dev",
                host,
            ]);
            ip(&["-n", pod, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                pod,
                "addr",
                "add",
                &format!("{addr}/32"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", pod, "link", "set", "eth0", "up"]);
            ip(&[
                "-n",
                pod,
                "route",
                "add",
                &GW.to_string(),
                "dev",
                "eth0",
                "scope",
                "link",
            ]);
            ip(&[
                "-n",
                pod,
                "route",
                "add",
                "default",
                "via",
                &GW.to_string(),
                "dev",
                "eth0",
            ]);
        }
        lab.a_if = ifindex(&node, "va");
        lab.b_if = ifindex(&node, "vb");
        lab
    }

    /// Loads the datapath and attaches it to both host-side veths.
    fn datapath(&self) -> Datapath {
        let pin = self.pin.clone();
        in_netns(&self.node, move || {
            let mut dp = Datapath::load(&pin).unwrap_or_else(|e| panic!("{e}"));
            dp.attach("va").unwrap_or_else(|e| panic!("{e}"));
            dp.attach("vb").unwrap_or_else(|e| panic!("{e}"));
            dp
        })
    }

    /// A TCP server in B answering "ok" on `port`; returns once it listens.
    fn serve_tcp(&self, port: u16) {
        let l = in_netns(&self.b, move || {
            TcpListener::bind((B, port)).unwrap_or_else(|e| panic!("{e}"))
        });
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                // Answer, then keep the connection open until the client ends it.
                std::thread::spawn(move || {
                    let _ = s.write_all(b"ok");
                    let mut sink = [0u8; 64];
                    while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
                });
            }
        });
    }

    /// Whether A can connect to B:port and read the answer.
    fn tcp_from_a(&self, port: u16) -> bool {
        in_netns(&self.a, move || {
            let Ok(mut s) = TcpStream::connect_timeout(
                &SocketAddr::from((B, port)),
                Duration::from_millis(700),
            ) else {
                return false;
            };
            let _ = s.set_read_timeout(Some(Duration::from_millis(700)));
            let mut buf = [0u8; 2];
            s.read_exact(&mut buf).is_ok() && &buf == b"ok"
        })
    }

    /// A UDP echo in B on `port`.
    fn serve_udp(&self, port: u16) {
        let server = in_netns(&self.b, move || {
            UdpSocket::bind((B, port)).unwrap_or_else(|e| panic!("{e}"))
        });
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = server.recv_from(&mut buf) {
                let _ = server.send_to(&buf[..n], from);
            }
        });
    }

    /// Whether A gets its datagram to B:port echoed back.
    fn udp_from_a(&self, port: u16) -> bool {
        in_netns(&self.a, move || {
            let s = UdpSocket::bind((A, 0)).unwrap_or_else(|e| panic!("{e}"));
            let _ = s.set_read_timeout(Some(Duration::from_millis(700)));
            let _ = s.send_to(b"ping", (B, port));
            let mut buf = [0u8; 8];
            matches!(s.recv_from(&mut buf), Ok((4, _)))
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b, &self.node] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        skiff_netpol::datapath::unpin(&self.pin);
    }
}

/// Polls `f` every 10 ms for up to 5 s.
fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn allow(dp: &mut Datapath, ifindex: u32, peer: u32, port: u16, proto: u8, dir: Dir) {
    dp.set_policy(
        PolicyKey {
            ifindex,
            peer,
            port,
            proto,
            dir,
        },
        PolicyValue {
            audit: false,
            rule: 7,
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn enforcement_on_real_veths() {
    if !can_run() {
        return;
    }
    let lab = Lab::new();
    lab.serve_tcp(8080);
    lab.serve_tcp(8081);
    lab.serve_udp(8080);
    let mut dp = lab.datapath();

    // Attached, no endpoint entries: everything IPv4 is dropped (fail closed).
    assert!(
        !lab.tcp_from_a(8080),
        "an interface without an endpoint drops"
    );

    // Endpoints isolated in neither direction: open.
    dp.set_ipcache(A, 32, ID_A)
        .unwrap_or_else(|e| panic!("{e}"));
    dp.set_ipcache(B, 32, ID_B)
        .unwrap_or_else(|e| panic!("{e}"));
    dp.set_ipcache(GW, 32, SKIFF_ID_HOST)
        .unwrap_or_else(|e| panic!("{e}"));
    dp.set_endpoint(
        lab.a_if,
        Endpoint {
            identity: ID_A,
            flags: 0,
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    dp.set_endpoint(
        lab.b_if,
        Endpoint {
            identity: ID_B,
            flags: 0,
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(lab.tcp_from_a(8080), "not isolated: open");

    // B isolated for ingress: denied until a rule allows A on 8080/tcp.
    dp.set_endpoint(
        lab.b_if,
        Endpoint {
            identity: ID_B,
            flags: SKIFF_EP_INGRESS_ENFORCE,
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    dp.bump_epoch().unwrap_or_else(|e| panic!("{e}"));
    assert!(!lab.tcp_from_a(8080), "isolated, no rule: denied");
    allow(&mut dp, lab.b_if, ID_A, 8080, 6, Dir::Ingress);
    assert!(lab.tcp_from_a(8080), "the rule allows A on 8080");
    assert!(!lab.tcp_from_a(8081), "…and nothing else");
    assert!(!lab.udp_from_a(8080), "a TCP rule does not let UDP in");
    allow(&mut dp, lab.b_if, ID_A, 8080, 17, Dir::Ingress);
    assert!(
        lab.udp_from_a(8080),
        "a UDP rule does, and the reply comes back through conntrack"
    );

    // Wildcards: any port from A; then any peer on 8081.
    allow(&mut dp, lab.b_if, ID_A, 0, 6, Dir::Ingress);
    assert!(lab.tcp_from_a(8081), "any-port rule");
    dp.remove_policy(PolicyKey {
        ifindex: lab.b_if,
        peer: ID_A,
        port: 0,
        proto: 6,
        dir: Dir::Ingress,
    })
    .unwrap_or_else(|e| panic!("{e}"));
    dp.bump_epoch().unwrap_or_else(|e| panic!("{e}"));
    assert!(!lab.tcp_from_a(8081), "removed: denied again");

    // A isolated for egress too: its own rule is needed, and replies to
    // the allowed connection still come back.
    dp.set_endpoint(
        lab.a_if,
        Endpoint {
            identity: ID_A,
            flags: SKIFF_EP_EGRESS_ENFORCE,
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    dp.bump_epoch().unwrap_or_else(|e| panic!("{e}"));
    assert!(!lab.tcp_from_a(8080), "A's egress is isolated now");
    allow(&mut dp, lab.a_if, ID_B, 8080, 6, Dir::Egress);
    assert!(lab.tcp_from_a(8080), "both sides allow");

    // An established connection is cut when its rule goes (epoch bump),
    // and passes again when the rule returns.
    let mut conn = in_netns(&lab.a, || {
        TcpStream::connect_timeout(&SocketAddr::from((B, 8080)), Duration::from_millis(700))
            .unwrap_or_else(|e| panic!("{e}"))
    });
    conn.set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut buf = [0u8; 2];
    conn.read_exact(&mut buf).unwrap_or_else(|e| panic!("{e}"));
    let established = dp.stats().established;
    conn.write_all(b"x").unwrap_or_else(|e| panic!("{e}"));
    wait_for(
        "the open connection's packet to pass as established",
        || dp.stats().established > established,
    );
    dp.remove_policy(PolicyKey {
        ifindex: lab.a_if,
        peer: ID_B,
        port: 8080,
        proto: 6,
        dir: Dir::Egress,
    })
    .unwrap_or_else(|e| panic!("{e}"));
    dp.bump_epoch().unwrap_or_else(|e| panic!("{e}"));
    let denied = dp.stats().denied;
    conn.write_all(b"y").unwrap_or_else(|e| panic!("{e}"));
    wait_for("the open connection's next packet to be dropped", || {
        dp.stats().denied > denied
    });
    allow(&mut dp, lab.a_if, ID_B, 8080, 6, Dir::Egress);

    // Denials are reported with both identities.
    let mut events = dp.take_events().unwrap_or_else(|| panic!("no ring buffer"));
    let mut denied = Vec::new();
    while let Some(item) = events.next() {
        if let Some(e) = Event::parse(&item) {
            denied.push(e);
        }
    }
    assert!(
        denied.iter().any(|e| e.denied
            && e.src == A
            && e.dst == B
            && e.dport == 8081
            && e.src_identity == ID_A
            && e.dst_identity == ID_B
            && e.dir == Some(Dir::Ingress)),
        "{denied:?}"
    );
    let stats = dp.stats();
    assert!(
        stats.denied > 0 && stats.allowed > 0 && stats.established > 0,
        "{stats:?}"
    );

    // Enforcement outlives the loader: drop it, the filters and pinned maps stay.
    drop(dp);
    assert!(!lab.tcp_from_a(8081), "still enforced with no loader");
    assert!(lab.tcp_from_a(8080), "still allowed with no loader");
    // A new loader finds the same maps.
    let dp = lab.datapath();
    assert_eq!(dp.endpoints().len(), 2);
    assert!(dp.policy().contains_key(&PolicyKey {
        ifindex: lab.b_if,
        peer: ID_A,
        port: 8080,
        proto: 6,
        dir: Dir::Ingress
    }));
}
