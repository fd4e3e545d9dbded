//! A full disk, for real: the server's data dir lives on a small tmpfs that also holds a
//! filler file. Publishing fills it; the harness checks the refusal is a clear `507`, that
//! publishes keep getting a quick `507` while the disk stays full, that publishing works
//! again as soon as the filler is deleted (no restart), and, after a `kill -9` and a
//! restart, that every acknowledged message is intact. Then it makes the data dir
//! unwritable under a running server (`chattr +i`): a publish gets `503`, and once the
//! files are writable again publishing works, again without a restart.
//!
//! Needs root (it mounts a tmpfs); CI runs it from `.ci/run`:
//! `cargo run --release -p dormouse-bench -- disk-full`.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;

use crate::child::ServerProcess;

/// What to run.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Size of the tmpfs holding the data dir.
    #[arg(long, default_value = "16m")]
    pub size: String,
    /// Size of the filler file, MiB (what "space returns" frees).
    #[arg(long, default_value_t = 4)]
    pub filler_mib: u64,
    /// The dormouse binary [default: `dormouse` next to this binary, or
    /// target/release/dormouse].
    #[arg(long)]
    pub server_bin: Option<PathBuf>,
}

/// What the harness saw.
#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: &'static str,
    /// Publishes acknowledged before the disk filled.
    pub acknowledged: usize,
    /// Status and error code of the first refused publish.
    pub refusal: (u16, String),
    /// Status, code and time (ms) of publishes while the disk is still full.
    pub while_full: Vec<(u16, String, u64)>,
    /// Status, code and time (ms) of publishes after the filler was deleted.
    pub after_space_returns: Vec<(u16, String, u64)>,
    pub readyz_when_full: u16,
    pub healthz_when_full: u16,
    /// After deleting the filler and restarting: events found, and whether each
    /// acknowledged message is among them with its id.
    pub events_after_restart: usize,
    pub all_acknowledged_intact: bool,
    pub publish_after_restart: u16,
    pub readyz_after_restart: u16,
    /// Free space when the first server was killed, after the filler was deleted.
    pub free_kib_after_kill: u64,
    /// Why the restart failed, if it did.
    pub restart_error: Option<String>,
    /// An unwritable data dir (the newest segment and the segments directory made
    /// immutable with `chattr +i` under a running server): status and code of a publish.
    pub unwritable: (u16, String),
    /// Status of a publish once the files are writable again (no restart).
    pub after_writable_again: u16,
    /// Why the unwritable check failed to run, if it did.
    pub unwritable_error: Option<String>,
    pub ok: bool,
}

/// Runs the harness (see the module doc).
pub async fn run(args: Args) -> anyhow::Result<Report> {
    let bin = match &args.server_bin {
        Some(bin) => bin.clone(),
        None => crate::default_server_bin()?,
    };
    let dir = tempfile::Builder::new()
        .prefix("dormouse-disk-full-")
        .tempdir()?;
    let mount = dir.path().join("fs");
    std::fs::create_dir_all(&mount)?;
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={}", args.size), "tmpfs"])
        .arg(&mount)
        .status()
        .context("running mount")?;
    anyhow::ensure!(
        status.success(),
        "mounting a tmpfs failed ({status}): this harness needs root"
    );
    let _unmount = Unmount(mount.clone());
    let filler = mount.join("filler");
    std::fs::write(&filler, vec![0u8; (args.filler_mib * 1024 * 1024) as usize])?;

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()?;
    let mut server = ServerProcess::start(&bin, &mount.join("data"), dir.path(), "always", 0, &[])?;
    let base = server.wait_ready(&client).await?;
    let url = format!("{base}/v1/channels/full/messages");
    let payload = |i: usize| format!("{i:06}-{}", "x".repeat(256 * 1024));

    // Fill the disk.
    let mut acked: Vec<(String, usize)> = Vec::new();
    let refusal = loop {
        let i = acked.len();
        anyhow::ensure!(i < 1000, "the disk never filled");
        let res = client.post(&url).body(payload(i)).send().await?;
        let status = res.status().as_u16();
        let body: serde_json::Value = res.json().await?;
        if status == 201 {
            acked.push((body["id"].as_str().context("id")?.to_string(), i));
        } else {
            break (
                status,
                body["error"]["code"].as_str().unwrap_or("").to_string(),
            );
        }
    };
    let mut while_full = Vec::new();
    for _ in 0..3 {
        while_full.push(publish(&client, &url, payload(acked.len()), None).await?);
    }
    let readyz_when_full = status_of(&client, &format!("{base}/readyz")).await;
    let healthz_when_full = status_of(&client, &format!("{base}/healthz")).await;
    // Space returns: the engine cut the failed writes back out, so it just goes on.
    std::fs::remove_file(&filler)?;
    let mut after_space_returns = Vec::new();
    for _ in 0..3 {
        let i = acked.len();
        let (status, code, ms) = publish(&client, &url, payload(i), Some((&mut acked, i))).await?;
        after_space_returns.push((status, code, ms));
    }
    server.kill9()?;
    let free_after_kill = free_kib(&mount);

    // Restart on the same data dir, with the space back.
    let restarted = restart_and_check(&client, &bin, &mount, dir.path(), &acked, &payload).await;
    let (
        events_after_restart,
        all_acknowledged_intact,
        publish_after_restart,
        readyz_after_restart,
        restart_error,
    ) = match restarted {
        Ok((events, intact, publish, readyz)) => (events, intact, publish, readyz, None),
        Err(e) => (0, false, 0, 0, Some(format!("{e:#}"))),
    };

    let (unwritable, after_writable_again, unwritable_error) =
        match unwritable_check(&client, &bin, dir.path()).await {
            Ok((unwritable, after)) => (unwritable, after, None),
            Err(e) => ((0, String::new()), 0, Some(format!("{e:#}"))),
        };

    let ok = !acked.is_empty()
        && refusal == (507, "storage_full".to_string())
        && while_full
            .iter()
            .all(|(s, code, ms)| *s == 507 && code == "storage_full" && *ms < 5_000)
        && after_space_returns.iter().all(|(s, _, _)| *s == 201)
        && healthz_when_full == 200
        && all_acknowledged_intact
        && publish_after_restart == 201
        && readyz_after_restart == 200
        && restart_error.is_none()
        && unwritable == (503, "storage_unavailable".to_string())
        && after_writable_again == 201;
    Ok(Report {
        scenario: "disk-full",
        acknowledged: acked.len(),
        refusal,
        while_full,
        after_space_returns,
        readyz_when_full,
        healthz_when_full,
        events_after_restart,
        all_acknowledged_intact,
        publish_after_restart,
        readyz_after_restart,
        free_kib_after_kill: free_after_kill,
        restart_error,
        unwritable,
        after_writable_again,
        unwritable_error,
        ok,
    })
}

/// Makes a data dir unwritable under a running server (`chattr +i` on the newest segment
/// and the segments directory), publishes, makes it writable again and publishes again:
/// (status and code while unwritable, status after). The data dir is on the temporary
/// directory's file system, not the tmpfs: tmpfs accepts the flag but does not enforce it
/// on files that are already open.
async fn unwritable_check(
    client: &reqwest::Client,
    bin: &std::path::Path,
    log_dir: &std::path::Path,
) -> anyhow::Result<((u16, String), u16)> {
    let data = log_dir.join("unwritable-data");
    let mut server = ServerProcess::start(bin, &data, log_dir, "always", 2, &[])?;
    let base = server.wait_ready(client).await?;
    let url = format!("{base}/v1/channels/unwritable/messages");
    let (first, _, _) = publish(client, &url, "before".into(), None).await?;
    anyhow::ensure!(first == 201, "the first publish got {first}");
    let segments = data.join("segments");
    let mut files: Vec<_> = std::fs::read_dir(&segments)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    files.sort();
    let newest = files.pop().context("no segment file")?;
    let chattr = |flag: &str| -> anyhow::Result<()> {
        let status = Command::new("chattr")
            .arg(flag)
            .arg(&newest)
            .arg(&segments)
            .status()
            .context("running chattr")?;
        anyhow::ensure!(status.success(), "chattr {flag} failed ({status})");
        Ok(())
    };
    chattr("+i")?;
    let refused = publish(client, &url, "while unwritable".into(), None).await;
    chattr("-i")?;
    let (status, code, _) = refused?;
    let (after, _, _) = publish(client, &url, "writable again".into(), None).await?;
    server.stop_gracefully()?;
    Ok(((status, code), after))
}

/// One publish: (status, error code, ms). A `201` is recorded in `acked` as message `i`.
async fn publish(
    client: &reqwest::Client,
    url: &str,
    body: String,
    acked: Option<(&mut Vec<(String, usize)>, usize)>,
) -> anyhow::Result<(u16, String, u64)> {
    let started = Instant::now();
    let res = client.post(url).body(body).send().await?;
    let status = res.status().as_u16();
    let body: serde_json::Value = res.json().await.unwrap_or_default();
    if status == 201
        && let Some((acked, i)) = acked
    {
        acked.push((body["id"].as_str().context("id")?.to_string(), i));
    }
    Ok((
        status,
        body["error"]["code"].as_str().unwrap_or("").to_string(),
        started.elapsed().as_millis() as u64,
    ))
}

/// Restarts on the data dir: (events found, every acknowledged message intact, status of a
/// new publish, status of /readyz).
async fn restart_and_check(
    client: &reqwest::Client,
    bin: &std::path::Path,
    mount: &std::path::Path,
    log_dir: &std::path::Path,
    acked: &[(String, usize)],
    payload: &dyn Fn(usize) -> String,
) -> anyhow::Result<(usize, bool, u16, u16)> {
    let mut server = ServerProcess::start(bin, &mount.join("data"), log_dir, "always", 1, &[])?;
    let base = server.wait_ready(client).await?;
    let mut found: Vec<(String, String)> = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut page_url = format!("{base}/v1/channels/full/messages?limit=100");
        if let Some(a) = &after {
            page_url.push_str(&format!("&after={a}"));
        }
        let page: serde_json::Value = client.get(&page_url).send().await?.json().await?;
        let events = page["events"].as_array().context("events")?;
        if events.is_empty() {
            break;
        }
        for e in events {
            let id = e["id"].as_str().unwrap_or("").to_string();
            let data = e["data"].as_str().unwrap_or("").to_string();
            found.push((id, data));
        }
        after = page["next_after"].as_str().map(str::to_string);
    }
    let intact = acked.iter().all(|(id, i)| {
        found
            .iter()
            .any(|(fid, data)| fid == id && *data == payload(*i))
    });
    let publish = client
        .post(format!("{base}/v1/channels/full/messages"))
        .body("after restart")
        .send()
        .await?
        .status()
        .as_u16();
    let readyz = status_of(client, &format!("{base}/readyz")).await;
    server.stop_gracefully()?;
    Ok((found.len(), intact, publish, readyz))
}

/// Free space of the file system at `path`, KiB (`df`); 0 if unknown.
fn free_kib(path: &std::path::Path) -> u64 {
    Command::new("df")
        .arg("--output=avail")
        .arg(path)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|t| t.lines().nth(1).and_then(|l| l.trim().parse().ok()))
        .unwrap_or(0)
}

async fn status_of(client: &reqwest::Client, url: &str) -> u16 {
    match client.get(url).send().await {
        Ok(res) => res.status().as_u16(),
        Err(_) => 0,
    }
}

/// Unmounts the tmpfs however the harness ends.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
