//! The scale-out recipe of docs/distributed.md, as written there: two `exsa serve` processes
//! behind HAProxy (`cargo xtask setup` installs it), balanced by fewest requests in flight and
//! health-checked on `/health`. Requests through the balancer reach both servers; when one
//! stops, the balancer takes it out and every request still succeeds.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Server, client};
use serde_json::json;

mod common;

/// The backend section of the recipe, for two servers.
fn config(frontend: u16, a: &str, b: &str) -> String {
    format!(
        "defaults
    mode http
    timeout connect 5s
    timeout client 10m
    timeout server 10m
    retries 3
    option redispatch
frontend llm
    bind 127.0.0.1:{frontend}
    default_backend exsa
backend exsa
    balance leastconn
    option httpchk GET /health
    http-check expect status 200
    server a {a} check inter 1s fall 2 rise 1
    server b {b} check inter 1s fall 2 rise 1
"
    )
}

fn haproxy() -> PathBuf {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join("haproxy"))
        .find(|p| p.is_file());
    found.expect("haproxy is missing: `cargo xtask setup` installs it (apt-get install haproxy, brew install haproxy)")
}

struct Balancer(Child);

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn two_servers_behind_haproxy_share_the_load_and_survive_one_stopping() {
    let a = Server::start(&["--parallel", "2"]);
    let mut b = Server::start(&["--parallel", "2"]);
    let host = |s: &Server| s.base.trim_start_matches("http://").to_string();
    let frontend = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("balancer");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join(format!("haproxy-{frontend}.cfg"));
    std::fs::write(&cfg, config(frontend, &host(&a), &host(&b))).unwrap();
    // -db: stay in the foreground, as a child of this test.
    let _balancer = Balancer(Command::new(haproxy()).arg("-db").arg("-f").arg(&cfg).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
    let url = format!("http://127.0.0.1:{frontend}");
    let http = client();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let healthy =
            TcpStream::connect(("127.0.0.1", frontend)).is_ok() && http.get(format!("{url}/health")).send().is_ok_and(|r| r.status().as_u16() == 200);
        if healthy {
            break;
        }
        assert!(Instant::now() < deadline, "haproxy did not come up on {url}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Both servers' first health checks pass (`rise 1`, every second).
    std::thread::sleep(Duration::from_millis(1500));
    let chat = || {
        let body = json!({ "messages": [{ "role": "user", "content": "Say hello." }], "max_tokens": 8, "temperature": 0 });
        client().post(format!("{url}/v1/chat/completions")).json(&body).send().map(|r| r.status().as_u16())
    };
    let statuses: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8).map(|_| s.spawn(chat)).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(statuses.iter().all(|s| matches!(s, Ok(200))), "{statuses:?}");
    let ok = "exsa_requests_total{status=\"ok\"}";
    let (served_a, served_b) = (a.metric(ok), b.metric(ok));
    assert_eq!(served_a + served_b, 8.0);
    assert!(served_a > 0.0 && served_b > 0.0, "leastconn sent {served_a} and {served_b}");

    // One server stops: its connections fail, HAProxy retries elsewhere and its health check
    // takes the server out; every request succeeds, on the other one.
    b.child.kill().unwrap();
    b.child.wait().unwrap();
    for i in 0..4 {
        assert!(matches!(chat(), Ok(200)), "request {i} with one server down");
    }
    assert_eq!(a.metric(ok), served_a + 4.0);
}
