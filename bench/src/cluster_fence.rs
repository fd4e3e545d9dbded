//! The fence against a real paused process: an owner appends to an object's log from a
//! child process, is stopped (SIGSTOP) past its membership's expiry, a second node takes the
//! object over, and the owner is continued (SIGCONT). Its next append must be refused by the
//! log, and nothing it wrote may follow the new owner's marker: one writer between two
//! ownership changes. Issue 16's chaos check "SIGSTOP a node past its lease", on the
//! primitives cluster mode is built from, against a three-server cluster it starts.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dormouse_cluster::{
    AppendError, Claim, Directory, DirectorySpec, FencedLog, LogSpec, Membership, NatsSettings,
    NodeId, connect, take_over,
};
use dormouse_testkit::nats::NatsCluster;
use serde::Serialize;

const OBJECT: &str = "counter:c1";
const SUBJECT: &str = "objects.counter=3Ac1";

fn spec() -> DirectorySpec {
    DirectorySpec {
        prefix: "dm".into(),
        replicas: 3,
        node_ttl: Duration::from_secs(2),
    }
}

fn log_spec() -> LogSpec {
    LogSpec {
        name: "objects".into(),
        subjects: vec!["objects.>".into()],
        replicas: 3,
        duplicate_window: Duration::from_secs(30),
        republish: false,
    }
}

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Rounds: each pauses a fresh owner process and takes its object over.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// The owner process (run by `cluster-fence` itself).
#[derive(Debug, clap::Args)]
pub(crate) struct OwnerArgs {
    /// The NATS servers, comma-separated.
    #[arg(long)]
    urls: String,
    /// This node's name.
    #[arg(long)]
    name: String,
}

#[derive(Debug, Serialize)]
pub(crate) struct Report {
    scenario: &'static str,
    rounds: usize,
    /// Per round: appends the paused owner had acknowledged before it was stopped.
    owner_acks: Vec<u64>,
    /// Per round: from SIGSTOP to the new owner's marker in the log.
    takeover_ms: Vec<u64>,
    /// Rounds in which the continued owner's next append was refused as fenced.
    owners_fenced: usize,
    /// Appends of a continued owner acknowledged after the new owner's marker (must be 0).
    acked_after_marker: usize,
    /// Messages of a former owner found after a new owner's marker (must be 0).
    foreign_after_marker: usize,
    pub(crate) ok: bool,
}

/// Runs as the owner: joins, claims the object, puts its fence in, then appends every
/// 20 ms, printing `acked <seq>` for each, until an append is refused (`fenced`).
pub(crate) async fn owner(args: OwnerArgs) -> anyhow::Result<()> {
    let urls = args.urls.split(',').map(str::to_string).collect();
    let nats = connect(&NatsSettings::new(urls, &args.name)).await?;
    let me = NodeId::start(&args.name);
    let _membership = Membership::join(&nats, &spec(), me.clone()).await?;
    let directory = Directory::open(&nats, &spec()).await?;
    let Claim::Mine { .. } = directory.claim(OBJECT, &me, |_| true).await? else {
        anyhow::bail!("{OBJECT} is owned by another live node");
    };
    let log = FencedLog::open(&nats, &log_spec()).await?;
    let mut expected = take_over(&log, SUBJECT, &me).await?;
    println!("marker {expected}");
    for n in 0.. {
        let payload = Bytes::from(format!("{} {n}", args.name));
        let id = format!("{}-{:x}-{n}", args.name, me.incarnation);
        match log
            .append_retrying(SUBJECT, payload, expected, &id, Duration::from_secs(30))
            .await
        {
            Ok(stored) => {
                expected = stored.sequence;
                println!("acked {expected}");
            }
            Err(AppendError::Fenced { expected }) => {
                println!("fenced {expected}");
                return Ok(());
            }
            Err(e) => anyhow::bail!("append {n}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

pub(crate) async fn run(args: Args) -> anyhow::Result<Report> {
    let cluster = NatsCluster::start(3).await;
    let urls = cluster.urls();
    let nats = connect(&NatsSettings::new(urls.clone(), "taker")).await?;
    let log = FencedLog::open(&nats, &log_spec()).await?;
    let directory = Directory::open(&nats, &spec()).await?;
    let mut report = Report {
        scenario: "cluster-fence",
        rounds: args.rounds,
        owner_acks: Vec::new(),
        takeover_ms: Vec::new(),
        owners_fenced: 0,
        acked_after_marker: 0,
        foreign_after_marker: 0,
        ok: false,
    };
    for round in 0..args.rounds {
        let name = format!("owner-{round}");
        let mut child = Owner(
            Command::new(std::env::current_exe()?)
                .args([
                    "cluster-fence-owner",
                    "--urls",
                    &urls.join(","),
                    "--name",
                    &name,
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()?,
        );
        let stdout = child.0.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let read = |until: &dyn Fn(&str) -> bool| -> anyhow::Result<String> {
            loop {
                let line = lines.recv_timeout(Duration::from_secs(30))?;
                if until(&line) {
                    return Ok(line);
                }
            }
        };
        // Let it write a little, then stop it mid-stream.
        let mut acks = 0;
        read(&|line| line.starts_with("marker"))?;
        while acks < 20 {
            read(&|line| line.starts_with("acked"))?;
            acks += 1;
        }
        let stopped = Instant::now();
        signal(child.0.id(), "-STOP")?;
        while let Ok(line) = lines.try_recv() {
            if line.starts_with("acked") {
                acks += 1;
            }
        }
        report.owner_acks.push(acks);
        // Its membership expires; then the object is taken over.
        let taker = NodeId::start("taker");
        let membership = Membership::join(&nats, &spec(), taker.clone()).await?;
        let marker = loop {
            let live = membership.live_nodes().await?;
            let alive = |node: &NodeId| live.get(&node.name) == Some(node);
            if let Claim::Mine { .. } = directory.claim(OBJECT, &taker, alive).await? {
                break take_over(&log, SUBJECT, &taker).await?;
            }
            anyhow::ensure!(
                stopped.elapsed() < Duration::from_secs(30),
                "the paused owner never expired"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        report
            .takeover_ms
            .push(stopped.elapsed().as_millis() as u64);
        // The new owner writes; then the old one is continued.
        let mut expected = marker;
        for n in 0..5 {
            expected = log
                .append(
                    SUBJECT,
                    Bytes::from(format!("taker {n}")),
                    expected,
                    &format!("t{round}-{n}"),
                )
                .await?
                .sequence;
        }
        signal(child.0.id(), "-CONT")?;
        // An append it had in flight when stopped may still be acknowledged: it was stored
        // before the marker. Anything acknowledged after the marker is a second writer. A
        // fenced owner stops at once; one still appending after 5 s was not fenced.
        let continued = Instant::now();
        while continued.elapsed() < Duration::from_secs(5) {
            let Ok(line) = lines.recv_timeout(Duration::from_millis(200)) else {
                continue;
            };
            if line.starts_with("fenced") {
                report.owners_fenced += 1;
                break;
            }
            if let Some(acked) = line.strip_prefix("acked ")
                && acked.parse::<u64>()? > marker
            {
                report.acked_after_marker += 1;
            }
        }
        drop(child);
        drop(membership);
        // Release the object for the next round's owner.
        if let Some((_, revision)) = directory.owner(OBJECT).await? {
            directory.release(OBJECT, revision).await?;
        }
    }
    // Nothing of a former owner after any marker: walk the subject.
    let end = log.last_sequence(SUBJECT).await?;
    let mut writer_since_marker: Option<String> = None;
    let mut sequence = 1;
    while sequence <= end {
        // Every sequence of the stream is this subject's (nothing else is written to it);
        // a read that keeps failing fails the check rather than skip what it would show.
        let mut tries = 0;
        let (subject, payload) = loop {
            match log.get(sequence).await {
                Ok(message) => break message,
                Err(_) if tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => anyhow::bail!("reading sequence {sequence} of the log: {e}"),
            }
        };
        sequence += 1;
        if subject != SUBJECT {
            continue;
        }
        let text = String::from_utf8_lossy(&payload).into_owned();
        if let Some(owner) = text.strip_prefix("owner ") {
            writer_since_marker = owner.split('#').next().map(str::to_string);
            continue;
        }
        let writer = text.split(' ').next().unwrap_or_default();
        if writer_since_marker.as_deref().is_some_and(|w| w != writer) {
            report.foreign_after_marker += 1;
        }
    }
    report.ok = report.owners_fenced == args.rounds
        && report.acked_after_marker == 0
        && report.foreign_after_marker == 0;
    Ok(report)
}

/// The owner process; killed (and continued first, if stopped) and reaped when dropped,
/// whichever way the round ends.
struct Owner(std::process::Child);

impl Drop for Owner {
    fn drop(&mut self) {
        let _ = signal(self.0.id(), "-CONT");
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(pid: u32, which: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args([which, &pid.to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill {which} {pid} failed");
    Ok(())
}
