//! A `dormouse` server as a child process, for harnesses that kill, restart and measure it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// A server child process; SIGKILLed if still running when dropped.
pub(crate) struct ServerProcess {
    /// For memory figures.
    pub(crate) pid: u32,
    child: Child,
    addr: std::net::SocketAddr,
    log: PathBuf,
}

impl ServerProcess {
    /// Starts `bin` on a free loopback port with its data in `data_dir` (the same dir
    /// across restarts) and its log in `log_dir/server-{run}.log`; `env` adds settings.
    pub(crate) fn start(
        bin: &Path,
        data_dir: &Path,
        log_dir: &Path,
        durability: &str,
        run: usize,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let addr = crate::free_port()?;
        let log = log_dir.join(format!("server-{run}.log"));
        let out = std::fs::File::create(&log)?;
        let mut command = Command::new(bin);
        command.envs(env.iter().copied());
        let child = command
            .arg("serve")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(data_dir)
            .env("DORMOUSE_STORAGE_DURABILITY", durability)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Self {
            pid: child.id(),
            child,
            addr,
            log,
        })
    }

    /// Waits until `/readyz` answers; returns the base URL.
    pub(crate) async fn wait_ready(&mut self, client: &reqwest::Client) -> anyhow::Result<String> {
        self.wait_ready_within(client, Duration::from_secs(20))
            .await
    }

    /// As [`Self::wait_ready`], for a start that may take longer (a large data dir).
    pub(crate) async fn wait_ready_within(
        &mut self,
        client: &reqwest::Client,
        patience: Duration,
    ) -> anyhow::Result<String> {
        let base = format!("http://{}", self.addr);
        let deadline = Instant::now() + patience;
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!(
                    "the server exited ({status}) at start: {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            if client
                .get(format!("{base}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return Ok(base);
            }
            anyhow::ensure!(Instant::now() < deadline, "the server did not become ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What the server logged so far.
    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, and reap it.
    pub(crate) fn kill9(&mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM, and check it exited 0.
    pub(crate) fn stop_gracefully(&mut self) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM failed");
        let status = self.child.wait()?;
        anyhow::ensure!(status.success(), "graceful stop exited with {status}");
        Ok(())
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
