//! The server under test: a `dormouse` (or, as the yardstick, a `redis-server`) that the bench
//! starts on a free loopback port with a fresh data dir and always stops, or one already
//! running that it is pointed at.
//!
//! The Redis yardstick needs `redis-server` on the PATH (or `--redis-bin`); on Debian it comes
//! from the `redis-server` package. The bench never installs it.

use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::net::{SocketAddr, ToSocketAddrs as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use dormouse_bench::{default_server_bin, free_port};
use serde::Serialize;

use super::resp::RespConn;
use dormouse_bench::proc;

/// How long a started server gets to answer.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Which server the load goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Kind {
    Dormouse,
    /// Redis pub/sub, the yardstick.
    Redis,
}

/// Where the dormouse server under test comes from.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ServerArgs {
    /// The dormouse binary to start [default: `dormouse` next to this binary, that is
    /// target/release/dormouse].
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Use an already running server instead of starting one: http://127.0.0.1:PORT (or
    /// redis://127.0.0.1:PORT with --target redis). Loopback only.
    #[arg(long)]
    url: Option<String>,
    /// The running server's process id, for its memory figures (with --url).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Durability of the started server (DORMOUSE_STORAGE_DURABILITY): always, never or a
    /// period such as 100ms [default: the server's, always].
    #[arg(long)]
    durability: Option<String>,
    /// More environment for the started server, KEY=VALUE, repeatable (e.g.
    /// DORMOUSE_LIMITS_SUBSCRIBER_QUEUE=16MiB).
    #[arg(long = "server-env", value_name = "KEY=VALUE")]
    pub(crate) server_env: Vec<String>,
}

/// The server under test, for scenarios that also run against Redis.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct TargetArgs {
    /// Which server to load.
    #[arg(long, value_enum, default_value_t = Kind::Dormouse)]
    target: Kind,
    /// Port for the started redis-server (0: a free one).
    #[arg(long, default_value_t = 0)]
    redis_port: u16,
    /// The redis-server binary to start.
    #[arg(long, default_value = "redis-server")]
    redis_bin: PathBuf,
    #[command(flatten)]
    pub(crate) server: ServerArgs,
}

impl From<ServerArgs> for TargetArgs {
    fn from(server: ServerArgs) -> Self {
        Self {
            target: Kind::Dormouse,
            redis_port: 0,
            redis_bin: PathBuf::from("redis-server"),
            server,
        }
    }
}

/// A running server under test. A server the bench started is killed when this is dropped,
/// on every path out of a scenario, errors and deadlines included.
#[derive(Debug)]
pub(crate) struct Server {
    pub(crate) kind: Kind,
    pub(crate) addr: SocketAddr,
    /// For memory figures; `None` for a running server whose pid was not given.
    pub(crate) pid: Option<u32>,
    /// As the server reports it (`/readyz`); Redis pub/sub keeps nothing.
    pub(crate) durability: String,
    /// The environment the bench gave a server it started, for the report.
    pub(crate) env: Vec<String>,
    process: Option<Process>,
}

impl Server {
    pub(crate) async fn start(args: &TargetArgs) -> anyhow::Result<Self> {
        let mut server = match (&args.server.url, args.target) {
            (Some(url), kind) => Self::running(url, kind, args.server.server_pid)?,
            (None, Kind::Dormouse) => Self::spawn_dormouse(&args.server)?,
            (None, Kind::Redis) => Self::spawn_redis(&args.redis_bin, args.redis_port)?,
        };
        server.wait_ready().await?;
        Ok(server)
    }

    fn running(url: &str, kind: Kind, pid: Option<u32>) -> anyhow::Result<Self> {
        let scheme = match kind {
            Kind::Dormouse => "http://",
            Kind::Redis => "redis://",
        };
        let hostport = url
            .strip_prefix(scheme)
            .with_context(|| format!("--url {url}: expected {scheme}HOST:PORT"))?
            .trim_end_matches('/');
        let addr = hostport
            .to_socket_addrs()
            .with_context(|| format!("--url {url}: cannot resolve {hostport}"))?
            .next()
            .with_context(|| format!("--url {url}: no address"))?;
        anyhow::ensure!(
            addr.ip().is_loopback(),
            "--url {url}: the load generator only targets loopback servers"
        );
        Ok(Self {
            kind,
            addr,
            pid,
            durability: String::new(),
            env: Vec::new(),
            process: None,
        })
    }

    fn spawn_dormouse(args: &ServerArgs) -> anyhow::Result<Self> {
        let bin = match &args.server_bin {
            Some(bin) => bin.clone(),
            None => default_server_bin()?,
        };
        let dir = tempfile::Builder::new()
            .prefix("dormouse-bench-")
            .tempdir()?;
        let addr = free_port()?;
        let mut command = Command::new(&bin);
        command
            .arg("serve")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(dir.path().join("data"));
        let mut env = Vec::new();
        if let Some(durability) = &args.durability {
            env.push(format!("DORMOUSE_STORAGE_DURABILITY={durability}"));
        }
        env.extend(args.server_env.iter().cloned());
        for pair in &env {
            let (key, value) = pair
                .split_once('=')
                .with_context(|| format!("--server-env {pair}: expected KEY=VALUE"))?;
            command.env(key, value);
        }
        let process = Process::spawn(command, &bin, dir)?;
        Ok(Self {
            kind: Kind::Dormouse,
            addr,
            pid: Some(process.child.id()),
            durability: String::new(),
            env,
            process: Some(process),
        })
    }

    fn spawn_redis(bin: &Path, port: u16) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("dormouse-bench-redis-")
            .tempdir()?;
        let addr = match port {
            0 => free_port()?,
            port => SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let mut command = Command::new(bin);
        // No persistence, as pub/sub has none; clients well above the idle scenario's count;
        // protected mode off because clients connect from 127.0.0.2 and up (it admits only
        // 127.0.0.1), while the server still listens on 127.0.0.1 alone.
        command
            .args(["--port", &addr.port().to_string(), "--bind", "127.0.0.1"])
            .args(["--protected-mode", "no"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--maxclients", "100000"])
            .arg("--dir")
            .arg(dir.path());
        let process = Process::spawn(command, bin, dir)?;
        Ok(Self {
            kind: Kind::Redis,
            addr,
            pid: Some(process.child.id()),
            durability: "none".to_string(),
            env: Vec::new(),
            process: Some(process),
        })
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        let client = http_client()?;
        loop {
            self.check_alive()?;
            let ready = match self.kind {
                Kind::Dormouse => client
                    .get(format!("{}/healthz", self.base_url()))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success()),
                Kind::Redis => match RespConn::connect(self.addr, None, 4096).await {
                    Ok(mut conn) => conn.ping().await.is_ok(),
                    Err(_) => false,
                },
            };
            if ready {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{:?} at {} did not answer within {START_TIMEOUT:?}{}",
                self.kind,
                self.addr,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if self.kind == Kind::Dormouse {
            let ready: serde_json::Value = client
                .get(format!("{}/readyz", self.base_url()))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            self.durability = ready["durability"].as_str().unwrap_or("").to_string();
        }
        Ok(())
    }

    /// `http://ADDR`, for HTTP requests to a dormouse server.
    pub(crate) fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Fails, with the end of the server's log, if a server the bench started has exited.
    pub(crate) fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(process) = &mut self.process
            && let Some(status) = process.child.try_wait()?
        {
            anyhow::bail!(
                "the server exited during the run ({status}){}",
                self.log_tail()
            );
        }
        Ok(())
    }

    /// The server's resident set size now (`VmRSS`), if its pid is known.
    pub(crate) fn rss_bytes(&self) -> anyhow::Result<Option<u64>> {
        self.pid.map(proc::process_rss_bytes).transpose()
    }

    /// The server's peak resident set size (`VmHWM`), if its pid is known.
    pub(crate) fn peak_rss_bytes(&self) -> anyhow::Result<Option<u64>> {
        self.pid.map(proc::process_peak_rss_bytes).transpose()
    }

    /// CPU seconds the server has used so far, if its pid is known.
    pub(crate) fn cpu_secs(&self) -> anyhow::Result<Option<f64>> {
        self.pid
            .map(|pid| proc::cpu_secs(&pid.to_string()))
            .transpose()
    }

    /// Starts measuring CPU time over a benchmark window.
    pub(crate) fn cpu_meter(&self) -> anyhow::Result<CpuMeter> {
        Ok(CpuMeter {
            server: self.cpu_secs()?,
            client: proc::cpu_secs("self")?,
            machine: proc::machine_busy_secs()?,
        })
    }

    fn log_tail(&self) -> String {
        self.process
            .as_ref()
            .map(|p| p.log_tail())
            .filter(|tail| !tail.is_empty())
            .map(|tail| format!("; its log ends:\n{tail}"))
            .unwrap_or_default()
    }
}

/// How long one request may wait for its answer before it counts as failed: a server that
/// stops answering shows up as errors in the report instead of a run that never ends.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// An HTTP client for loopback: no proxy, no Nagle delay, connections reused.
pub(crate) fn http_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(usize::MAX)
        .timeout(REQUEST_TIMEOUT)
        .build()?)
}

/// A child process with its log and data dir; killed, then its dir removed, on drop.
#[derive(Debug)]
struct Process {
    child: Child,
    log: PathBuf,
    /// Declared after `child` so the server is dead before its directory goes.
    _dir: tempfile::TempDir,
}

impl Process {
    fn spawn(mut command: Command, bin: &Path, dir: tempfile::TempDir) -> anyhow::Result<Self> {
        let log = dir.path().join("server.log");
        let out = File::create(&log)?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Self {
            child,
            log,
            _dir: dir,
        })
    }

    /// The last lines of the server's output, for error messages.
    fn log_tail(&self) -> String {
        let mut tail = Vec::new();
        if let Ok(mut file) = File::open(&self.log) {
            let len = file.metadata().map_or(0, |m| m.len());
            let _ = file.seek(SeekFrom::Start(len.saturating_sub(2048)));
            let _ = file.read_to_end(&mut tail);
        }
        String::from_utf8_lossy(&tail).into_owned()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time at the start of a window, so a report can show who used the machine: the server,
/// the load generator, and everything else (a noisy neighbour makes a run suspect).
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuMeter {
    server: Option<f64>,
    client: f64,
    machine: f64,
}

/// CPU seconds used during a window, rounded for reports.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuUsage {
    pub(crate) server: Option<f64>,
    pub(crate) client: f64,
    pub(crate) other: f64,
}

impl CpuMeter {
    /// CPU used since the meter started.
    pub(crate) fn stop(&self, server: &Server) -> anyhow::Result<CpuUsage> {
        let round3 = super::round3;
        let server_secs = server
            .cpu_secs()?
            .zip(self.server)
            .map(|(after, before)| round3(after - before));
        let client = round3(proc::cpu_secs("self")? - self.client);
        let other =
            round3(proc::machine_busy_secs()? - self.machine - client - server_secs.unwrap_or(0.0));
        Ok(CpuUsage {
            server: server_secs,
            client,
            other,
        })
    }
}
